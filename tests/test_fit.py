"""`costlens fit`: answers checked with independent estimates (the value fits, one above does not),
with a measured training step, and the CLI around it (--version, examples, JSON, HTML)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

import costlens
from conftest import FIXTURES
from costlens.cli import main
from costlens.fit import fit
from costlens.plans import Plan, Setup

LORA = Plan(name="lora-attn", lora=("attn",), rank=8)
GiB = 2**30


@pytest.fixture(scope="module")
def llama():
    return costlens.load(FIXTURES / "llama.onnx")


def peak(model, plan: Plan, **setup) -> int:
    return costlens.estimate(model, plan, Setup(**setup)).memory.peak


@pytest.mark.parametrize("answer", [1, 5, 12])
def test_largest_batch_when_the_limit_is_a_known_peak(llama, answer):
    limit = peak(llama, LORA, batch=answer, seq=64)         # exactly the peak of `answer`: it fits, answer+1 not
    result = fit(llama, limit, search="batch", plan=LORA, setup=Setup(seq=64))
    assert result.best.result.batch == answer
    assert result.next_up.result.batch == answer + 1


def test_largest_batch_with_headroom(llama):
    memory = 24 * 2**20
    result = fit(llama, memory, search="batch", plan=LORA, setup=Setup(seq=64), headroom=0.1)
    usable = int(memory * 0.9)
    batch = result.best.result.batch
    assert result.usable_bytes == usable
    assert peak(llama, LORA, batch=batch, seq=64) <= usable < peak(llama, LORA, batch=batch + 1, seq=64)
    assert len(result.probes) <= 2 * (batch + 1).bit_length() + 1            # doubling, then bisection


def test_longest_seq(llama):
    limit = peak(llama, Plan(), batch=2, seq=100)
    result = fit(llama, limit, search="seq", setup=Setup(batch=2))
    assert result.best.result.seq == 100 and result.next_up.result.seq == 101


def test_seq_capped_by_learned_positions():
    gpt2 = costlens.load(FIXTURES / "gpt2.onnx")
    table = next(u.shape[0] for u in gpt2.roles.params if u.kind == "position")
    result = fit(gpt2, 2**40, search="seq", setup=Setup(batch=1))
    assert result.best.result.seq == table and result.capped


def test_nothing_fits(llama):
    result = fit(llama, 1000, search="batch", plan=LORA, setup=Setup(seq=64))
    assert result.best is None and result.next_up.result.batch == 1


def test_cheapest_plan(llama):
    setup = Setup(batch=8, seq=64)
    full = peak(llama, Plan(), batch=8, seq=64, precision="bf16", optimizer="adamw-8bit")
    result = fit(llama, full - 1, search="plan", setup=setup)        # full fine-tuning cannot fit, even at its leanest
    best = result.best
    assert best.name != "full"
    chosen = costlens.estimate(llama, costlens.parse_plan_spec(best.spec), best.result.setup)
    assert chosen.memory.peak <= full - 1
    for probe in result.probes:          # whatever costs fewer FLOPs does not fit, at the leanest setup
        if probe.step_flops < best.step_flops:
            lean = costlens.estimate(llama, probe.result.plan,
                                     Setup(batch=8, seq=64, precision="bf16", optimizer="adamw-8bit",
                                           checkpointing=probe.result.setup.checkpointing))
            assert lean.memory.peak > full - 1, probe.name


def test_cheapest_plan_keeps_the_faithful_setup_when_it_fits(llama):
    result = fit(llama, 2**40, search="plan", setup=Setup(batch=1, seq=32))
    assert result.best.result.setup.precision == "bf16-mixed" and result.best.result.setup.optimizer == "adamw"
    assert not result.best.result.setup.checkpointing


def test_measured_peak_of_the_chosen_batch_is_within_the_limit():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from costlens.measure.validate import validate_torch
    model = costlens.load("models:llama_like")
    memory = 8 * 2**20
    setup = Setup(seq=64, optimizer_impl="for-loop")
    result = fit(model, memory, search="batch", plan=LORA, setup=setup, headroom=0.05)
    batch = result.best.result.batch
    assert batch > 1
    validation = validate_torch("models:llama_like", LORA, Setup(batch=batch, seq=64), device="cpu")
    measured = next(c.measured for c in validation.comparisons if c.quantity == "peak bytes")
    assert measured <= memory


def test_fit_answer_is_checked_on_the_real_transformers_module():
    # the limit sits halfway between the estimated peaks of batch 3 and batch 4 (LoRA on the real
    # LlamaForCausalLM of the corpus config): fit answers 3, the real module's measured step-2
    # peak at batch 3 is under the limit and the one at batch 4 is over it
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from pathlib import Path

    from costlens.measure.validate import validate_config
    config = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "llama.config.json"
    model = costlens.load(config)
    setup = Setup(seq=32, attention="eager", optimizer_impl="for-loop")
    low, high = (peak(model, LORA, batch=b, seq=32, attention="eager") for b in (3, 4))
    limit = (low + high) // 2
    assert fit(model, limit, search="batch", plan=LORA, setup=setup).best.result.batch == 3

    def measured(batch: int) -> int:
        validation = validate_config(config, LORA, replace(setup, batch=batch))
        return next(c.measured for c in validation.comparisons if c.quantity == "peak bytes")
    assert measured(3) <= limit < measured(4)


def _fit(*args):
    return CliRunner().invoke(main, ["fit", str(FIXTURES / "llama.onnx"), *args])


def test_cli_json_schema_and_gpu_limit(llama):
    result = _fit("--gpu", "l4", "--headroom", "10%", "--lora", "attn", "--seq", "64", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["schema"] == "costlens.fit/1" and document["search"] == "batch"
    assert document["limit"] == {"memory_bytes": 24 * GiB, "headroom": 0.1, "usable_bytes": int(24 * GiB * 0.9),
                                 "gpu": "l4"}
    chosen = [p for p in document["probes"] if p["chosen"]]
    assert len(chosen) == 1 and chosen[0]["batch"] == document["answer"]["batch"]
    assert document["next_up"]["batch"] == document["answer"]["batch"] + 1


def test_cli_nothing_fits_exits_1_and_needs_a_limit():
    result = _fit("--memory", "1KiB", "--seq", "64")
    assert result.exit_code == 1 and "nothing fits" in result.stdout
    result = _fit("--seq", "64")
    assert result.exit_code == 2 and "--gpu NAME" in result.stderr
    result = _fit("--memory", "lots")
    assert result.exit_code == 2 and "--memory 'lots'" in result.stderr


def test_cli_plan_search_html(tmp_path):
    page = tmp_path / "fit.html"
    result = _fit("--memory", "6MiB", "--search", "plan", "--seq", "64", "--batch", "4", "--html", str(page))
    assert result.exit_code == 0, result.output
    assert "cheapest plan that fits" in result.stdout
    html = page.read_text()
    assert "<svg" in html and "<script" not in html and "cheapest plan that fits" in html


def test_one_model_load_for_every_candidate(monkeypatch):
    import costlens.api
    calls = []
    original = costlens.api.load_graph
    monkeypatch.setattr(costlens.api, "load_graph", lambda *a, **k: calls.append(a) or original(*a, **k))
    result = _fit("--memory", "6MiB", "--search", "plan", "--seq", "64")
    assert result.exit_code == 0, result.output
    assert len(calls) == 1


def test_version_and_an_example_on_every_help():
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).stdout.strip().endswith(costlens.__version__)
    for name in main.commands:
        text = runner.invoke(main, [name, "--help"]).stdout
        assert "Example:" in text and f"costlens {name}" in text, name


def test_progress_stays_off_a_pipe():
    result = _fit("--memory", "6MiB", "--lora", "attn", "--seq", "64")
    assert result.exit_code == 0 and result.stderr == ""


def test_parallel_layout_is_checked_per_rank(llama):
    # Each GPU holds one rank: the limit applies to the largest rank's peak, which ZeRO-3 on
    # 4 ranks makes smaller than the single-device step (weights, grads, state sharded 4 ways).
    from costlens.parallel import estimate_parallel
    setup = Setup(seq=64, gpus=4, shard="zero3")
    single = costlens.estimate(llama, Plan(), Setup(seq=64, batch=1))
    sharded = estimate_parallel(costlens.estimate(llama, Plan(), replace(setup, batch=1)), 4, "zero3")
    assert sharded.memory.peak < single.memory.peak
    limit = (sharded.memory.peak + single.memory.peak) // 2       # fits sharded, not on one device
    assert fit(llama, limit, search="batch", setup=Setup(seq=64)).best is None
    answer = fit(llama, limit, search="batch", setup=setup).best
    assert answer is not None and answer.peak_bytes <= limit and answer.rank_peak is not None
