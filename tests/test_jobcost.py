"""The whole job's cost (costlens/jobcost.py): steps, GPU-hours and money against hand arithmetic."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from costlens.cli import main
from costlens.errors import PlanError
from costlens.jobcost import job_cost, job_tokens

LLAMA = str(FIXTURES / "llama.onnx")


def test_steps_hours_and_money_by_hand():
    # 1e9 tokens, 8 sequences of 2048 per micro-batch, 4 micro-batches, 8 data-parallel ranks:
    # tokens/step = 8 x 2048 x 4 x 8 = 524,288; steps = ceil(1e9 / 524,288) = 1,908 (1907.35 rounded up)
    # GPU-hours = 1,908 x 4 x 8 x 0.5 s / 3600 = 8.48; wall = 8.48 / 8 = 1.06 h; cost at 2.50 = 21.20
    cost = job_cost(10**9, 8, 2048, 0.5, grad_accum=4, dp_ranks=8, gpus=8, price_per_gpu_hour=2.5)
    assert cost.tokens_per_step == 524_288 and cost.steps == 1908
    assert cost.gpu_hours == pytest.approx(8.48)
    assert cost.wall_hours == pytest.approx(1.06)
    assert cost.cost == pytest.approx(21.20)
    assert cost.seconds_per_step == pytest.approx(4 * 0.5)        # 4 micro-batches of 0.5 s each


def test_tensor_parallel_group_counts_gpu_seconds_once():
    # 2 GPUs in one tensor-parallel group (dp 1): 10 steps x 1 micro-batch x 3.6 s = 36 s = 0.01 GPU-h,
    # wall 0.005 h (each GPU does half)
    cost = job_cost(10 * 1024, 1, 1024, 3.6, dp_ranks=1, gpus=2)
    assert cost.steps == 10 and cost.gpu_hours == pytest.approx(0.01) and cost.wall_hours == pytest.approx(0.005)
    assert cost.cost is None and cost.price_source is None


def test_without_a_gpu_only_steps():
    cost = job_cost(1000, 1, 100, None)
    assert cost.steps == 10 and cost.gpu_hours is None and cost.cost is None


@pytest.mark.parametrize("args, tokens", [((5, None, None), 5), ((None, 1000, 2.5), 2500), ((None, 999, None), 999),
                                          ((None, 3, 0.5), 2)])      # ceil(1.5)
def test_job_tokens(args, tokens):
    assert job_tokens(*args) == tokens


@pytest.mark.parametrize("args, match", [((5, 5, None), "not both"), ((None, None, 2.0), "needs --dataset-tokens"),
                                         ((0, None, None), "positive"), ((None, 10, -1.0), "positive")])
def test_job_tokens_refused(args, match):
    with pytest.raises(PlanError, match=match):
        job_tokens(*args)


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_cli_job_cost_in_json_and_text():
    args = ["plan", LLAMA, "--seq", "64", "--batch", "2", "--gpu", "h100", "--tokens", "1000000", "--grad-accum",
            "2", "--price-per-hour", "3"]
    document = json.loads(run(*args, "--json").stdout)
    (plan,) = document["plans"]
    seconds = plan["time"]["seconds_per_step"]
    steps = -(-1_000_000 // (2 * 64 * 2))                 # 3,907
    assert plan["job"]["steps"] == steps == 3907
    assert plan["job"]["gpu_hours"] == pytest.approx(steps * 2 * seconds / 3600)
    assert plan["job"]["cost"] == pytest.approx(steps * 2 * seconds / 3600 * 3)
    assert document["setup"]["job"]["price_source"] == "--price-per-hour"
    text = run(*args).stdout
    assert "Job: 1,000,000 tokens, grad-accum 2" in text and "3,907" in text


def test_cli_epochs_and_price_table(tmp_path, monkeypatch):
    (tmp_path / "costlens.toml").write_text("[prices]\nh100 = 4.0\n")
    monkeypatch.chdir(tmp_path)
    document = json.loads(run("plan", LLAMA, "--seq", "64", "--gpu", "h100", "--dataset-tokens", "6400",
                              "--epochs", "2", "--json").stdout)
    job = document["plans"][0]["job"]
    assert job["tokens"] == 12800 and job["steps"] == 200          # 12,800 / 64
    assert job["price_per_gpu_hour"] == 4.0 and job["price_source"] == "costlens.toml [prices]"


@pytest.mark.parametrize("args, match", [
    (["--grad-accum", "4"], "prices a whole job"),
    (["--price-per-hour", "2"], "prices a whole job"),
    (["--tokens", "10", "--dataset-tokens", "10"], "not both"),
    (["--epochs", "2"], "needs --dataset-tokens"),
    (["--tokens", "1000", "--grad-accum", "0"], "positive"),
])
def test_cli_job_options_refused(args, match):
    result = run("plan", LLAMA, "--seq", "64", *args)
    assert result.exit_code == 2 and match in result.stderr and "Traceback" not in result.stderr


def test_max_cost_budget(tmp_path):
    budget = tmp_path / "costlens.toml"
    budget.write_text('[setup]\ngpu = "h100"\nseq = 64\n[job]\ntokens = 1000000000\n[prices]\nh100 = 2.0\n'
                      '[[plan]]\nname = "lora"\nspec = "lora=attn"\nmax_cost = 0.000001\n')
    result = run("check", LLAMA, "--budget", str(budget), "--format", "json")
    assert result.exit_code == 1, result.output
    (verdict,) = json.loads(result.stdout)["verdicts"]
    assert verdict["limit"] == "max_cost" and verdict["value"] > verdict["maximum"] == 0.000001
    # the cost judged is the job priced from the [prices] table: 1e9 / 64 = 15,625,000 steps x time x 2.0 / 3600
    plan = json.loads(run("plan", LLAMA, "--seq", "64", "--gpu", "h100", "--lora", "attn", "--json").stdout)["plans"][0]
    assert verdict["value"] == pytest.approx(15_625_000 * plan["time"]["seconds_per_step"] * 2.0 / 3600)


def test_max_cost_needs_a_price(tmp_path):
    from costlens.budgets import BudgetError, parse_budget
    with pytest.raises(BudgetError, match="needs a price"):
        parse_budget('[setup]\ngpu = "h100"\n[job]\ntokens = 10\n[[plan]]\nspec = "full"\nmax_cost = 5\n')


def test_amounts_never_print_an_exponent():
    from costlens.render import units
    assert [units.amount(v) for v in (12_345.6, 14.81, 0.4, 6.08e-09, 0.0)] == ["12,346", "14.81", "0.40", "< 0.01",
                                                                               "0.00"]


def test_recipe_gradient_accumulation_prices_the_job(tmp_path):
    recipe = tmp_path / "train.json"
    recipe.write_text(json.dumps({"per_device_train_batch_size": 2, "max_length": 64, "gradient_accumulation_steps": 4}))
    document = json.loads(run("plan", LLAMA, "--recipe", str(recipe), "--tokens", "5120", "--json").stdout)
    job = document["plans"][0]["job"]
    assert job["grad_accum"] == 4 and job["tokens_per_step"] == 2 * 64 * 4 and job["steps"] == 10   # 5,120 / 512
    assert document["setup"]["derived"]["grad_accum"] == "4, from --recipe gradient_accumulation_steps"
    given = json.loads(run("plan", LLAMA, "--recipe", str(recipe), "--tokens", "5120", "--grad-accum", "1",
                           "--json").stdout)
    assert given["plans"][0]["job"]["steps"] == 40 and "grad_accum" not in given["setup"]["derived"]
