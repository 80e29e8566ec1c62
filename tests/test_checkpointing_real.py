"""Activation checkpointing priced against the real transformers module (issue 10).

The truth is HF's own recipe: ``gradient_checkpointing_enable(use_reentrant=False)`` on the
real module of ``fixtures/hf/ARCH.config.json`` (random weights), the second step measured by
the storage tracker and FlopCounterMode (``validate_config``). The physics checked:

- torch.utils.checkpoint stops the recompute inside the pack hook of the last tensor a layer
  saved, before that op's kernel: a LoRA'd down projection runs its base product and A again,
  never B;
- transformers (and PEFT) make the frozen token embedding's output require a gradient under
  checkpointing: a leaf its gradient accumulator holds through backward;
- the layers of a parallel attention + MLP block are found from its residual stream.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")
pytest.importorskip("transformers", reason="needs the torch extra")

from costlens.measure.validate import validate_config  # noqa: E402
from costlens.plans import Setup, parse_plan_spec  # noqa: E402

pytestmark = pytest.mark.torch
CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
CKPT = Setup(batch=2, seq=32, device="cpu", checkpointing=True)
LORA_ATTN = "lora-attn-r8:lora=attn;rank=8"


def _figures(arch: str, plan: str) -> dict:
    validation = validate_config(CORPUS / f"{arch}.config.json", parse_plan_spec(plan), CKPT)
    return {c.quantity: c for c in validation.comparisons}


def test_recompute_stops_inside_the_last_lora_b_product():
    # the embedding trains, so layer 0's input needs a gradient with or without checkpointing
    # and only the recompute is checkpointing's. Each layer's last saver is the LoRA'd down
    # projection, whose B product packs x·A before it runs: base and A run again, B does not
    # (2·64·8·64 FLOPs per layer below a full replay). FLOPs depend on shapes only: exact
    figures = _figures("llama", "lora-ffn-embed:lora=attn,ffn;rank=8;train=embed")
    assert figures["step FLOPs"].estimated == figures["step FLOPs"].measured


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_frozen_embedding_output_is_a_leaf_held_through_backward(arch):
    # GPT-2 adds position embeddings to the token lookup: the leaf is a tensor of its own
    # (one [b, s, hidden] more than the layer inputs); LLaMA's leaf is layer 0's input itself
    figures = _figures(arch, LORA_ATTN)
    assert figures["activation bytes"].error == pytest.approx(0, abs=0.02)
    # below the peak: the gradient of the residual stream waiting for its second branch
    # (one [b, s, hidden]) is not priced by the backward walk
    assert figures["peak bytes"].error == pytest.approx(0, abs=0.03)


@pytest.mark.parametrize("arch", ["gpt_neox", "falcon"])
def test_parallel_block_layers_are_checkpointed_from_their_residual_stream(arch):
    figures = _figures(arch, "full")
    assert figures["activation bytes"].error == pytest.approx(0, abs=0.02)
    assert figures["step FLOPs"].error == pytest.approx(0, abs=0.001)


def test_lora_under_checkpointing_backpropagates_to_the_embedding():
    figures = _figures("llama", LORA_ATTN)
    assert figures["step FLOPs"].error == pytest.approx(0, abs=0.001)
