"""Estimates against a real training step of the same plan on the torch module.

Trainable parameters come from requires_grad flags (PEFT for LoRA) and FLOPs from
torch.utils.flop_counter.FlopCounterMode around forward + cross-entropy + backward, with
eager attention and MoE layers dispatching each token to its k experts only. Nothing here
is derived from costlens. Targets (issue 3): parameters exact, FLOPs within 1%.
"""
from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")

import models  # noqa: E402  (fixtures/models.py)
import torch_plans as tp  # noqa: E402

import costlens  # noqa: E402
from conftest import FIXTURES  # noqa: E402
from costlens.estimate import estimate  # noqa: E402
from costlens.plans import Setup, parse_plan_spec  # noqa: E402

BATCH, SEQ, VOCAB = 2, 32, 512
LLAMA_ATTN = r".*self_attn\.(q|k|v|o)_proj"
LLAMA_FFN = r".*mlp\.(gate|up|down)_proj"
MOE_LORA = r".*(self_attn\.(q|k|v|o)_proj|mlp\.gate|mlp\.experts\.\d+\.(gate|up|down)_proj)"

# (fixture, module kwargs, costlens plan spec, torch: trainable-name regex or "freeze:REGEX", PEFT targets, ranks, detach)
CASES = [
    ("llama", {}, "full", None, None, None, False),
    ("llama", {}, "freeze=attn", "freeze:" + tp.ATTENTION, None, None, False),
    ("llama", {}, "train=ffn", tp.FFN, None, None, False),
    ("llama", {}, "lora=attn;rank=8", r"^$", LLAMA_ATTN, None, False),
    ("llama", {}, "lora=attn,ffn;rank=8", r"^$", f"({LLAMA_ATTN}|{LLAMA_FFN})", None, False),
    ("llama", {}, "train=ffn;stop-grad=attn", tp.FFN, None, None, True),
    ("llama", {}, "train=layers:1", r"^layers\.1\.", None, None, False),
    ("gpt2", {}, "full", None, None, None, False),
    ("gpt2", {}, "freeze=attn", "freeze:" + tp.ATTENTION, None, None, False),
    ("gpt2", {}, "lora=attn;rank=8", r"^$", r".*self_attn\.(c_attn|c_proj)", None, False),
    ("bert", {}, "train=ffn", tp.FFN, None, None, False),
    ("bert", {}, "full", None, None, None, False),
    ("stacked_ffn", {}, "freeze=attn", "freeze:" + tp.ATTENTION, None, None, False),
    # seed 004 without a new export: llama + one stacked FFN sublayer per block, only those train
    ("llama", {"ffn_per_block": 2}, "stack-ffn=1;train=stacked", r"\.extra_(mlps|norms)\.", None, None, False),
    ("llama", {"ffn_per_block": 3}, "stack-ffn=2", None, None, None, False),
    ("moe", {"dispatch": "sparse"}, "full", None, None, None, False),
    ("moe", {"dispatch": "sparse"}, "train=router;freeze=experts", tp.ROUTER, None, None, False),
    ("moe", {"dispatch": "sparse"}, "lora=attn,router,experts;rank=attn=8,router=4,experts=4", r"^$", MOE_LORA,
     {r"gate": 4, r"experts\.\d+\.\w+_proj": 4}, False),
    ("moe_fused", {"dispatch": "sparse"}, "full", None, None, None, False),
    ("moe_fused", {"dispatch": "sparse"}, "freeze=experts", "freeze:" + tp.EXPERTS, None, None, False),
    # LoRA on fused 3-D expert tensors: PEFT's target_parameters, one adapter per expert
    ("moe_fused", {"dispatch": "sparse"}, "lora=experts;rank=8", r"^$", ["mlp.gate_up_proj", "mlp.down_proj"],
     None, False),
]
FACTORIES = {"llama": models.llama_like, "gpt2": models.gpt2_like, "bert": models.bert_like,
             "stacked_ffn": models.stacked_ffn_like, "moe": models.moe_like, "moe_fused": models.moe_fused_like}


def torch_module(fixture, kwargs, trainable, lora_targets, ranks, detach):
    module = FACTORIES[fixture](**kwargs)
    if trainable and trainable.startswith("freeze:"):
        pattern = trainable.removeprefix("freeze:")
        for name, param in module.named_parameters():
            param.requires_grad_(re.search(pattern, name) is None)
    else:
        tp.set_trainable(module, trainable)
    if lora_targets:
        module = tp.add_lora(module, lora_targets, 8, ranks)
    if detach:
        tp.detach_attention_outputs(module)
    return module


@pytest.fixture(scope="module")
def onnx_models():
    cache = {}
    return lambda name: cache.setdefault(name, costlens.load(FIXTURES / f"{name}.onnx"))


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_trainable_params_and_flops_match_a_real_step(onnx_models, case):
    fixture, kwargs, spec, trainable, lora_targets, ranks, detach = case
    module = torch_module(fixture, kwargs, trainable, lora_targets, ranks, detach)
    measured_forward, measured_total = tp.step_flops(module, BATCH, SEQ, VOCAB)
    result = estimate(onnx_models(fixture), parse_plan_spec(spec), Setup(batch=BATCH, seq=SEQ))
    assert result.params.trainable == tp.trainable_count(module)
    assert result.flops.forward == pytest.approx(measured_forward, rel=0.01)
    assert result.flops.forward + result.flops.backward == pytest.approx(measured_total, rel=0.01)


def test_backward_is_twice_forward_only_when_everything_trains(onnx_models):
    setup = Setup(batch=BATCH, seq=SEQ)
    full = estimate(onnx_models("llama"), parse_plan_spec("full"), setup)
    # everything trains (the embedding too, so even layer 0's input needs dX): dX + dW per matmul
    assert full.flops.backward == 2 * full.flops.forward
    for spec in ("freeze=attn", "train=ffn", "lora=attn", "train=ffn;stop-grad=attn"):
        partial = estimate(onnx_models("llama"), parse_plan_spec(spec), setup)
        assert partial.flops.backward < 2 * partial.flops.forward, spec


DEFAULT_PLAN_FIXTURES = ["gpt2", "llama", "moe", "moe_fused", "stacked_ffn", "bert"]


def _default_cases():
    cases = []
    for fixture in DEFAULT_PLAN_FIXTURES:
        for spec in costlens.default_plans(costlens.load(FIXTURES / f"{fixture}.onnx")):
            cases.append((fixture, spec))
    return cases


@pytest.mark.parametrize("fixture, spec", _default_cases(), ids=lambda v: str(v).split(":")[0])
def test_every_default_plan_matches_a_real_step(onnx_models, fixture, spec):
    """Issue 3: trainable parameters exact and FLOPs within 1% for every fixture x default plan."""
    plan = parse_plan_spec(spec)
    kwargs = {"dispatch": "sparse"} if fixture.startswith("moe") else {}
    recipe = tp.default_plan_recipe(plan.name, fused_experts=fixture == "moe_fused")
    module = tp.apply_recipe(FACTORIES[fixture](**kwargs), **recipe)
    measured_forward, measured_total = tp.step_flops(module, BATCH, SEQ, VOCAB)
    result = estimate(onnx_models(fixture), plan, Setup(batch=BATCH, seq=SEQ))
    assert result.params.trainable == tp.trainable_count(module)
    assert result.flops.forward == pytest.approx(measured_forward, rel=0.01)
    assert result.flops.forward + result.flops.backward == pytest.approx(measured_total, rel=0.01)


@pytest.mark.parametrize("fixture, spec", [c for c in _default_cases() if c[0].startswith("moe")],
                         ids=lambda v: str(v).split(":")[0])
def test_routed_moe_memory_matches_a_real_step(onnx_models, fixture, spec):
    """Routed dispatch (each expert runs on its tokens only) measured on the torch module with
    exact storage accounting: activations and peak within 5% of the estimate."""
    from costlens.measure.step import measure_step
    plan = parse_plan_spec(spec)
    recipe = tp.default_plan_recipe(plan.name, fused_experts=fixture == "moe_fused")
    module = tp.apply_recipe(FACTORIES[fixture](dispatch="sparse"), **recipe)
    measured = measure_step(module, BATCH, SEQ, VOCAB)
    memory = estimate(onnx_models(fixture), plan, Setup(batch=BATCH, seq=SEQ, device="cpu")).memory
    assert memory.activations == pytest.approx(measured.saved_activation_bytes, rel=0.05)
    assert memory.peak == pytest.approx(measured.peak_bytes, rel=0.05)
