"""Estimate goldens derived by hand (arithmetic beside each), and invariants. No torch."""
from __future__ import annotations

import pytest

from costlens.estimate import estimate
from costlens.plans import Setup, parse_plan_spec

SETUP = Setup(batch=2, seq=32)   # T = 64 tokens


def test_llama_forward_flops_golden(loaded):
    # per layer, T=64, d=64, kv width 32, F=176, 4 heads x 16, seq 32:
    #   q, o: 2*64*64*64 = 524288 each; k, v: 2*64*64*32 = 262144 each
    #   QKᵀ and PV: 2*(2*4*32)*16*32 = 262144 each
    #   gate, up, down: 2*64*64*176 = 1441792 each -> 4325376
    #   layer = 2*524288 + 4*262144 + 4325376 = 6422528
    # lm_head: 2*64*64*512 = 4194304; total = 2*6422528 + 4194304 = 17039360
    result = estimate(loaded("llama"), parse_plan_spec("full"), SETUP)
    assert result.flops.forward == 17_039_360
    assert result.flops.backward == 2 * 17_039_360   # everything trains: dX and dW everywhere


def test_moe_experts_priced_at_k_of_e_tokens(loaded):
    # attention per layer as llama: 2*524288 + 4*262144 = 2097152; router 2*64*64*4 = 32768
    # experts: 64 tokens x top-2 = 128 expert-token pairs x 3 matmuls x 2*64*96 = 4718592
    # layer = 6848512; two layers + lm_head 4194304 = 17891328
    result = estimate(loaded("moe"), parse_plan_spec("full"), SETUP)
    assert result.flops.forward == 17_891_328
    # parameters count all E experts; active per token counts k of them:
    # experts 147456 total, half active (k/E = 2/4) -> 238400 - 73728 = 164672
    assert result.params.total == 238_400
    assert result.params.active_per_token == 238_400 - 147_456 // 2


def test_lora_forward_adds_two_thin_matmuls_per_target(loaded):
    # r=8 on q (64->64): 2*64*64*8 + 2*64*8*64 = 131072; o the same; k, v (64->32): 65536 + 32768 = 98304
    # per layer 2*131072 + 2*98304 = 458752; two layers = 917504
    base = estimate(loaded("llama"), parse_plan_spec("full"), SETUP).flops.forward
    lora = estimate(loaded("llama"), parse_plan_spec("lora=attn;rank=8"), SETUP).flops.forward
    assert lora - base == 917_504


def test_frozen_first_layers_need_no_backward_below_the_lowest_trainable(loaded):
    # only layer 1 trains: layer 0 runs no backward at all; layer 1 runs dX and dW
    # (its input needs no gradient, but dX is needed between its own trainable ops);
    # the head is frozen but its dX carries the gradient down: 4194304
    result = estimate(loaded("llama"), parse_plan_spec("train=layers:1"), SETUP)
    layer = 6_422_528
    # layer 1: dW of its 7 weight matmuls (QKᵀ and PV have no weight): layer - 2*262144
    # dX: q/k/v read the normed input (its norm weight trains, so it needs a gradient), so every
    # weight matmul of layer 1 needs dX once; QKᵀ and PV have two activation operands, each
    # needing its own gradient (dQ, dK; dP, dV): layer + 2*262144; plus the frozen head's dX
    assert result.flops.backward_weight == layer - 2 * 262_144
    assert result.flops.backward_input == layer + 2 * 262_144 + 4_194_304


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16])
def test_lora_params_are_linear_in_rank(loaded, rank):
    # per layer q,o: r*(64+64), k,v: r*(64+32) -> r*448; two layers -> r*896
    result = estimate(loaded("llama"), parse_plan_spec(f"lora=attn;rank={rank}"), SETUP)
    assert result.params.adapter == 896 * rank


def test_costs_grow_with_batch_and_seq(loaded):
    model, plan = loaded("gpt2"), parse_plan_spec("full")
    small = estimate(model, plan, Setup(batch=1, seq=16)).flops.step
    assert estimate(model, plan, Setup(batch=2, seq=16)).flops.step == 2 * small   # linear in batch
    assert estimate(model, plan, Setup(batch=1, seq=32)).flops.step > 2 * small    # attention is quadratic in seq


def test_tied_head_trains_with_the_embedding(loaded):
    only_head = estimate(loaded("gpt2"), parse_plan_spec("train=head"), SETUP)
    assert only_head.params.trainable == 512 * 64   # one tensor, counted once
