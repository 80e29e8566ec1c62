"""Weights-free ONNX graphs of LLaMA shape, for benchmarking costlens at real model sizes.

    python benchmarks/make_graphs.py --out DIR [--model llama2-7b|llama3-70b|all] [--check]

Each graph is written as ``DIR/<name>.onnx`` plus a *sparse* ``DIR/<name>.weights`` file:
every weight is an fp16 external-data initializer pointing into that file, and the file is
only truncated to its full length, never written, so a 70B model costs ~3 MB of real disk.
costlens never reads external data, so the missing bytes are never noticed.

The node pattern copies what torch.onnx (dynamo) exports for a LLaMA-like module (see
fixtures/llama.onnx): the role locator works on structure, so the benchmark must look like
a real export, not like a hand-simplified graph. Built with onnx.helper only (no torch).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 20
ALIGN = 4096                      # external-data offsets, as onnx's own saver aligns them
FP16 = TensorProto.FLOAT16
INT64_MAX = 2**63 - 1

PRESETS = {
    "llama2-7b": dict(layers=32, hidden=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000),
    "llama3-70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672, vocab=128256),
}

# Analytic parameter counts, checked by hand from the dims (untied lm_head, no biases):
#   7B : embed 32000*4096 = 131,072,000; per layer attn 4*4096^2 = 67,108,864,
#        ffn 3*4096*11008 = 135,266,304, norms 2*4096 = 8,192 -> 202,383,360 * 32
#        = 6,476,267,520; final norm 4,096; lm_head 131,072,000  => 6,738,415,616
#   70B: embed 128256*8192 = 1,050,673,152; per layer q,o 2*8192^2 = 134,217,728,
#        k,v 2*8192*1024 = 16,777,216, ffn 3*8192*28672 = 704,643,072, norms 16,384
#        -> 855,654,400 * 80 = 68,452,352,000; final norm 8,192; lm_head 1,050,673,152
#        => 70,553,706,496
EXPECTED_PARAMS = {"llama2-7b": 6_738_415_616, "llama3-70b": 70_553_706_496}


def param_count(layers, hidden, heads, kv_heads, ffn, vocab) -> int:
    kv_dim = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * ffn + 2 * hidden
    return layers * per_layer + hidden + 2 * vocab * hidden


class _Builder:
    """Collects nodes and initializers; weights get offsets into one sparse file."""

    def __init__(self, weights_file: str):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.weights_file = weights_file
        self.end = 0              # bytes used in the weights file so far
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, **attrs) -> str:
        out = self.fresh(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"node_{out}", **attrs))
        return out

    def const(self, stem: str, value, dtype) -> str:
        name = self.fresh(f"val_{stem}")
        self.inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def weight(self, name: str, dims: list[int]) -> str:
        """An fp16 external initializer: metadata only, no bytes in the .onnx."""
        offset = -(-self.end // ALIGN) * ALIGN
        length = int(np.prod(dims)) * 2
        tensor = TensorProto(name=name, dims=dims, data_type=FP16, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.weights_file), ("offset", offset), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.inits.append(tensor)
        self.end = offset + length
        return name


def _rms_norm(b: _Builder, x: str, weight: str, c: dict) -> str:
    # x * rsqrt(mean(x^2) + eps) * w, decomposed exactly as the exporter does
    var = b.op("ReduceMean", [b.op("Pow", [x, c["two"]]), c["neg1"]], "mean", keepdims=1, noop_with_empty_axes=0)
    rsqrt = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, c["eps"]])])], "rsqrt")
    return b.op("Mul", [weight, b.op("Mul", [x, rsqrt])])


def _rope(b: _Builder, x: str, c: dict) -> str:
    half1 = b.op("Slice", [x, c["zero1"], c["half"], c["three"], c["one1"]])
    half2 = b.op("Slice", [x, c["half"], c["int_max"], c["three"], c["one1"]])
    rotated = b.op("Concat", [b.op("Neg", [half2]), half1], "cat", axis=-1)
    return b.op("Add", [b.op("Mul", [x, c["cos"]]), b.op("Mul", [rotated, c["sin"]])])


def _repeat_kv(b: _Builder, x: str, c: dict) -> str:
    # torch's repeat_interleave on dim 1: [b,kv,s,hd] -> [b,kv,rep,s,hd] -> [b,kv*rep,s,hd]
    expanded = b.op("Expand", [b.op("Unsqueeze", [x, c["two1"]]), c["rep"]])
    batch = b.op("Shape", [x], "shape", start=0, end=1)
    tail = b.op("Shape", [x], "shape", start=2)
    shape = b.op("Concat", [batch, c["neg1"], tail], "shape", axis=0)
    return b.op("Reshape", [expanded, shape], "repeat_interleave", allowzero=0)


def _attention(b: _Builder, h: str, p: str, dims: dict, c: dict) -> str:
    d, kv_dim = dims["hidden"], dims["kv_dim"]
    q = b.weight(f"{p}.q_proj.weight", [d, d])
    k = b.weight(f"{p}.k_proj.weight", [d, kv_dim])
    v = b.weight(f"{p}.v_proj.weight", [d, kv_dim])
    o = b.weight(f"{p}.o_proj.weight", [d, d])

    def heads(w, shape):
        view = b.op("Reshape", [b.op("MatMul", [h, w], "linear"), shape], "view", allowzero=1)
        return b.op("Transpose", [view], "transpose", perm=[0, 2, 1, 3])

    qh, kh, vh = heads(q, c["q_shape"]), heads(k, c["kv_shape"]), heads(v, c["kv_shape"])
    qh, kh = _rope(b, qh, c), _rope(b, kh, c)
    if dims["kv_heads"] < dims["heads"]:
        kh, vh = _repeat_kv(b, kh, c), _repeat_kv(b, vh, c)
    scores = b.op("MatMul", [qh, b.op("Transpose", [kh], "transpose", perm=[0, 1, 3, 2])], "matmul")
    masked = b.op("Add", [b.op("Div", [scores, c["sqrt_hd"]]), c["mask"]])
    probs = b.op("Softmax", [masked], axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, vh], "matmul")], "transpose", perm=[0, 2, 1, 3])
    merged = b.op("Reshape", [ctx, c["out_shape"]], "_unsafe_view", allowzero=1)
    return b.op("MatMul", [merged, o], "linear")


def _mlp(b: _Builder, h: str, p: str, dims: dict) -> str:
    d, f = dims["hidden"], dims["ffn"]
    gate = b.op("MatMul", [h, b.weight(f"{p}.gate_proj.weight", [d, f])], "linear")
    silu = b.op("Mul", [gate, b.op("Sigmoid", [gate])], "silu")
    up = b.op("MatMul", [h, b.weight(f"{p}.up_proj.weight", [d, f])], "linear")
    return b.op("MatMul", [b.op("Mul", [silu, up]), b.weight(f"{p}.down_proj.weight", [f, d])], "linear")


def _shared(b: _Builder, dims: dict) -> dict:
    """Constants and subgraphs every layer reuses (shapes, RoPE cos/sin, causal mask),
    built once at the top as the exporter does."""
    hd = dims["hidden"] // dims["heads"]
    i64 = np.int64
    c = {
        "two": b.const("two", 2.0, np.float16), "eps": b.const("eps", 1e-6, np.float16),
        "neg1": b.const("axes", [-1], i64), "zero1": b.const("start", [0], i64),
        "half": b.const("half", [hd // 2], i64), "three": b.const("axis", [3], i64),
        "one1": b.const("step", [1], i64), "int_max": b.const("end", [INT64_MAX], i64),
        "two1": b.const("unsq", [2], i64), "sqrt_hd": b.const("scale", float(np.sqrt(hd)), np.float16),
        "rep": b.const("rep", [1, 1, dims["heads"] // dims["kv_heads"], 1, 1], i64),
    }
    batch = b.op("Shape", ["input_ids"], "shape", start=0, end=1)
    seq = b.op("Shape", ["input_ids"], "shape", start=1, end=2)

    def as_dims(*tail: int) -> str:   # [batch, seq, *tail], batch and seq read at run time
        return b.op("Concat", [batch, seq] + [b.const("dim", [x], i64) for x in tail], "shape", axis=0)

    c["q_shape"] = as_dims(dims["heads"], hd)
    c["kv_shape"] = as_dims(dims["kv_heads"], hd)
    c["out_shape"] = as_dims(dims["hidden"])

    seq_scalar = b.op("Squeeze", [seq], "sym_size_int")
    positions = b.op("Range", [b.const("zero", 0, i64), seq_scalar, b.const("one", 1, i64)], "arange")
    column = b.op("Reshape", [b.op("Cast", [positions], "_to_copy", to=FP16), b.const("col", [-1, 1], i64)], "view")
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    freqs = b.op("Mul", [column, b.const("inv_freq", inv_freq, np.float16)])
    angles = b.op("Concat", [freqs, freqs], "cat", axis=-1)
    c["cos"], c["sin"] = b.op("Cos", [angles]), b.op("Sin", [angles])

    full = b.op("Expand", [b.const("ninf", -np.inf, np.float16), b.op("Concat", [seq, seq], "shape", axis=0)], "full")
    c["mask"] = b.op("Trilu", [full, b.const("k", 1, i64)], "triu", upper=1)
    return c


def build_llama_graph(out_dir: Path, name: str, layers: int, hidden: int, heads: int,
                      kv_heads: int, ffn: int, vocab: int) -> Path:
    """Write ``out_dir/<name>.onnx`` and its sparse ``<name>.weights``; return the .onnx path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dims = dict(hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn, kv_dim=hidden // heads * kv_heads)
    b = _Builder(f"{name}.weights")
    c = _shared(b, dims)

    x = b.op("Gather", [b.weight("embed_tokens.weight", [vocab, hidden]), "input_ids"], "embedding", axis=0)
    for i in range(layers):
        p = f"layers.{i}"
        h = _rms_norm(b, x, b.weight(f"{p}.input_layernorm.weight", [hidden]), c)
        x = b.op("Add", [x, _attention(b, h, f"{p}.self_attn", dims, c)])
        h = _rms_norm(b, x, b.weight(f"{p}.post_attention_layernorm.weight", [hidden]), c)
        x = b.op("Add", [x, _mlp(b, h, f"{p}.mlp", dims)])
    h = _rms_norm(b, x, b.weight("norm.weight", [hidden]), c)
    b.nodes.append(helper.make_node("MatMul", [h, b.weight("lm_head.weight", [hidden, vocab])], ["logits"],
                                    name="node_logits"))

    graph = helper.make_graph(
        b.nodes, name,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", FP16, ["batch", "seq", vocab])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="costlens-bench")
    path = out_dir / f"{name}.onnx"
    onnx.save_model(model, str(path))
    # Sparse: the length is set, no byte is written, so the disk holds nothing.
    with open(out_dir / f"{name}.weights", "wb") as f:
        f.truncate(b.end)
    return path


def check_graph(path: Path, expected_params: int, vocab: int) -> list[str]:
    """Problems found when costlens loads the graph (empty list: all good)."""
    from costlens.frontends.onnx import load_onnx

    graph = load_onnx(path)
    problems = [f"load_onnx warning: {w}" for w in graph.warnings]
    weights = sum(k.n_elements for k in graph.constants.values() if k.is_float and k.external)
    if weights != expected_params:
        problems.append(f"weight elements {weights:,} != expected {expected_params:,}")
    shape = graph.shape("logits")
    if shape != ("batch", "seq", vocab):
        problems.append(f"logits shape {shape} != ('batch', 'seq', {vocab})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--model", choices=[*PRESETS, "all"], default="all")
    parser.add_argument("--check", action="store_true", help="load each graph with costlens and verify it")
    args = parser.parse_args(argv)
    failed = False
    for name in PRESETS if args.model == "all" else [args.model]:
        path = build_llama_graph(args.out, name, **PRESETS[name])
        weights = path.with_suffix(".weights")
        print(f"{path}: {path.stat().st_size / 2**20:.1f} MB graph, "
              f"{weights.stat().st_size / 2**30:.1f} GB sparse weights")
        if args.check:
            assert param_count(**PRESETS[name]) == EXPECTED_PARAMS[name]
            problems = check_graph(path, EXPECTED_PARAMS[name], PRESETS[name]["vocab"])
            failed |= bool(problems)
            print("  check: " + ("ok" if not problems else "; ".join(problems)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
