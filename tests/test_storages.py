"""Storages autograd keeps (costlens/storages.py): the bytes per element of each precision recipe,
as torch and the HF Trainer hold them, and whether a graph runs in half precision."""
from __future__ import annotations

from pathlib import Path

import pytest

import costlens
from costlens.storages import Precision, fused_kernel, runs_half

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.mark.parametrize("name, weight, activation, state, master, adapter", [
    ("fp32", 4, 4, 4, 0, 4),
    # pure bf16: AdamW's moments take the parameter's dtype; PEFT's adapters stay fp32
    ("bf16", 2, 2, 2, 0, 4),
    # HF Trainer bf16=True: fp32 weights, gradients and moments; half copies made by autocast
    ("bf16-autocast", 4, 2, 4, 0, 4),
    ("fp16-autocast", 4, 2, 4, 0, 4),
    # half weights and gradients with an fp32 master copy and fp32 moments; adapters half too
    ("bf16-mixed", 2, 2, 4, 4, 2),
    ("fp16-mixed", 2, 2, 4, 4, 2),
])
def test_bytes_per_element_of_each_recipe(name, weight, activation, state, master, adapter):
    p = Precision.of(name)
    assert (p.weight, p.activation, p.state, p.master, p.adapter) == (weight, activation, state, master, adapter)
    assert p.autocast == name.endswith("-autocast")
    assert p.adapter_state == max(state, adapter)     # an fp32 adapter keeps fp32 moments on a bf16 base


def test_only_pure_half_weights_cast_adapted_inputs_to_fp32():
    assert Precision.of("bf16").fp32_adapters_on_half_base
    assert not any(Precision.of(n).fp32_adapters_on_half_base for n in ("fp32", "bf16-autocast", "bf16-mixed"))


def test_fused_kernels_are_sdpa_and_fused():
    assert fused_kernel("sdpa") and fused_kernel("fused") and not fused_kernel("eager")


def test_an_fp32_export_does_not_run_half():
    assert not runs_half(costlens.load(FIXTURES / "llama.onnx"))


@pytest.mark.torch
def test_a_config_traced_in_bf16_runs_half():
    pytest.importorskip("transformers", reason="needs the torch extra")
    config = FIXTURES / "hf" / "llama.config.json"
    assert runs_half(costlens.load(config, dtype="bfloat16"))
    assert not runs_half(costlens.load(config))
