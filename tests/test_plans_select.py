"""Scoped selectors (``q@layers:0``): a selector narrowed by another, for PEFT's
layers_to_transform and per-layer ranks; counts derived by hand on the bundled llama fixture
(2 layers, hidden 64, 4 heads of 16, 2 KV heads, FFN 176; fixtures/llama.truth.json)."""
from __future__ import annotations

from pathlib import Path

import pytest

import costlens
from costlens.errors import PlanError
from costlens.plans import Plan, Setup, select

LLAMA = Path(__file__).resolve().parent.parent / "fixtures" / "llama.onnx"


@pytest.fixture(scope="module")
def llama():
    return costlens.load(LLAMA)


def test_scope_narrows_a_role_to_layers(llama):
    roles = llama.roles
    q_all = select(roles.params, "q", roles)
    q_0 = select(roles.params, "q@layers:0", roles)
    assert len(q_all) == 2 and len(q_0) == 1 and q_0 < q_all


def test_lora_on_a_layer_range_by_hand(llama):
    setup = Setup(seq=32)
    # q in layer 0 only at r8: 8·(64 + 64) = 1,024; v in both layers: 2 x 8·(64 + 32) = 1,536
    plan = Plan(name="x", lora=("q@layers:0", "v"), rank=8)
    assert costlens.estimate(llama, plan, setup).params.trainable == 1_024 + 1_536
    # full FFN of layer 1 trained: gate and up 64·176 each, down 176·64
    trained = costlens.estimate(llama, Plan(name="y", train=("ffn@layers:1",)), setup)
    assert trained.params.trainable == 3 * 64 * 176


@pytest.mark.parametrize("selector, needle", [
    ("q@", "SELECTOR@SCOPE"), ("@layers:0", "SELECTOR@SCOPE"), ("q@layers:7", "layers 0-1"),
    ("q@embed", "selects no parameter"),
])
def test_bad_scopes_are_named(llama, selector, needle):
    with pytest.raises(PlanError, match=needle):
        select(llama.roles.params, selector, llama.roles)
