"""`costlens validate` and the graph executor (needs the torch extra)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")

from click.testing import CliRunner  # noqa: E402

import costlens  # noqa: E402
from conftest import FIXTURES, TORCH_FIXTURES  # noqa: E402
from costlens.cli import main  # noqa: E402
from costlens.gradients import analyze  # noqa: E402
from costlens.measure.executor import GraphExecutor, initializer_values  # noqa: E402
from costlens.plans import parse_plan_spec  # noqa: E402


def run(*args):
    return CliRunner().invoke(main, list(args))


CONTRIB_FIXTURES = ["genai_dense", "genai_moe"]      # onnxruntime-genai dialect (fixtures/build_contrib.py)


def _ours_and_onnxruntime(path, seq: int, seed: int):
    """(model, executor module, its logits, onnxruntime's logits) on the same random ids [2, seq]."""
    import onnxruntime as ort
    model = costlens.load(path)
    plan = parse_plan_spec("full")
    module = GraphExecutor(model, initializer_values(path), analyze(model, plan, {"batch": 2, "seq": seq}), plan)
    ids = torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = module(ids).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    return model, module, ours, reference


@pytest.mark.parametrize("name", TORCH_FIXTURES + CONTRIB_FIXTURES)
def test_executor_reproduces_onnxruntime(name):
    """The graph run as a torch module computes what onnxruntime computes from the same file."""
    path = FIXTURES / f"{name}.onnx"
    model, module, ours, reference = _ours_and_onnxruntime(path, 16, seed=1)
    assert np.abs(ours - reference).max() < 1e-3
    # one parameter per structural use, as in the torch module (the tie counted once)
    assert sum(p.numel() for p in module.parameters()) == model.roles.params_total


def test_validate_within_tolerance_json():
    result = run("validate", str(FIXTURES / "llama.onnx"), "--lora", "attn", "--seq", "32", "--batch", "2", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema"] == "costlens.validate/1" and document["ok"]
    by_name = {c["quantity"]: c for c in document["comparisons"]}
    assert by_name["trainable params"]["estimated"] == by_name["trainable params"]["measured"] == 7168
    assert abs(by_name["peak bytes"]["error"]) < 0.05
    assert "measuring" not in result.stderr       # progress only on a terminal's stderr, never into a pipe


def test_validate_outside_tolerance_exits_1():
    # no estimate is exact to the byte (the measured step also keeps the input ids): zero tolerance fails
    result = run("validate", str(FIXTURES / "gpt2.onnx"), "--seq", "16", "--tolerance", "0")
    assert result.exit_code == 1
    assert "OUTSIDE" in result.stdout


@pytest.mark.parametrize("args, cause", [
    (["--precision", "bf16-mixed"], "fp32"),
    (["--attention", "fused"], "eager"),
    (["--optimizer", "adafactor"], "adamw, sgd or sgd-momentum"),
])
def test_validate_refuses_what_it_cannot_measure(args, cause):
    result = run("validate", str(FIXTURES / "llama.onnx"), "--seq", "16", *args)
    assert result.exit_code == 2 and cause in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_validate_says_which_op_it_cannot_run(monkeypatch):
    from costlens.measure import torch_ops
    monkeypatch.delitem(torch_ops.OPS, "com.microsoft.GroupQueryAttention")
    result = run("validate", str(FIXTURES / "genai_dense.onnx"), "--seq", "16")
    line = result.stderr.splitlines()[-1]
    assert result.exit_code == 2 and "no implementation of" in line and "GroupQueryAttention" in line


def _contrib_variant(tmp_path, name: str, scale: float, attrs: dict):
    """A copy of a genai fixture with its matrices scaled (so that attention and routing are far
    from uniform) and attributes of its contrib ops overridden: {op_type: {attribute: value}}."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(str(FIXTURES / f"{name}.onnx"))
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor)
        if value.dtype == np.float32 and value.ndim >= 2 and "cache" not in tensor.name:
            tensor.CopyFrom(numpy_helper.from_array(value * scale, tensor.name))
    for node in model.graph.node:
        overrides = attrs.get(node.op_type, {})
        kept = [a for a in node.attribute if a.name not in overrides]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute(k, v) for k, v in overrides.items()])
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("name, attrs", [
    ("genai_dense", {}),
    ("genai_dense", {"GroupQueryAttention": {"softcap": 2.0}}),
    ("genai_dense", {"GroupQueryAttention": {"local_window_size": 4}}),
    ("genai_dense", {"GroupQueryAttention": {"rotary_interleaved": 1}}),
    ("genai_moe", {}),
    ("genai_moe", {"MoE": {"normalize_routing_weights": 0}}),
    ("genai_moe", {"MoE": {"activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 0.5}}),
    ("genai_moe", {"MoE": {"k": 1}}),
])
def test_contrib_ops_match_onnxruntime_far_from_uniform(tmp_path, name, attrs):
    """GroupQueryAttention (RoPE, causal, local window, softcap), MoE (routing, SwiGLU variants) and
    the simplified norms as the executor runs them, against onnxruntime, with weights large
    enough that a wrong rotation, mask or gate/up order shows."""
    path = _contrib_variant(tmp_path, name, 8.0, attrs)
    _, _, ours, reference = _ours_and_onnxruntime(path, 24, seed=2)
    assert np.abs(reference).max() > 1.0
    assert np.abs(ours - reference).max() < 1e-3


@pytest.mark.parametrize("name, args", [
    ("genai_dense", []),
    ("genai_dense", ["--freeze", "attn"]),
    ("genai_dense", ["--lora", "attn", "--rank", "8"]),
    ("genai_moe", []),
    ("genai_moe", ["--freeze", "attn"]),
    ("genai_moe", ["--lora", "attn", "--rank", "8"]),
    ("genai_moe", ["--train", "router"]),
    ("genai_moe", ["--train", "experts", "--batch", "4", "--seq", "64"]),
])
def test_validate_contrib_graphs_within_tolerance(name, args):
    """Fused GroupQueryAttention / MoE / simplified norms: priced as the executor trains them."""
    result = run("validate", str(FIXTURES / f"{name}.onnx"), "--seq", "32", "--batch", "2", *args, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    by_name = {c["quantity"]: c for c in json.loads(result.stdout)["comparisons"]}
    assert by_name["trainable params"]["estimated"] == by_name["trainable params"]["measured"]
    assert abs(by_name["step FLOPs"]["error"]) < 0.01
    assert abs(by_name["activation bytes"]["error"]) < 0.02 and abs(by_name["peak bytes"]["error"]) < 0.02


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no CUDA device exists")
def test_validate_cuda_without_a_gpu():
    result = run("validate", str(FIXTURES / "llama.onnx"), "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device" in result.stderr


def test_validate_with_onnxruntime_inference_row():
    result = run("validate", str(FIXTURES / "llama.onnx"), "--seq", "32", "--inference", "--json")
    assert result.exit_code == 0, result.stderr
    row = next(c for c in json.loads(result.stdout)["comparisons"] if c["quantity"].startswith("inference"))
    # weights alone are 158,016 x 4 bytes; the session also holds activations and its arena
    assert row["measured"] > 158_016 * 4 and row["tolerance"] is None and row["ok"]


def test_compare_validate_attaches_measurements_to_the_report(tmp_path):
    html = tmp_path / "report.html"
    result = run("compare", str(FIXTURES / "llama.onnx"), "--plan", "lora:lora=attn", "--seq", "32", "--batch", "2",
                 "--validate", "cpu", "--html", str(html), "--json")
    assert result.exit_code == 0, result.stderr
    (plan,) = json.loads(result.stdout)["plans"]
    peak = plan["validation"]["peak bytes"]
    assert abs(peak["error"]) < 0.05 and peak["measured"] > 0
    assert "peak bytes" in html.read_text()


class _Ctx:
    """A SavedContext over explicit flags and shapes (fp32), for one contrib node."""

    def __init__(self, shapes: dict, needs: set, trains: bool):
        self._shapes, self._needs, self._trains = shapes, needs, trains

    def needs(self, tensor):
        return tensor in self._needs

    receives = needs

    def is_weight(self, tensor):
        return tensor.startswith("w")

    def trains(self, node):
        return self._trains

    def is_fused_inner(self, tensor):
        return False

    def rows(self, tensor):
        shape = self._shapes[tensor]
        return int(np.prod(shape)) // shape[-1]

    def stat_bytes(self):
        return 4

    def shape(self, tensor):
        return self._shapes.get(tensor)

    def act_bytes(self, op=""):
        return 4

    def fused_attention(self):
        return False

    def weight_bytes(self):
        return 4


def _saved_bytes(fn, args, exclude) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, beyond ``exclude``'s."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    return sum(n for ptr, n in storages.items() if ptr not in skip)


def _rule_bytes(node, ctx) -> int:
    from costlens.ops.saved import Extra, saved_by
    found = {}                           # one storage per key, as storages.collect_saved counts them
    for item in saved_by(node, ctx):
        if isinstance(item, Extra):
            found[item.key] = item.n_bytes
        elif item not in node.inputs:
            found[item] = 4 * int(np.prod(ctx.shape(item)))
    return sum(found.values())


def _node(op, inputs, outputs, **attrs):
    from types import MappingProxyType
    from costlens.ir import Node
    return Node(name="n", op=op, inputs=tuple(inputs), outputs=tuple(outputs), attrs=MappingProxyType(attrs))


@pytest.mark.parametrize("needs_x, needs_router, trains", [
    (x, r, t) for x in (False, True) for r in (False, True) for t in (False, True)])
@pytest.mark.parametrize("attrs", [
    {"activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 1},
    {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.702, "activation_beta": 1.0,
     "swiglu_limit": 7.0},
    {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_beta": 1.0},
    {"activation_type": "relu"},
    {"activation_type": "gelu", "normalize_routing_weights": 1},
])
def test_moe_saved_rule_is_what_the_torch_moe_saves(needs_x, needs_router, trains, attrs):
    from costlens.measure.torch_ops import OPS
    tokens, d, f, e, k = 48, 16, 24, 4, 2
    up = 2 * f if attrs["activation_type"] == "swiglu" else f
    node = _node("com.microsoft.MoE", ["x", "r", "w1", "", "w2"], ["y"], k=k, **attrs)
    x = torch.randn(2, tokens // 2, d, requires_grad=needs_x)
    r = torch.randn(tokens, e, requires_grad=needs_router)
    w1, w2 = torch.randn(e, up, d, requires_grad=trains), torch.randn(e, d, f, requires_grad=trains)
    measured = _saved_bytes(lambda *a: OPS[node.op](node, *a), [x, r, w1, None, w2], [x, r, w1, w2])
    ctx = _Ctx({"x": (2, tokens // 2, d), "r": (tokens, e), "w1": (e, up, d), "w2": (e, d, f)},
               {n for n, flag in (("x", needs_x), ("r", needs_router)) if flag}, trains)
    assert _rule_bytes(node, ctx) == measured


@pytest.mark.parametrize("needs", [set(s) for s in ("q", "k", "v", "qk", "qv", "kv", "qkv", "")])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_group_query_attention_saved_rule_is_what_eager_attention_saves(needs, softcap):
    from costlens.measure.torch_ops import OPS
    b, s, heads, kv_heads, hd = 2, 12, 4, 2, 8
    node = _node("com.microsoft.GroupQueryAttention", ["q", "k", "v", "", "", "", "", "wcos", "wsin"], ["o"],
                 num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, softcap=softcap)
    q = torch.randn(b, s, heads * hd, requires_grad="q" in needs)
    k = torch.randn(b, s, kv_heads * hd, requires_grad="k" in needs)
    v = torch.randn(b, s, kv_heads * hd, requires_grad="v" in needs)
    cos, sin = torch.randn(32, hd // 2), torch.randn(32, hd // 2)
    measured = _saved_bytes(lambda *a: OPS[node.op](node, *a), [q, k, v, None, None, None, None, cos, sin],
                            [q, k, v, cos, sin])
    ctx = _Ctx({"q": (b, s, heads * hd), "k": (b, s, kv_heads * hd), "v": (b, s, kv_heads * hd)}, needs, False)
    assert _rule_bytes(node, ctx) == measured


@pytest.mark.parametrize("needs_x, trains", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("op", ["SimplifiedLayerNormalization", "com.microsoft.SkipSimplifiedLayerNormalization"])
def test_simplified_norm_saved_rules_are_what_rmsnorm_saves(needs_x, trains, op):
    from costlens.measure.torch_ops import OPS
    shape = (2, 12, 16)
    skip = op.startswith("com.")
    node = _node(op, ["x", "skip", "w"] if skip else ["x", "w"], ["y", "", "", "s"] if skip else ["y"])
    x, residual = torch.randn(shape, requires_grad=needs_x), torch.randn(shape)
    w = torch.randn(shape[-1], requires_grad=trains)
    args = [x, residual, w] if skip else [x, w]
    measured = _saved_bytes(lambda *a: OPS[op](node, *a), args, args)
    needs = {"x", "y", "s"} if needs_x else ({"y"} if trains else set())
    assert _rule_bytes(node, _Ctx({"x": shape, "skip": shape, "s": shape}, needs, trains)) == measured
