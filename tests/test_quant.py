"""Quantized base weights (QLoRA, costlens/quant.py): bytes by hand, against real bitsandbytes
layers where bitsandbytes is installed, and the estimate of a LoRA plan over a quantized base."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from costlens.cli import main
from costlens.quant import quantized_bytes

LLAMA = str(FIXTURES / "llama.onnx")


def test_quantized_bytes_by_hand():
    # a 128 x 256 weight: 32,768 elements
    # nf4: 16,384 packed + 4 x 512 absmax + 64 code = 18,496
    assert quantized_bytes("nf4", (128, 256)) == 18_496
    # nf4-dq: 16,384 + 512 uint8 absmax + 4 x ceil(512/256) + 64 + 1,024 + 4 = 17,996
    assert quantized_bytes("nf4-dq", (128, 256)) == 17_996
    # int8: 32,768 + 4 x 128 row scales = 33,280
    assert quantized_bytes("int8", (128, 256)) == 33_280


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "int8"])
@pytest.mark.parametrize("shape", [(128, 256), (96, 64), (1000, 77)])
def test_quantized_bytes_match_bitsandbytes(mode, shape):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is an optional extra")
    import torch
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    d_out, d_in = shape
    if mode == "int8":
        layer = Linear8bitLt(d_in, d_out, bias=False, has_fp16_weights=False).to("cpu")
        tensors = [layer.weight.data, layer.weight.SCB]
    else:
        layer = Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                           compress_statistics=mode == "nf4-dq").to("cpu")
        state = layer.weight.quant_state
        tensors = [layer.weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
    assert _storage_bytes(tensors) == quantized_bytes(mode, shape)


def run(*args):
    return CliRunner().invoke(main, list(args))


def plan_of(*args) -> dict:
    result = run("plan", LLAMA, "--seq", "64", "--lora", "attn", "--precision", "bf16", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["plans"][0]


def test_lora_over_nf4_base(loaded):
    from costlens.quant import quantized_uses
    model = loaded("llama")
    uses = quantized_uses(model.roles.params)
    # the llama fixture's quantized linears are its attention and FFN matrices (2 layers x 7), never
    # the embedding, the norms or the head
    assert len(uses) == 14 and {u.role.value for u in uses} == {"attention", "ffn"}
    plain, nf4 = plan_of(), plan_of("--quant", "nf4")
    saved = sum(u.n_params * 2 - quantized_bytes("nf4", u.shape) for u in uses)     # bf16: 2 bytes each
    largest = max(u.n_params for u in uses) * 2                                       # its dequantized copy
    assert nf4["memory_bytes"]["weights"] == plain["memory_bytes"]["weights"] - saved
    assert nf4["peak_phase"] == plain["peak_phase"] == "backward"
    assert nf4["memory_bytes"]["peak"] == plain["memory_bytes"]["peak"] - saved + largest
    # nothing else moves: gradients, optimizer state, activations and FLOPs are the adapters' and the plan's
    for key in ("gradients", "optimizer", "activations"):
        assert nf4["memory_bytes"][key] == plain["memory_bytes"][key]
    assert nf4["flops"] == plain["flops"]


def test_quantized_base_cannot_train():
    result = run("plan", LLAMA, "--seq", "64", "--quant", "nf4")        # full fine-tuning of a 4-bit base
    assert result.exit_code == 2 and "a quantized base weight cannot" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_quant_shown_in_header():
    text = run("plan", LLAMA, "--seq", "64", "--lora", "attn", "--quant", "nf4-dq").stdout
    assert "nf4-dq base weights" in text


def test_budget_setup_takes_base_quant():
    from costlens.budgets import BudgetError, parse_budget, setup_of
    budget = parse_budget('[setup]\nbase_quant = "nf4"\n[[plan]]\nspec = "lora=attn"\npeak_memory = "1MiB"\n')
    assert setup_of(budget).base_quant == "nf4"
    with pytest.raises(BudgetError, match="unknown --quant 'nf3'"):
        parse_budget('[setup]\nbase_quant = "nf3"\n[[plan]]\nspec = "lora=attn"\npeak_memory = "1MiB"\n')
