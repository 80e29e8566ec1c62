"""Scoped selectors (``q@layers:0``): a selector narrowed by another, for PEFT's
layers_to_transform and per-layer ranks; counts derived by hand on the bundled llama fixture
(2 layers, hidden 64, 4 heads of 16, 2 KV heads, FFN 176; fixtures/llama.truth.json)."""
from __future__ import annotations

from pathlib import Path

import pytest

import costlens
from costlens.errors import PlanError
from costlens.plans import Plan, Setup, parse_plan_spec, select

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


# ------------------------------------------------ ROLE.KIND: one rank per expert projection kind
# fixtures/hf/mixtral.config.json: hidden 64, intermediate 64, 4 local experts, 2 layers; transformers 5
# fuses each layer's experts into gate_up_proj [4, 128, 64] and down_proj [4, 64, 64]
MIXTRAL = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "mixtral.dynamo.onnx"
QWEN2_MOE = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "qwen2_moe.dynamo.onnx"


@pytest.fixture(scope="module")
def mixtral():
    return costlens.load(MIXTRAL)


def test_expert_kinds_select_their_fused_tensor(mixtral):
    roles = mixtral.roles
    shapes = {key: u.shape for u in roles.params for key in [u.key]}
    gate_up = select(roles.params, "experts.gate_up", roles)
    down = select(roles.params, "experts.down", roles)
    assert sorted(shapes[k] for k in gate_up) == [(4, 128, 64)] * 2
    assert sorted(shapes[k] for k in down) == [(4, 64, 64)] * 2
    assert gate_up | down == select(roles.params, "experts", roles)
    # gate and up are halves of the fused tensor, as the bare gate/up selectors read a fused gate_up
    assert select(roles.params, "experts.gate", roles) == select(roles.params, "experts.up", roles) == gate_up
    assert select(roles.params, "experts.down@layers:1", roles) < down


def test_two_expert_ranks_by_hand(mixtral):
    # per layer and expert: gate_up at r16: 16·(64 + 128) = 3,072; down at r8: 8·(64 + 64) = 1,024
    plan = parse_plan_spec("two:lora=experts.gate_up,experts.down;rank=8,experts.gate_up=16;"
                           "alpha=16,experts.gate_up=32")
    assert (plan.rank_for("experts.gate_up"), plan.rank_for("experts.down")) == (16, 8)
    assert (plan.alpha_for("experts.gate_up"), plan.alpha_for("experts.down")) == (32.0, 16.0)
    result = costlens.estimate(mixtral, plan, Setup(seq=32))
    assert result.params.trainable == 2 * 4 * (3_072 + 1_024)
    by_kind = {a.d_in + a.d_out: (a.rank, a.alpha, a.n_experts) for a in result.adapters}
    assert by_kind == {64 + 128: (16, 32.0, 4), 64 + 64: (8, 16.0, 4)}
    # the same tensors at one rank: the experts target, 2 x 4 x 8·(192 + 128)
    one = costlens.estimate(mixtral, Plan(name="one", lora=("experts",), rank=8), Setup(seq=32))
    assert one.params.trainable == 2 * 4 * 8 * (192 + 128)


@pytest.mark.parametrize("spec, needle", [
    ("lora=experts.gateup", "unknown experts kind 'gateup' (known: gate_up, gate, up, down)"),
    ("lora=attn.q", "'attn' is not one"),
    ("lora=experts.down@layers:0;rank=experts.up=4", "'experts.up' is not a --lora target"),
    ("lora=experts.down;alpha=16,experts.gate_up=32", "--alpha experts.gate_up=...: 'experts.gate_up' is not"),
    ("lora=experts;rank=4,8", "'4,8' is not a whole number"),
    ("lora=experts;rank=4,8,experts=2", "two values without a target"),
    ("lora=experts;alpha=experts=x", "--alpha: 'x' is not a number"),
    ("lora=experts;rank=experts=2,experts=4", "'experts' is given twice"),
])
def test_bad_kind_selectors_and_values_are_refused_when_read(spec, needle):
    with pytest.raises(PlanError) as error:
        parse_plan_spec(spec)
    assert needle in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_a_kind_the_model_lacks_is_named_with_what_it_holds():
    model = costlens.load(QWEN2_MOE)     # shared expert: separate gate, up, down linears
    with pytest.raises(PlanError, match=r"no 'shared_experts.gate_up' parameters \(its shared_experts hold: down, "
                                        r"gate, gate_scale, up\)"):
        costlens.estimate(model, parse_plan_spec("lora=shared_experts.gate_up"), Setup(seq=32))


def test_cli_refuses_a_bad_kind_in_one_line():
    from click.testing import CliRunner
    from costlens.cli import main
    result = CliRunner().invoke(main, ["plan", str(MIXTRAL), "--lora", "experts.gate_upp", "--seq", "32"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "unknown experts kind 'gate_upp'" in result.output and len(result.output.strip().splitlines()) == 1, \
        result.output
