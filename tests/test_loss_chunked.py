"""--loss chunked-ce: torchtune's CEWithChunkedOutputLoss, priced as its autograd runs and measured
on the real transformers module (issue 10). Goldens are derived by hand from torch.chunk's rule
(ceil(seq / 8) positions per chunk) and fp32 bytes; the validate case compares against the real
library's loss run on the real module."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from costlens.memory import CHUNKED_CE_CHUNKS, loss_chunk_bytes, loss_chunks


def _ctx(batch, seq, vocab):
    graph = SimpleNamespace(outputs=["logits"])
    return SimpleNamespace(graph=graph, shape=lambda name: (batch, seq, vocab))


@pytest.mark.parametrize("seq, positions, count, last", [(64, 8, 8, 8), (60, 8, 8, 4), (5, 1, 5, 1), (17, 3, 6, 2)])
def test_chunks_follow_torch_chunk(seq, positions, count, last):
    chunks, _ = loss_chunks(_ctx(2, seq, 256), "chunked-ce")
    assert (chunks.positions, chunks.count, chunks.last) == (positions, count, last)


def test_one_chunk_bytes_by_hand():
    # batch 2, seq 60, vocab 256, fp32 log-softmax: 2*60*256*4 = 122880 bytes; a chunk holds
    # 8 positions: 2*8*256*4 = 16384 bytes; every other loss makes the whole tensor at once
    ctx = _ctx(2, 60, 256)
    assert loss_chunk_bytes(ctx, 2 * 60 * 256 * 4, "chunked-ce") == 16384
    assert loss_chunk_bytes(ctx, 2 * 60 * 256 * 4, "ce") == 122880


def test_chunk_count_is_torchtunes_default():
    step = pytest.importorskip("costlens.measure.step")
    try:
        loss = step.torchtune_chunked_loss()()
    except Exception as e:  # noqa: BLE001 - torchtune not installed
        pytest.skip(f"torchtune missing: {e}")
    assert loss.num_output_chunks == CHUNKED_CE_CHUNKS


@pytest.mark.parametrize("spec", ["full", "lora=attn;rank=4"])
def test_validate_llama_peak_within_3_percent(spec):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from costlens.measure.step import torchtune_chunked_loss
    from costlens.measure.validate import validate_config
    from costlens.plans import Setup, parse_plan_spec
    try:
        torchtune_chunked_loss()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torchtune missing: {e}")
    result = validate_config("fixtures/hf/llama.config.json", parse_plan_spec(spec),
                             Setup(batch=2, seq=64, loss="chunked-ce"))
    peak = next(c for c in result.comparisons if c.quantity == "peak bytes")
    assert abs(peak.estimated - peak.measured) <= 0.03 * peak.measured, (peak.estimated, peak.measured)
    ce = validate_config("fixtures/hf/llama.config.json", parse_plan_spec(spec), Setup(batch=2, seq=64, loss="ce"))
    ce_peak = next(c for c in ce.comparisons if c.quantity == "peak bytes")
    assert peak.measured < ce_peak.measured      # the chunks' gradients are smaller than the whole
