"""Recipes priced against a real training step of the real transformers module (issue 10).

Each case builds the tiny corpus model from ``fixtures/hf/ARCH.config.json`` (random
weights), applies the plan and the recipe the way a user runs them (``validate_config``:
torch.autocast around forward and loss for ``bf16-autocast``), measures the second step
with the storage tracker, and compares the estimate priced from the same config.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")
pytest.importorskip("transformers", reason="needs the torch extra")

from costlens.measure.validate import validate_config  # noqa: E402
from costlens.plans import Setup, parse_plan_spec  # noqa: E402
from costlens.storages import Precision  # noqa: E402

pytestmark = pytest.mark.torch
CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "hf"


LORA_ATTN = "lora-attn-r8:lora=attn;rank=8"


def _figures(arch: str, plan: str, onnx: bool = False, **setup) -> dict:
    """Estimate vs the real module, by quantity; ``onnx``: priced from the corpus's dynamo export."""
    validation = validate_config(CORPUS / f"{arch}.config.json", parse_plan_spec(plan),
                                 Setup(batch=2, seq=32, **setup),
                                 estimate_from=CORPUS / f"{arch}.dynamo.onnx" if onnx else None)
    return {c.quantity: c for c in validation.comparisons}


def test_autocast_keeps_fp32_weights_and_state_without_a_master_copy():
    # HF Trainer bf16=True: weights, gradients and AdamW moments fp32 (4 bytes), no master copy,
    # while matmul outputs are bf16 (2 bytes)
    recipe = Precision.of("bf16-autocast")
    assert (recipe.weight, recipe.state, recipe.master, recipe.activation) == (4, 4, 0, 2)
    assert recipe.autocast
    assert not Precision.of("bf16-mixed").autocast and Precision.of("bf16-mixed").master == 4


def test_gpt2_new_gelu_is_priced_as_the_python_formula_that_runs():
    # NewGELUActivation keeps x, tanh(.), 0.5·x and 1 + tanh(.) per layer: canonicalizing it to one
    # gelu op lost three [tokens, 4H] tensors per layer (-26% activations, measured)
    figures = _figures("gpt2", "full")
    assert figures["activation bytes"].error == pytest.approx(0, abs=0.01)
    assert figures["peak bytes"].error == pytest.approx(0, abs=0.01)
    assert figures["step FLOPs"].error == pytest.approx(0, abs=0.01)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_autocast_full_finetuning_matches_the_real_module(arch):
    # bf16 copies of every matmul operand saved, fp32 residual stream and norms (type promotion),
    # fp32 weights, gradients and AdamW state
    figures = _figures(arch, "full", precision="bf16-autocast")
    for quantity in ("weights bytes", "gradient bytes", "optimizer bytes"):
        assert figures[quantity].error == pytest.approx(0, abs=0.001), quantity
    assert figures["activation bytes"].error == pytest.approx(0, abs=0.01)
    assert figures["peak bytes"].error == pytest.approx(0, abs=0.05)


def test_safe_softmax_guard_of_the_dynamo_export_is_one_softmax():
    # the export writes _safe_softmax as Where(IsNaN(p), 0, p): pricing the guard's output and its
    # mask as storages of their own put llama's activations +10.5% above the real module
    figures = _figures("llama", "full", onnx=True)
    assert figures["activation bytes"].error == pytest.approx(0, abs=0.01)
    assert figures["peak bytes"].error == pytest.approx(0, abs=0.01)


def test_gpt2_export_keeps_bmm_copies_not_the_fused_qkv_output():
    # v = split(c_attn(x)) viewed [b, h, s, d]: bmm copies it (batch dims permuted) and keeps the
    # copy, not the whole [tokens, 3H] qkv output (+8.6% before)
    figures = _figures("gpt2", "full", onnx=True)
    assert figures["activation bytes"].error == pytest.approx(0, abs=0.01)


def test_multi_query_kv_is_kept_as_the_broadcast_copy_bmm_makes():
    # Falcon's one K / V head is expanded to all heads inside torch.matmul; bmm keeps the copies
    # (-10% activations when priced at one head)
    figures = _figures("falcon", "full")
    assert figures["activation bytes"].error == pytest.approx(0, abs=0.01)


@pytest.mark.parametrize("plan", ["full", LORA_ATTN])
def test_sdpa_flash_kernel_keeps_unrepeated_kv_output_and_logsumexp(plan):
    # the CPU flash kernel (HF: causal, no mask tensor): q, the kv heads as they are, its output
    # (whose [b, s, h, d] layout makes HF's transpose + reshape a view) and a logsumexp per row
    figures = _figures("llama", plan, attention="sdpa")
    assert figures["activation bytes"].error == pytest.approx(0, abs=0.01)
    assert figures["peak bytes"].error == pytest.approx(0, abs=0.01)
    # its backward recomputes Q·Kᵀ (no probabilities kept): 5 products where eager has 4
    assert figures["step FLOPs"].error == pytest.approx(0, abs=0.01)


def test_bf16_autocast_lora_keeps_half_copies_of_the_fp32_adapters():
    figures = _figures("llama", LORA_ATTN, precision="bf16-autocast")
    assert figures["activation bytes"].error == pytest.approx(0, abs=0.01)
    assert figures["peak bytes"].error == pytest.approx(0, abs=0.01)


def test_checkpointing_recompute_stops_after_the_last_saved_tensor():
    # HF's non-reentrant per-layer checkpointing: FlopCounterMode over the real step counts the
    # recompute, which never reaches each layer's down projection; the mask and RoPE tables
    # passed into every layer stay alive
    from costlens.estimate import estimate
    from costlens.frontends.hf_config import read_config
    from costlens.frontends.source import load_graph
    from costlens.measure.hf_module import build_real_module, step_recipe
    from costlens.measure.step import measure_step
    from costlens.measure.validate import apply_plan
    from costlens.model import analyse

    config = read_config(CORPUS / "llama.config.json")
    setup = Setup(batch=2, seq=32, device="cpu", checkpointing=True)
    traced = analyse(load_graph(config))
    result = estimate(traced, parse_plan_spec("full"), setup)
    module = apply_plan(build_real_module(config, setup), traced, result)
    measured = measure_step(module, 2, 32, config.vocab_size, recipe=step_recipe(setup))
    assert result.flops.step == pytest.approx(measured.total_flops, rel=0.01)
    assert result.flops.recompute < result.flops.forward        # early stop: less than a full forward
    assert result.memory.activations == pytest.approx(measured.saved_activation_bytes, rel=0.02)
    assert result.memory.peak == pytest.approx(measured.peak_bytes, rel=0.03)


def test_sdpa_on_broadcast_multi_query_heads_runs_the_math_path():
    # Falcon passes its one K/V head to SDPA as it is (no repeat, no enable_gqa): torch's math
    # fallback keeps scores, probabilities and expanded K/V as eager attention does, and its
    # backward recomputes nothing (priced as a flash kernel it was -16% activations, +1.8% FLOPs)
    figures = _figures("falcon", "full", attention="sdpa")
    assert figures["activation bytes"].error == pytest.approx(0, abs=0.01)
    assert figures["peak bytes"].error == pytest.approx(0, abs=0.01)
    assert figures["step FLOPs"].error == pytest.approx(0, abs=0.001)
