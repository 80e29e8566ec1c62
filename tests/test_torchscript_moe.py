"""MoE exports of the TorchScript ONNX exporter (issue 9): the routed token-slots are shapes in
batch and seq, not fresh symbols.

TorchScript writes ``x.repeat(1, k, 1)`` as Tile(x, Reshape(OneHot([1], 3, [1, k]), [-1])) and the
slots as Flatten(tile, axis=2). onnxruntime's symbolic inference has no value for OneHot and no
rule for Flatten, so ``tokens*k`` became a per-layer symbol and the expert matmuls went unpriced.
Expected values below come from the truth files' top-k and from hand arithmetic."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import costlens
from costlens.plans import parse_plan_spec
from costlens.frontends.onnx import load_onnx
from costlens.shapes import eval_shape

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
INDEX = json.loads((CORPUS / "index.json").read_text())
TORCHSCRIPT_MOE = sorted(arch for arch, entry in INDEX["archs"].items()
                         if entry["exporters"].get("torchscript", {}).get("status") == "ok"
                         and json.loads((CORPUS / f"{arch}.truth.json").read_text())["architecture"].get("experts"))
AT = {"batch": 2, "seq": 16}


def _int(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype="int64"), name)


def _routed_repeat_model(d: int = 8, experts: int = 4, k: int = 2, f: int = 6) -> onnx.ModelProto:
    """x [batch, seq, d] -> router [d, E] -> TopK k; x repeated k times the TorchScript way,
    flattened to slots and multiplied by a [d, f] weight: [batch*seq*k, f]."""
    inits = [
        numpy_helper.from_array(np.zeros((d, experts), "float32"), "router"),
        numpy_helper.from_array(np.zeros((d, f), "float32"), "w"),
        _int("flat", [-1, d]), _int("k", [k]), _int("minus1", [-1]), _int("big", [2**62]), _int("zero", [0]),
        _int("one", [1]), _int("one_hot_index", [1]), _int("depth", 3), _int("minus1_all", [-1]),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["h"]),                       # [t, d]
        helper.make_node("MatMul", ["h", "router"], ["logits"]),                 # [t, E]
        helper.make_node("TopK", ["logits", "k"], ["top_w", "top_i"]),           # [t, k]
        helper.make_node("Shape", ["top_i"], ["top_shape"]),
        helper.make_node("Slice", ["top_shape", "minus1", "big", "zero"], ["k_vec"]),   # [k]
        helper.make_node("Concat", ["one", "k_vec"], ["on_off"], axis=0),       # [off=1, on=k]
        helper.make_node("OneHot", ["one_hot_index", "depth", "on_off"], ["one_hot"]),   # [[1, k, 1]]
        helper.make_node("Reshape", ["one_hot", "minus1_all"], ["repeats"]),    # [1, k, 1]
        helper.make_node("Unsqueeze", ["h", "one"], ["h1"]),                    # [t, 1, d]
        helper.make_node("Tile", ["h1", "repeats"], ["tiled"]),                 # [t, k, d]
        helper.make_node("Flatten", ["tiled"], ["slots"], axis=2),              # [t*k, d]
        helper.make_node("MatMul", ["slots", "w"], ["y"]),                      # [t*k, f]
    ]
    graph = helper.make_graph(
        nodes, "routed_repeat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_one_hot_repeats_and_flatten_keep_tokens_times_k(tmp_path):
    path = tmp_path / "routed.onnx"
    onnx.save(_routed_repeat_model(), path)
    graph = load_onnx(path)
    # t = 2 * 16 = 32 tokens, k = 2: 64 slots of width d = 8, then f = 6
    assert eval_shape(graph.shape("tiled"), AT) == (32, 2, 8)
    assert eval_shape(graph.shape("slots"), AT) == (64, 8)
    assert eval_shape(graph.shape("y"), AT) == (64, 6)
    # and at another size: t = 3 * 5 = 15 tokens, 30 slots
    assert eval_shape(graph.shape("y"), {"batch": 3, "seq": 5}) == (30, 6)


def test_flatten_of_a_symbolic_tensor_is_the_products(tmp_path):
    nodes = [helper.make_node("Flatten", ["x"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "flatten", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "flatten.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert eval_shape(load_onnx(path).shape("y"), AT) == (2, 64)      # [batch, seq*4]


def _top_k(arch: str) -> int:
    """Experts per token, from the truth file (the transformers config, not the graph)."""
    return json.loads((CORPUS / f"{arch}.truth.json").read_text())["architecture"]["top_k"]


@pytest.mark.parametrize("arch", TORCHSCRIPT_MOE)
def test_expert_matmuls_run_on_tokens_times_k(arch):
    graph = load_onnx(CORPUS / f"{arch}.torchscript.onnx")
    k = _top_k(arch)
    expert_mats = {c for c in graph.constants if len(graph.constants[c].shape) == 3}
    slots = set()
    for node in graph.nodes:
        if node.op == "Gather" and node.inputs[0] in expert_mats:
            shape = eval_shape(graph.shape(node.outputs[0]), AT)
            assert shape is not None, (arch, node.name, graph.shape(node.outputs[0]))
            slots.add(shape[0])
    # every gathered expert matrix is one per routed (token, expert) slot: batch*seq*k of them
    assert slots == {AT["batch"] * AT["seq"] * k}, (arch, slots)


@pytest.mark.parametrize("arch", TORCHSCRIPT_MOE)
def test_torchscript_moe_estimate_prices_every_op(arch):
    model = costlens.load(CORPUS / f"{arch}.torchscript.onnx")
    result = costlens.estimate(model, parse_plan_spec("full"), costlens.Setup(**AT))
    assert result.flops.unpriced == ()
    assert dict(result.unsupported_ops) == {}


def test_mixtral_torchscript_forward_flops_by_hand():
    # tiny Mixtral (fixtures/hf/mixtral.config.json): hidden 64, 4 heads / 2 kv heads of 16,
    # experts 4 x (gate_up 64->128, down 64->64), top-2, vocab 256, 2 layers; t = 2*16 = 32 tokens
    t, slots = 32, 32 * 2
    projections = 2 * t * 64 * (64 + 32 + 32 + 64)        # q, k, v, o: 786,432
    core = 2 * (2 * 2 * 4 * 16 * 16 * 16)                   # QK^T and PV: 131,072
    router = 2 * t * 64 * 4                                  # 16,384
    experts = 2 * slots * (64 * 128 + 64 * 64)               # routed slots only: 1,572,864
    head = 2 * t * 64 * 256                                  # 1,048,576
    expected = 2 * (projections + core + router + experts) + head   # 6,062,080
    model = costlens.load(CORPUS / "mixtral.torchscript.onnx")
    assert costlens.estimate(model, parse_plan_spec("full"), costlens.Setup(**AT)).flops.forward == expected
