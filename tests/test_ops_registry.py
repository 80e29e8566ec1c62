"""The op registry is the cost table: every registered op has a FLOP rule, a backward rule and a
saved-tensor rule, each a function or an explicit zero with its reason; an op without a rule is
unknown and makes the result incomplete; flops.py dispatches on no op name or family."""
from __future__ import annotations

import inspect
import pathlib
from collections import Counter
from types import MappingProxyType

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import costlens.flops
from costlens.api import Model, unknown_ops
from costlens.estimate import estimate
from costlens.frontends.onnx import load_onnx
from costlens.ir import Node
from costlens.ops.registry import Family, Zero, known, lookup, register, registered
from costlens.plans import Setup, parse_plan_spec
from costlens.roles import locate_roles
from costlens.roles.blocks import FUSED_ATTENTION_OPS

RULES = registered()


@pytest.mark.parametrize("op", sorted(RULES))
def test_every_registered_op_has_a_flop_backward_and_saved_rule(op):
    rule = RULES[op]
    assert isinstance(rule.family, Family)
    for facet in ("flops", "backward", "saved"):
        value = getattr(rule, facet)
        assert callable(value) or (isinstance(value, Zero) and value.reason.strip()), f"{op}: no {facet} rule"
    if isinstance(rule.flops, Zero):
        assert isinstance(rule.backward, Zero), f"{op}: a zero forward with a backward formula"
    else:
        assert callable(rule.backward), f"{op}: FLOPs without backward FLOPs"


def test_the_registry_refuses_duplicates_and_half_rules():
    with pytest.raises(ValueError, match="registered twice"):
        register("MatMul", family=Family.MATMUL, flops=Zero("x"), saved=Zero("x"))
    with pytest.raises(ValueError, match="without a backward"):
        register("NotAnOp", family=Family.MATMUL, flops=lambda node, ctx: 0, saved=Zero("x"))
    assert not known("NotAnOp")


def test_the_ops_the_role_locator_prices_have_real_rules():
    # fused attention ops and the linears the issue names are priced, not zero
    for op in list(FUSED_ATTENTION_OPS) + ["MatMul", "Gemm", "Einsum", "com.microsoft.FusedMatMul", "Conv",
                                           "com.microsoft.MoE"]:
        assert callable(lookup(op).flops), op
    for op in ("HardSigmoid", "PRelu", "Softsign", "com.microsoft.Gelu", "BatchNormalization",
               "GroupNormalization", "InstanceNormalization"):
        assert callable(lookup(op).saved), op


def test_flops_dispatches_on_no_op_name_or_family():
    source = inspect.getsource(costlens.flops)
    assert "Family" not in source and "node.op ==" not in source and "node.op in" not in source
    assert '"MatMul"' not in source and '"Gemm"' not in source


def test_ops_without_a_rule_are_unknown_and_the_estimate_incomplete(tmp_path):
    nodes = [Node("a", "MatMul", ("x", "w"), ("h",)), Node("b", "com.microsoft.QMoE", ("h", "r"), ("y",)),
             Node("c", "FancyOp", ("y",), ("z",)), Node("d", "FancyOp", ("z",), ("o",))]
    graph = type("G", (), {"nodes": nodes})()
    assert dict(unknown_ops(graph)) == {"FancyOp": 2, "com.microsoft.QMoE": 1}
    model = _model(tmp_path, helper.make_node("MatMul", ["x", "W1"], ["h0"]), "unknown", custom=True)
    assert model.incomplete
    result = estimate(model, parse_plan_spec("full"), Setup(batch=2, seq=3))
    assert dict(model.unknown_ops) == {"custom.FancyOp": 1}
    assert result.unsupported_ops["custom.FancyOp"] == 1        # reported by name and count


# --------------------------------------------------------------------------- end to end

def _model(tmp_path: pathlib.Path, first, name: str, custom: bool = False) -> Model:
    """x [batch, seq, 8] -> first (x, W1 [8, 16]) -> [FancyOp, an op without a rule] -> h ->
    Relu -> MatMul W2 [16, 4] -> logits, every shape declared."""
    nodes = [first]
    if custom:
        nodes.append(helper.make_node("FancyOp", [first.output[0]], ["h"], domain="custom"))
    nodes += [helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["logits"])]
    inits = [numpy_helper.from_array(np.zeros(s, np.float32), n) for n, s in (("W1", (8, 16)), ("W2", (16, 4)))]
    infos = [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["batch", "seq", 16]) for t in ("h0", "h", "r")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 4])],
                              inits, value_info=infos)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("custom", 1)]
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    ir = load_onnx(path)
    return Model(ir, locate_roles(ir, require_attention=False), unknown_ops(ir))


def test_an_einsum_linear_is_priced_as_the_matmul_it_replaces(tmp_path):
    matmul = _model(tmp_path, helper.make_node("MatMul", ["x", "W1"], ["h"]), "matmul")
    einsum = _model(tmp_path, helper.make_node("Einsum", ["x", "W1"], ["h"], equation="bsd,df->bsf"), "einsum")
    assert not einsum.incomplete
    for spec in ("full", "train=all"):
        plan, setup = parse_plan_spec(spec), Setup(batch=2, seq=3)
        ours, theirs = estimate(einsum, plan, setup), estimate(matmul, plan, setup)
        # forward: x [6 tokens, 8] @ W1 [8, 16] = 2*6*8*16 = 1536, r [6, 16] @ W2 [16, 4] = 768
        assert ours.flops.forward == 1536 + 768
        assert ours.flops == theirs.flops
        assert ours.memory == theirs.memory


def test_a_known_op_is_never_a_silent_zero():
    # the ops issue 9 found priced at zero are now priced from their shapes
    ctx = type("C", (), {"shape": lambda self, t: {"x": (2, 3, 8), "w": (8, 16), "y": (2, 3, 16)}.get(t),
                         "is_weight": lambda self, t: t == "w"})()
    for op, attrs in (("Einsum", {"equation": "bsd,df->bsf"}), ("com.microsoft.FusedMatMul", {})):
        node = Node("n", op, ("x", "w"), ("y",), MappingProxyType(attrs))
        assert lookup(op).forward_flops(node, ctx) == 2 * 6 * 8 * 16 == 1536


def test_registry_counts():
    families = Counter(rule.family for rule in RULES.values())
    assert families[Family.MATMUL] == 5 and families[Family.FUSED_ATTENTION] == 8
    assert not known("com.microsoft.QMoE")       # no trustworthy rule: unknown, never zero
