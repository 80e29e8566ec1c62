"""Stacked FFN sublayers (costlens/stacking.py): the copies' parameters and forward FLOPs by hand
from the llama fixture's dimensions, and the refusals where a copy cannot be placed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import costlens
from costlens.errors import PlanError
from costlens.estimate import estimate
from costlens.plans import Setup, parse_plan_spec
from costlens.roles.types import Role
from costlens.stacking import STACKED_PREFIX, stack_ffn

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TRUTH = json.loads((FIXTURES / "llama.truth.json").read_text())
ARCH = TRUTH["architecture"]
H, FFN, LAYERS = ARCH["hidden"], ARCH["ffn"], ARCH["layers"]
SETUP = Setup(batch=2, seq=16)
TOKENS = SETUP.batch * SETUP.seq


def _sublayer_params(width: int) -> tuple[int, int]:
    """(matmul weights, RMSNorm weight) of one gated FFN copy: gate and up H x width, down width x H."""
    return 3 * H * width, H


@pytest.fixture(scope="module")
def llama():
    return costlens.load(FIXTURES / "llama.onnx")


@pytest.mark.parametrize("copies, width", [(1, None), (2, None), (1, 32)])
def test_copies_add_their_parameters_and_forward_flops(llama, copies, width):
    spec = f"stack-ffn={copies};train=stacked" + (f";stack-ffn-width={width}" if width else "")
    base = estimate(llama, parse_plan_spec("full"), SETUP)
    stacked = estimate(llama, parse_plan_spec(spec), SETUP)
    matmul, norm = _sublayer_params(width or FFN)
    added = copies * LAYERS * (matmul + norm)
    assert base.params.total == TRUTH["params_total"]
    assert stacked.params.total == TRUTH["params_total"] + added
    assert stacked.params.trainable == added            # train=stacked selects the copies only
    # forward FLOPs count the matmuls (as FlopCounterMode does): 2 per multiply-add per token
    assert stacked.flops.forward - base.flops.forward == copies * LAYERS * 2 * TOKENS * matmul


def test_copies_follow_each_blocks_last_ffn_and_are_found_as_ffn(llama):
    graph = stack_ffn(llama.graph, llama.roles, copies=1)
    names = [n for n in graph.constants if n.startswith(STACKED_PREFIX)]
    assert {n.split("/")[1].split(".")[0] for n in names} == {str(i) for i in range(LAYERS)}
    assert graph.outputs == llama.graph.outputs            # the head still reads the (new) stream
    assert len(graph.nodes) > len(llama.graph.nodes)
    roles = costlens.load(FIXTURES / "stacked_ffn.onnx").roles   # an exported stack: two FFN units per block
    assert sum(u.role is Role.FFN for u in roles.ffn_units) == 2 * roles.architecture.layers


def test_post_norm_blocks_are_refused():
    bert = costlens.load(FIXTURES / "bert.onnx")
    with pytest.raises(PlanError, match="pre-norm"):
        estimate(bert, parse_plan_spec("stack-ffn=1"), SETUP)


def test_moe_blocks_are_refused():
    moe = costlens.load(FIXTURES / "moe.onnx")
    with pytest.raises(PlanError, match="dense FFN"):
        estimate(moe, parse_plan_spec("stack-ffn=1"), SETUP)
