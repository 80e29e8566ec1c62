"""Step FLOPs (costlens/flops.py) on the llama fixture, derived by hand from its dimensions:
which gradients autograd computes (an input gradient only where something upstream trains, a
weight gradient only for trainable weights) and what non-reentrant checkpointing replays.
FLOPs count matmuls, as torch.utils.flop_counter does: 2 per multiply-add."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import costlens
from costlens.estimate import estimate
from costlens.plans import Setup, parse_plan_spec

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ARCH = json.loads((FIXTURES / "llama.truth.json").read_text())["architecture"]
H, F, V, LAYERS = ARCH["hidden"], ARCH["ffn"], ARCH["vocab"], ARCH["layers"]
HEADS, KV = ARCH["heads"], ARCH["kv_heads"]
D = H // HEADS
B, S = 2, 16
T = B * S

Q, KV_W, O = H * H, H * KV * D, H * H                 # q, each of k and v, o weights (elements)
ATTN_W = Q + 2 * KV_W + O
FFN_W = 3 * H * F                                      # gate, up (H x F) and down (F x H)
BMM = 2 * B * HEADS * S * S * D                        # one of QK^T, PV (per layer)
HEAD = 2 * T * H * V
LAYER = 2 * T * (ATTN_W + FFN_W) + 2 * BMM             # one decoder layer's forward
FORWARD = LAYERS * LAYER + HEAD


def _flops(spec: str, checkpointing: bool = False):
    model = costlens.load(FIXTURES / "llama.onnx")
    return estimate(model, parse_plan_spec(spec), Setup(batch=B, seq=S, checkpointing=checkpointing)).flops


def test_forward_is_the_matmuls_of_every_layer_and_the_head():
    assert _flops("full").forward == FORWARD


def test_full_fine_tuning_takes_both_gradients_of_every_matmul():
    flops = _flops("full")
    assert flops.backward_weight == 2 * T * (LAYERS * (ATTN_W + FFN_W) + H * V)   # the embedding's is a scatter
    # every input needs its gradient: one product per linear, two per score product (both sides are inputs)
    assert flops.backward_input == FORWARD + LAYERS * 2 * BMM
    assert flops.step == 3 * FORWARD      # a score product has no weight gradient but two input ones


def test_a_trainable_head_alone_needs_its_weight_gradient_only():
    flops = _flops("train=head")
    assert (flops.backward_input, flops.backward_weight) == (0, HEAD)


def test_a_trainable_embedding_needs_every_input_gradient_and_no_weight_matmul():
    flops = _flops("train=embed")
    assert (flops.backward_input, flops.backward_weight) == (FORWARD + LAYERS * 2 * BMM, 0)


def test_lora_on_q_stops_the_input_gradients_where_nothing_upstream_trains():
    r = 4
    flops = _flops(f"lora=q;rank={r}")
    adapter = 2 * T * (H * r + r * H)                    # A then B, per layer
    assert flops.forward == FORWARD + LAYERS * adapter
    assert flops.backward_weight == LAYERS * adapter     # dA and dB: the same products as forward
    last = 2 * T * (ATTN_W + FFN_W) + 4 * BMM + adapter   # layer 1: every input gradient (it feeds layer 0's q)
    # layer 0: nothing before q trains, so no gradient into q/k/v's input nor A's input, none for K or V
    # in the score products; o, the FFN, dS and dQ, and B's input (for dA) are still needed
    first = 2 * T * (O + FFN_W) + 2 * BMM + 2 * T * r * H
    assert flops.backward_input == HEAD + last + first


def test_checkpointing_replays_each_layer_up_to_its_last_saved_input():
    # non-reentrant checkpointing recomputes until every tensor backward needs exists again:
    # the down projection's output is saved by nothing, so it is not replayed
    assert _flops("full", checkpointing=True).recompute == LAYERS * (LAYER - 2 * T * F * H)
    assert _flops("full").recompute == 0


@pytest.mark.parametrize("spec", ["full", "lora=attn;rank=8", "train=head"])
def test_step_is_forward_backward_and_recompute(spec):
    flops = _flops(spec, checkpointing=True)
    assert flops.step == flops.forward + flops.backward_input + flops.backward_weight + flops.recompute
    assert flops.unpriced == ()
