"""A config is traced in the dtype that runs (issue 10: "trace in the dtype that runs").

HF code upcasts to fp32 inside a half model (RMSNorm's ``hidden_states.to(torch.float32)``,
the eager softmax's ``dtype=torch.float32``): a graph traced in fp32 cannot show those casts,
so pure bf16 was priced as if every saved tensor were bf16 (activations -19% median on the
real modules). Traced in bf16, the casts are in the graph and their fp32 outputs are priced as
fp32; with fp32 weights, the same casts return their input (``x.to(dtype)`` of a tensor that
already has it), so fp32 and autocast plans price a half trace exactly as an fp32 one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")
pytest.importorskip("transformers", reason="needs the torch extra")

import costlens  # noqa: E402
from costlens.estimate import estimate  # noqa: E402
from costlens.measure.validate import validate_config  # noqa: E402
from costlens.plans import Plan, Setup, parse_plan_spec, running_dtype  # noqa: E402

pytestmark = pytest.mark.torch
LLAMA = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "llama.config.json"
LORA_ATTN = "lora-attn-r8:lora=attn;rank=8"


@pytest.fixture(scope="module")
def traces():
    return {dtype: costlens.load(LLAMA, dtype=dtype) for dtype in ("float32", "bfloat16")}


def test_running_dtype_of_each_precision():
    # half weights run the model's code in half; autocast runs fp32 code with half matmuls
    assert [running_dtype(p) for p in ("fp32", "bf16-autocast", "bf16", "bf16-mixed", "fp16-mixed")] == \
        ["float32", "float32", "bfloat16", "bfloat16", "float16"]


def test_half_trace_prices_the_fp32_upcasts_of_norms_and_softmax(traces):
    # By hand, per RMSNorm (x of N = batch·seq·hidden elements, one row per token): HF keeps
    # h = x.float() (fp32: +2 bytes per element over a bf16 h) and rsqrt of the variance (fp32:
    # +2 bytes per row). Per eager softmax(dtype=fp32) over S = batch·heads·seq² scores: its
    # fp32 output (+2 bytes per score) and the bf16 copy that multiplies V (+2 more: in a bf16
    # reading of the fp32 trace both were one bf16 tensor).
    config = json.loads(LLAMA.read_text())
    batch, seq = 2, 32
    layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    norms = 2 * layers + 1
    tokens = batch * seq
    expected = norms * (tokens * hidden * 2 + tokens * 2) + layers * batch * heads * seq * seq * 4
    setup = Setup(batch=batch, seq=seq, precision="bf16")
    fp32_trace = estimate(traces["float32"], Plan(), setup).memory.activations
    half_trace = estimate(traces["bfloat16"], Plan(), setup).memory.activations
    assert half_trace - fp32_trace == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("plan", ["full", LORA_ATTN])
def test_fp32_weights_price_a_half_trace_as_an_fp32_one(traces, precision, plan):
    # with fp32 weights HF's .to(float32) / .to(input_dtype) return their input: no new storage
    setup = Setup(batch=2, seq=32, precision=precision)
    chosen = Plan() if plan == "full" else parse_plan_spec(plan)
    a, b = (estimate(traces[d], chosen, setup) for d in ("float32", "bfloat16"))
    assert (a.memory.activations, a.memory.peak, a.flops) == (b.memory.activations, b.memory.peak, b.flops)


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
@pytest.mark.parametrize("plan", ["full", LORA_ATTN])
def test_half_weights_match_the_real_module(precision, plan):
    # truth: the real LlamaForCausalLM with bf16 parameters (bf16-mixed: stepped through fp32
    # masters, the half gradients converted to fp32 on them), two steps on the storage tracker
    validation = validate_config(LLAMA, parse_plan_spec(plan) if plan != "full" else Plan(),
                                 Setup(batch=2, seq=32, precision=precision))
    figures = {c.quantity: c for c in validation.comparisons}
    assert figures["activation bytes"].error == pytest.approx(0, abs=0.01)
    assert figures["optimizer bytes"].error == pytest.approx(0, abs=0.001)
    assert figures["peak bytes"].error == pytest.approx(0, abs=0.01)


def test_plan_cli_traces_a_config_in_the_precision_it_runs(traces):
    from click.testing import CliRunner

    from costlens.cli import main
    result = CliRunner().invoke(main, ["plan", str(LLAMA), "--precision", "bf16", "--batch", "2", "--seq", "32",
                                       "--attention", "eager", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    # the CLI's default loss for a transformers config is the model's own ("hf")
    expected = estimate(traces["bfloat16"], Plan(), Setup(batch=2, seq=32, precision="bf16", loss="hf"))
    assert document["plans"][0]["memory_bytes"]["activations"] == expected.memory.activations


def test_hf_loss_upcasts_half_logits_to_fp32():
    # transformers' ForCausalLMLoss runs logits.float() before cross-entropy: log_softmax keeps
    # fp32 scores of a bf16 model (the "ce" loss on the bf16 logits keeps bf16 ones)
    validation = validate_config(LLAMA, Plan(), Setup(batch=2, seq=32, precision="bf16", loss="hf"))
    figures = {c.quantity: c for c in validation.comparisons}
    assert figures["activation bytes"].error == pytest.approx(0, abs=0.01)
    assert figures["peak bytes"].error == pytest.approx(0, abs=0.01)


def test_hf_loss_keeps_fp32_scores_of_half_logits_by_hand(traces):
    # log_softmax of the logits [batch, seq, vocab]: bf16 under "ce", fp32 under "hf" (+2 bytes each)
    vocab = json.loads(LLAMA.read_text())["vocab_size"]
    setups = [Setup(batch=2, seq=32, precision="bf16", loss=loss) for loss in ("ce", "hf")]
    ce, hf = (estimate(traces["bfloat16"], Plan(), s).memory.activations for s in setups)
    assert hf - ce == 2 * 32 * vocab * 2


def test_cli_loss_default_is_hf_for_a_transformers_config():
    from click.testing import CliRunner

    from costlens.cli import main
    result = CliRunner().invoke(main, ["plan", str(LLAMA), "--precision", "bf16", "--batch", "2", "--seq", "32",
                                       "--json"])
    setup = json.loads(result.output)["setup"]
    assert setup["loss"] == "hf" and "labels" in setup["derived"]["loss"]
