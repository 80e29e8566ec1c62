"""Budget files: units, defaults and overrides, malformed files (line and key named), verdicts."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT
from costlens import gpus
from costlens.budgets import BudgetError, Limit, judge, load_budget, parse_budget, parse_quantity, setup_of
from costlens.errors import CostlensError

GiB = 2**30


@pytest.mark.parametrize("text, limit, expected", [
    ("24GiB", Limit.PEAK_MEMORY, 24 * GiB),
    ("512MiB", Limit.PEAK_MEMORY, 512 * 2**20),
    ("80GB", Limit.PEAK_MEMORY, 80e9),
    ("1.5 TiB", Limit.PEAK_MEMORY, 1.5 * 2**40),
    (1_000_000, Limit.PEAK_MEMORY, 1e6),
    ("50M", Limit.TRAINABLE_PARAMS, 50e6),
    ("1.2B", Limit.TRAINABLE_PARAMS, 1.2e9),
    ("350k", Limit.TRAINABLE_PARAMS, 350e3),
    (7168, Limit.TRAINABLE_PARAMS, 7168),
    ("2.5e15", Limit.STEP_FLOPS, 2.5e15),
    (2.5e15, Limit.STEP_FLOPS, 2.5e15),
    ("3 PFLOP", Limit.STEP_FLOPS, 3e15),
    ("800 TFLOPs", Limit.STEP_FLOPS, 8e14),
    ("1.2s", Limit.TIME_PER_STEP, 1.2),
    ("500ms", Limit.TIME_PER_STEP, 0.5),
    ("2min", Limit.TIME_PER_STEP, 120),
    (3, Limit.TIME_PER_STEP, 3),
])
def test_quantities(text, limit, expected):
    assert parse_quantity(text, limit) == pytest.approx(expected)


@pytest.mark.parametrize("text, limit", [
    ("24 gigs", Limit.PEAK_MEMORY), ("-1GiB", Limit.PEAK_MEMORY), ("50M", Limit.PEAK_MEMORY),
    ("50 mega", Limit.TRAINABLE_PARAMS), (True, Limit.TRAINABLE_PARAMS), ("3 PB", Limit.STEP_FLOPS),
    ("1.2 fortnights", Limit.TIME_PER_STEP), ([1], Limit.STEP_FLOPS), (float("inf"), Limit.STEP_FLOPS),
])
def test_bad_quantities(text, limit):
    with pytest.raises(ValueError):
        parse_quantity(text, limit)


def test_sample_budget_file_parses():
    budget = load_budget(ROOT / "costlens.toml")
    assert dict(budget.setup) == {"batch": 4, "seq": 2048, "gpu": "h100-80gb"}
    lora, full = budget.plans
    assert (lora.name, lora.spec) == ("lora-attn", "lora=attn;rank=8")
    bounds = {b.limit: b for b in lora.bounds}
    # fits: h100-80gb with 10% headroom = 0.9 * 80 GiB
    assert bounds[Limit.PEAK_MEMORY].maximum == pytest.approx(0.9 * 80 * GiB)
    assert bounds[Limit.PEAK_MEMORY].where == "defaults.peak_memory"
    assert bounds[Limit.TRAINABLE_PARAMS].maximum == 50e6
    assert bounds[Limit.STEP_FLOPS].maximum == 2.5e15
    assert bounds[Limit.TIME_PER_STEP].maximum == 1.2
    # the full plan's own size overrides the defaults' "fits:" (and the headroom does not apply)
    (memory,) = full.bounds
    assert memory.maximum == 80 * GiB and memory.where == "plan[1].peak_memory"
    assert budget.gpu == "h100-80gb"
    assert setup_of(budget).batch == 4 and setup_of(budget).gpu == "h100-80gb"


def test_plan_as_keys_like_a_plans_file():
    budget = parse_budget('[defaults]\nstep_flops = 1\n[[plan]]\nname = "moe-lora"\nlora = "attn,router"\n'
                          'rank = "attn=8,router=4"\nstop_grad = "attn"\n[[plan]]\nname = "everything"\n')
    keyed, full = budget.plans
    assert (keyed.name, keyed.spec) == ("moe-lora", "lora=attn,router;rank=attn=8,router=4;stop-grad=attn")
    assert (full.name, full.spec) == ("everything", "full")


def test_a_gpu_in_setup_steps_the_optimizer_with_foreach_as_compare_does():
    budget = parse_budget('[setup]\ngpu = "l4"\n[[plan]]\nspec = "full"\nstep_flops = 1\n')
    assert setup_of(budget).optimizer_impl == "foreach"
    budget = parse_budget('[[plan]]\nspec = "full"\nstep_flops = 1\n')
    assert setup_of(budget).optimizer_impl == "for-loop"


def test_plan_headroom_overrides_defaults_and_aliases_resolve():
    budget = parse_budget('[defaults]\npeak_memory = "fits: a100"\nheadroom = 0.2\n'
                          '[[plan]]\nspec = "full"\n[[plan]]\nspec = "lora=attn"\nheadroom = 0.5\n')
    first, second = (plan.bounds[0] for plan in budget.plans)
    assert first.maximum == pytest.approx(0.8 * 80 * GiB) and first.written == "fits: a100-80gb (20% headroom)"
    assert second.maximum == pytest.approx(0.5 * 80 * GiB)
    assert budget.plans[1].name == "lora=attn"       # no name: the spec names the plan, as in compare


MALFORMED = [
    # (file text, the line, what the message names)
    ('[setup]\nbatch = 4x\n', 2, "not valid TOML (key 'batch')"),
    ('[[plan]]\nspec = "full"\nspec = "x"\n', 3, "not valid TOML (key 'spec')"),
    ('[[plan]\nspec = "full"\n', 1, "not valid TOML"),
    ('[setup]\nbatch = "4"\n[[plan]]\nspec = "full"\nstep_flops = 1\n', 2, "setup.batch: expected int"),
    ('[setup]\nbacth = 4\n[[plan]]\nspec = "full"\nstep_flops = 1\n', 2, "setup.bacth: unknown setup key"),
    ('[setup]\noptimizer = "adam"\n[[plan]]\nspec = "full"\nstep_flops = 1\n', 2, "setup.optimizer: 'adam' is not one of"),
    ('[setup]\noptimizer_impl = "fused"\n[[plan]]\nspec = "full"\nstep_flops = 1\n', 2, "setup.optimizer_impl: 'fused'"),
    ('[setup]\nseq = 0\n[[plan]]\nspec = "full"\nstep_flops = 1\n', 2, "setup.seq: must be positive"),
    ('[setup]\ngpu = "tpu-v9"\n[[plan]]\nspec = "full"\nstep_flops = 1\n', 2, "setup.gpu: unknown GPU 'tpu-v9'"),
    ('[defaults]\nstep_flops = 1\n', None, "plan: name at least one plan"),
    ('[[plan]]\nspec = "full"\n', 1, "plan[0]: plan 'full' has no limits"),
    ('[[plan]]\nname = "a"\nlora = "attn"\nspec = "full"\nstep_flops = 1\n', 3, "plan[0].lora: give the plan as spec"),
    ('[[plan]]\nname = "a"\nlora = "attn"\nrank = 0\nstep_flops = 1\n', 3, "plan[0].lora: --rank: must be positive"),
    ('[[plan]]\nname = "a"\nspec = ""\nstep_flops = 1\n', 3, "plan[0].spec: must be a plan spec"),
    ('[defaults]\nstep_flops = 1\n[[plan]]\nspec = "full"\n[[plan]]\nspec = "lora=attn;rank=x"\n', 6,
     "plan[1].spec: --rank: 'x' is not a whole number"),
    ('[defaults]\nstep_flops = 1\n[[plan]]\nspec = "full"\n[[plan]]\nspec = "full"\n', 6, "plan[1].spec: plan 'full' appears twice"),
    ('[defaults]\nstep_flops = 1\n[[plan]]\nname = "a"\nspec = "full"\n[[plan]]\nname = "a"\nspec = "x:lora=attn"\n', 7,
     "plan[1].name: plan 'a' appears twice"),
    ('[[plan]]\nspec = "full"\npeak_mem = "1GiB"\n', 3, "plan[0].peak_mem: unknown key"),
    ('[[plan]]\nspec = "full"\nstep_flops = 1\n\n[[plan]]\nname = "big"\nspec = "full"\ntrainable_params = "50 mega"\n', 8,
     "plan[1].trainable_params: '50 mega' is not a trainable params limit"),
    ('[[plan]]\nspec = "full"\npeak_memory = "fits: tpu"\n', 3, "plan[0].peak_memory: unknown GPU 'tpu'"),
    ('[defaults]\npeak_memory = "fits: l4"\nheadroom = 1.5\n[[plan]]\nspec = "full"\n', 3, "defaults.headroom: must be a fraction"),
    ('[defaults]\npeak_memory = "24GiB"\nheadroom = 0.1\n[[plan]]\nspec = "full"\n', 3, "defaults.headroom: headroom applies"),
    ('[[plan]]\nspec = "full"\nheadroom = 0.1\nstep_flops = 1\n', 3, "plan[0].headroom: headroom without a peak_memory"),
    ('[[plan]]\nspec = "full"\ntime_per_step = "1s"\n', 3, "plan[0].time_per_step: a time limit needs the accelerator"),
    ('budget = 1\n[[plan]]\nspec = "full"\nstep_flops = 1\n', 1, "budget: unknown table or key"),
    ('setup = 3\n[[plan]]\nspec = "full"\nstep_flops = 1\n', 1, "setup: must be a table"),
]


@pytest.mark.parametrize("text, line, names", MALFORMED)
def test_malformed_budget_names_line_and_key(text, line, names):
    with pytest.raises(BudgetError) as caught:
        parse_budget(text, "costlens.toml")
    message = str(caught.value)
    where = f"costlens.toml:{line}: " if line else "costlens.toml:?: "
    assert message.startswith(where), message
    assert names in message, message
    assert "\n" not in message


def test_missing_and_unreadable_budget_files(tmp_path):
    with pytest.raises(BudgetError, match="no such budget file"):
        load_budget(tmp_path / "absent.toml")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BudgetError, match="cannot read"):
        load_budget(tmp_path / "binary.toml")


def document(**memory) -> dict:
    """A costlens.plan/1 document of one plan, small enough to check by hand."""
    plan = {"name": "lora", "spec": "lora=attn", "params": {"trainable": 7168, "total": 165184},
            "flops": {"step": 4 * 10**12}}
    if memory:
        plan["memory_bytes"] = memory
    return {"schema": "costlens.plan/1", "setup": {"batch": 1, "seq": 64}, "plans": [plan]}


def verdicts_for(limits: str, doc: dict, setup: str = ""):
    return judge(parse_budget(f"{setup}\n[[plan]]\nname = \"lora\"\nspec = \"lora=attn\"\n{limits}\n"), doc)


def test_every_limit_passes_within_budget():
    doc = document(peak=20 * GiB)
    doc["plans"][0]["job"] = {"cost": 100.0}
    verdicts = verdicts_for('peak_memory = "fits: l4"\ntrainable_params = "8K"\nstep_flops = "4 TFLOP"\n'
                            'time_per_step = "1s"\nmax_cost = 150', doc,
                            setup='[setup]\ngpu = "h100"\n[job]\ntokens = 1000\nprice_per_hour = 2.0')
    assert [v.limit for v in verdicts] == list(Limit) and all(v.passed for v in verdicts)
    flops = next(v for v in verdicts if v.limit is Limit.STEP_FLOPS)
    assert flops.excess == 0                                     # at the limit is within it


@pytest.mark.parametrize("limit_line, limit, value, excess", [
    # 30 GiB peak against an L4's 24 GiB
    ('peak_memory = "fits: l4"', Limit.PEAK_MEMORY, 30 * GiB, 6 * GiB),
    # 30 GiB against 24 GiB less 10% = 21.6 GiB
    ('peak_memory = "fits: l4"\nheadroom = 0.1', Limit.PEAK_MEMORY, 30 * GiB, 30 * GiB - 0.9 * 24 * GiB),
    ('peak_memory = "16GiB"', Limit.PEAK_MEMORY, 30 * GiB, 14 * GiB),
    ('trainable_params = "7K"', Limit.TRAINABLE_PARAMS, 7168, 168),
    ('step_flops = "1 TFLOP"', Limit.STEP_FLOPS, 4e12, 3e12),
])
def test_each_kind_of_violation(limit_line, limit, value, excess):
    (verdict,) = verdicts_for(limit_line, document(peak=30 * GiB))
    assert verdict.limit is limit and not verdict.passed
    assert verdict.value == value and verdict.excess == pytest.approx(excess)


def test_time_violation_uses_the_setup_gpu_and_mfu():
    # 4e12 FLOP / (989.5e12 FLOP/s * 0.5) = 8.085 ms
    (verdict,) = verdicts_for('time_per_step = "5ms"', document(), setup='[setup]\ngpu = "h100"\nmfu = 0.5')
    assert not verdict.passed
    assert verdict.value == pytest.approx(4e12 / (gpus.gpu("h100").peak_flops * 0.5))
    assert verdict.value == pytest.approx(8.085e-3, rel=1e-3)


def test_time_from_the_document_when_the_estimate_has_it():
    doc = document()
    doc["plans"][0]["time"] = {"gpu": "h100-80gb", "peak_flops": 989.5e12, "mfu": 0.4, "seconds_per_step": 2.0}
    (verdict,) = verdicts_for('time_per_step = "1.5s"', doc, setup='[setup]\ngpu = "h100"')
    assert verdict.value == 2.0 and verdict.excess == 0.5


def test_memory_limit_without_memory_figures_is_an_error_not_a_pass():
    with pytest.raises(CostlensError, match="peak_memory cannot be checked"):
        verdicts_for('peak_memory = "1GiB"', document())


def test_budget_plan_missing_from_the_document():
    with pytest.raises(BudgetError, match="'other' is not in the estimate"):
        judge(parse_budget('[[plan]]\nname = "other"\nspec = "full"\nstep_flops = 1\n'), document())


def test_gpu_table():
    assert gpus.gpu("H100").name == "h100-80gb" and gpus.gpu(" a100 ").memory_bytes == 80 * GiB
    assert gpus.gpu("a100-40gb").peak_flops == 312e12
    assert all(g.memory_bytes > 0 and g.peak_flops > 0 for g in gpus.GPUS.values())
    assert all(target in gpus.GPUS for target in gpus.ALIASES.values())
    with pytest.raises(CostlensError, match="unknown GPU"):
        gpus.gpu("tpu")



def test_time_limit_of_an_old_document_uses_the_precision_peak():
    """Issue 16 item 2: a saved document without plans[].time is timed at its precision's peak
    (fp32: H100 SXM 67 TFLOP/s dense), not the bf16 tensor-core one."""
    doc = document(peak=GiB)
    doc["setup"]["precision"] = "fp32"
    (verdict,) = verdicts_for('time_per_step = "1s"', doc, setup='[setup]\ngpu = "h100"\nmfu = 0.5')
    assert verdict.value == pytest.approx(4e12 / (67e12 * 0.5))          # 0.119 s


def test_custom_gpu_and_prices_tables():
    budget = parse_budget('[gpu.my-card]\nmemory = "48GiB"\nbf16_tflops = 100\n[prices]\nmy-card = 1.5\n'
                          '[setup]\ngpu = "my-card"\n[job]\ntokens = 1000\n'
                          '[[plan]]\nspec = "full"\npeak_memory = "fits: my-card"\nmax_cost = 10\n')
    assert budget.prices == {"my-card": 1.5} and budget.job["tokens"] == 1000
    (memory, cost) = budget.plans[0].bounds
    assert memory.maximum == 48 * GiB and cost.maximum == 10
    from costlens.budgets import job_of
    job = job_of(budget)
    assert job.price_per_gpu_hour == 1.5 and job.price_source == "costlens.toml [prices]"


@pytest.mark.parametrize("text, names", [
    ('[job]\nbogus = 1\n[[plan]]\nspec = "full"\nstep_flops = 1\n', "job.bogus"),
    ('[job]\ntokens = -5\n[[plan]]\nspec = "full"\nstep_flops = 1\n', "must be a positive number"),
    ('[prices]\nh100 = "cheap"\n[[plan]]\nspec = "full"\nstep_flops = 1\n', "non-negative price"),
    ('[gpu.x]\nmemory = "1GiB"\n[[plan]]\nspec = "full"\nstep_flops = 1\n', "needs bf16_tflops"),
    ('[[plan]]\nspec = "full"\nmax_cost = 5\n', "max_cost needs the job"),
])
def test_job_tables_malformed(text, names):
    with pytest.raises(BudgetError, match=re.escape(names)):
        parse_budget(text, "costlens.toml")


def test_derived_optimizer_impl_is_recorded():
    from costlens.budgets import derived_of
    assert "from [setup] gpu" in derived_of(parse_budget('[setup]\ngpu = "h100"\n[[plan]]\nspec = "full"\nstep_flops = 1\n'))["optimizer_impl"]
    assert derived_of(parse_budget('[setup]\ngpu = "h100"\noptimizer_impl = "for-loop"\n'
                                   '[[plan]]\nspec = "full"\nstep_flops = 1\n')) == {}


def test_setup_of_a_source_takes_the_defaults_plan_derives():
    """costlens/defaults.py is the one home: the budget's Setup on an HF config equals what the
    Python API's setup_for gives for the same values, keys the file sets win."""
    pytest.importorskip("transformers")
    from costlens.api import setup_for
    from costlens.budgets import derived_of
    config = str(ROOT / "fixtures" / "hf" / "llama.config.json")
    budget = parse_budget('[setup]\nbatch = 2\ngpu = "l4"\n[[plan]]\nspec = "full"\nstep_flops = 1\n')
    assert setup_of(budget, config) == setup_for(config, batch=2, gpu="l4")
    assert setup_of(budget, config).loss == "hf" and setup_of(budget).loss == "ce"     # no source: fixed defaults
    reasons = derived_of(budget, config)
    assert reasons["optimizer_impl"].startswith("foreach, from [setup] gpu = 'l4'") and "loss" in reasons
    chosen = parse_budget('[setup]\nloss = "ce"\nattention = "fused"\n[[plan]]\nspec = "full"\nstep_flops = 1\n')
    assert (setup_of(chosen, config).loss, setup_of(chosen, config).attention) == ("ce", "fused")
    assert "loss" not in derived_of(chosen, config) and "attention" not in derived_of(chosen, config)
