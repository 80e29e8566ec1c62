"""`costlens check` and `costlens report`: exit codes, one-line errors, every output format."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import click
import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from costlens.cli import main
from costlens.cli_ci import check, register, report

LLAMA = str(FIXTURES / "llama.onnx")
SETUP = '[setup]\nbatch = 2\nseq = 64\ngpu = "l4"\n'
# llama at batch 2, seq 64: full trains 158,016 parameters; LoRA r=8 on attention adds 7,168
GENEROUS = ('[[plan]]\nname = "full"\nspec = "full"\npeak_memory = "fits: l4"\ntrainable_params = "1M"\n'
            'step_flops = "1 PFLOP"\ntime_per_step = "1s"\n'
            '[[plan]]\nname = "lora"\nspec = "lora=attn;rank=8"\ntrainable_params = 7168\n')


def budget_file(tmp_path, text: str, name: str = "costlens.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("costlens: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_all_limits_met_exits_0(tmp_path):
    result = run(check, LLAMA, "--budget", budget_file(tmp_path, SETUP + GENEROUS))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("ok ") for line in lines[:5])
    assert "lora: trainable_params 7.17K <= 7.17K" in result.stdout     # at the limit passes
    assert lines[-1].startswith("costlens check: all 5 budget limits met")


@pytest.mark.parametrize("limit, expected", [
    ('peak_memory = "1MiB"', "FAIL  full: peak_memory"),
    ('peak_memory = "fits: l4"\nheadroom = 0.99999999', "FAIL  full: peak_memory"),
    ('trainable_params = "100K"', "FAIL  full: trainable_params 158.02K > 100.00K (100K, plan[0].trainable_params); "
                                  "over by 58.02K (+58.0%)"),
    ('step_flops = "1 MFLOP"', "FAIL  full: step_flops"),
    ('time_per_step = "1us"', "FAIL  full: time_per_step"),
])
def test_each_kind_of_violation_exits_1_with_one_line(tmp_path, limit, expected):
    result = run(check, LLAMA, "--budget", budget_file(tmp_path, f'{SETUP}[[plan]]\nspec = "full"\n{limit}\n'))
    assert result.exit_code == 1, result.stderr
    assert result.stderr == ""
    fail = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1 and fail[0].startswith(expected) and "over by" in fail[0]
    assert "costlens check: 1 of 1 budget limits exceeded" in result.stdout


@pytest.mark.parametrize("text, fragments", [
    ('[setup]\nbatch = 4x\n', ["costlens.toml:2: not valid TOML (key 'batch')"]),
    (SETUP + '[[plan]]\nspec = "full"\npeak_memory = "24 gigs"\n', ["costlens.toml:7: plan[0].peak_memory", "'24 gigs'"]),
    (SETUP + '[[plan]]\nspec = "full"\nmax_flops = 1\n', ["costlens.toml:7: plan[0].max_flops: unknown key"]),
    ('[setup]\noptimizer = "adam"\n[[plan]]\nspec = "full"\nstep_flops = 1\n', ["costlens.toml:2: setup.optimizer"]),
    ('[[plan]]\nspec = "full"\ntime_per_step = "1s"\n', ["costlens.toml:3: plan[0].time_per_step", "gpu"]),
])
def test_malformed_budget_exits_2_naming_line_and_key(tmp_path, text, fragments):
    one_line_error(run(check, LLAMA, "--budget", budget_file(tmp_path, text)), *fragments)


def test_bad_input_exits_2(tmp_path):
    budget = budget_file(tmp_path, SETUP + GENEROUS)
    one_line_error(run(check, LLAMA, "--budget", tmp_path / "absent.toml"), "no such budget file")
    one_line_error(run(check, tmp_path / "absent.onnx", "--budget", budget), "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    one_line_error(run(check, tmp_path / "junk.onnx", "--budget", budget))
    # a plan the model cannot take: llama is dense
    dense = budget_file(tmp_path, '[[plan]]\nname = "moe"\nspec = "lora=experts"\nstep_flops = 1\n', "moe.toml")
    one_line_error(run(check, LLAMA, "--budget", dense), "plan 'moe'", "dense model")
    assert run(check, LLAMA, "--budget", budget, "--format", "yaml").exit_code == 2


@pytest.fixture
def over_budget(tmp_path):
    """One violation (full's parameters) among three limits."""
    return budget_file(tmp_path, SETUP + '[[plan]]\nname = "full"\nspec = "full"\ntrainable_params = "100K"\n'
                                         'step_flops = "1 PFLOP"\n[[plan]]\nname = "lora <&>"\nspec = "lora=attn"\n'
                                         'trainable_params = "10K"\n')


def test_format_json(over_budget):
    result = run(check, LLAMA, "--budget", over_budget, "--format", "json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["schema"] == "costlens.check/1" and document["passed"] is False
    assert (document["n_limits"], document["n_failed"]) == (3, 1)
    assert document["setup"]["batch"] == 2 and document["setup"]["gpu"] == "l4"
    first = document["verdicts"][0]
    assert first == {"plan": "full", "limit": "trainable_params", "value": 158016, "maximum": 100000, "written": "100K",
                     "where": "plan[0].trainable_params", "passed": False, "excess": 58016,
                     "excess_fraction": pytest.approx(0.58016)}


def test_format_junit(over_budget, tmp_path):
    out = tmp_path / "junit.xml"
    result = run(check, LLAMA, "--budget", over_budget, "--format", "junit", "-o", out)
    assert result.exit_code == 1
    assert "FAIL  full: trainable_params" in result.stdout              # the log still shows the lines
    root = ET.parse(out).getroot()
    assert root.tag == "testsuites" and (root.get("tests"), root.get("failures")) == ("3", "1")
    (suite,) = root
    cases = suite.findall("testcase")
    assert [c.get("classname") for c in cases] == ["costlens.full", "costlens.full", "costlens.lora <&>"]
    failures = [c for c in cases if c.find("failure") is not None]
    assert len(failures) == 1 and failures[0].get("name") == "trainable_params <= 100K"
    assert "over by 58.02K" in failures[0].find("failure").get("message")


def test_format_markdown(over_budget):
    result = run(check, LLAMA, "--budget", over_budget, "--format", "markdown")
    assert result.exit_code == 1
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "### ❌ costlens budget check: 1 of 3 budget limits exceeded"
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| | plan | limit | value | maximum | margin |" and len(table) == 2 + 3
    assert table[2].startswith("| ❌ | full | trainable params | 158.02K | 100.00K (100K) | over by 58.02K (+58.0%) |")
    assert "| ✅ | lora &lt;&amp;&gt; |" in result.stdout                # cells escaped for a PR comment
    assert all(line.count(" | ") == 5 for line in table[2:])


def test_format_text_passing_markdown(tmp_path):
    result = run(check, LLAMA, "--budget", budget_file(tmp_path, SETUP + GENEROUS), "--format", "markdown")
    assert result.exit_code == 0 and result.stdout.startswith("### ✅ costlens budget check: all 5 budget limits met")


def test_check_writes_the_html_report_with_verdicts(over_budget, tmp_path):
    page = tmp_path / "report.html"
    result = run(check, LLAMA, "--budget", over_budget, "--html", page)
    assert result.exit_code == 1
    html = page.read_text()
    assert "Budget: 1 of 3 limits exceeded" in html and "lora &lt;&amp;&gt;" in html


def test_report_from_saved_json(tmp_path):
    saved = tmp_path / "estimate.json"
    result = CliRunner().invoke(main, ["compare", LLAMA, "--seq", "64", "--json"])
    assert result.exit_code == 0, result.stderr
    saved.write_text(result.stdout)
    page = tmp_path / "report.html"
    result = run(report, saved, "-o", page, "--gpu", "h100")
    assert result.exit_code == 0, result.stderr
    html = page.read_text()
    for plan in json.loads(saved.read_text())["plans"]:
        assert f">{plan['name']}<" in html
    assert "h100-80gb (80.00 GiB" in html
    budget = budget_file(tmp_path, '[setup]\nseq = 64\n[[plan]]\nname = "full"\nspec = "full"\n'
                                   'trainable_params = "100K"\n')
    result = run(report, saved, "-o", page, "--budget", budget)
    assert result.exit_code == 0 and "Budget: 1 of 1 limits exceeded" in page.read_text()
    mismatch = budget_file(tmp_path, '[setup]\nseq = 128\n[[plan]]\nspec = "full"\nstep_flops = 1\n', "b.toml")
    one_line_error(run(report, saved, "-o", page, "--budget", mismatch), "seq = 128", "seq = 64")


def test_report_bad_input_exits_2(tmp_path):
    page = tmp_path / "report.html"
    one_line_error(run(report, tmp_path / "absent.json", "-o", page), "no such file")
    (tmp_path / "bad.json").write_text("{not json")
    one_line_error(run(report, tmp_path / "bad.json", "-o", page), "bad.json:1: not JSON")
    (tmp_path / "inspect.json").write_text(json.dumps({"schema": "costlens.inspect/1"}))
    one_line_error(run(report, tmp_path / "inspect.json", "-o", page), "not a costlens.plan/1 document")
    saved = tmp_path / "estimate.json"
    saved.write_text(CliRunner().invoke(main, ["compare", LLAMA, "--seq", "64", "--json"]).stdout)
    one_line_error(run(report, saved, "-o", tmp_path / "no" / "dir" / "r.html"), "cannot write")
    one_line_error(run(report, saved, "-o", page, "--gpu", "tpu"), "unknown GPU 'tpu'")
    assert not page.exists()


def test_register_adds_both_commands():
    group = click.Group("costlens")
    register(group)
    assert set(group.commands) == {"report", "check"}
    assert CliRunner().invoke(group, ["check", "--help"]).exit_code == 0


# ---------------------------------------------------------------- source defaults (issue 16 leftovers, item 1)

HF_LLAMA = str(FIXTURES / "hf" / "llama.config.json")
HF_BUDGET = '[setup]\nbatch = 2\nseq = 64\n{extra}[[plan]]\nname = "lora"\nspec = "lora=attn;rank=8"\npeak_memory = "fits: l4"\n'


def _check_peak_and_setup(tmp_path, extra: str = "") -> tuple[float, dict]:
    result = run(check, HF_LLAMA, "--budget", budget_file(tmp_path, HF_BUDGET.format(extra=extra)), "--format", "json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    (verdict,) = [v for v in document["verdicts"] if v["limit"] == "peak_memory"]
    return verdict["value"], document["setup"]


def _plan_peak_and_setup(*options) -> tuple[float, dict]:
    result = run(main, "plan", HF_LLAMA, "--batch", 2, "--seq", 64, "--lora", "attn", "--rank", 8, "--json", *options)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    return document["plans"][0]["memory_bytes"]["peak"], document["setup"]


def test_check_prices_an_hf_config_as_plan_does(tmp_path):
    """A budget on an HF config gets the defaults `costlens plan` derives (SDPA where the
    transformers class supports it, the transformers loss), with the same reasons."""
    transformers = pytest.importorskip("transformers")
    peak, setup = _check_peak_and_setup(tmp_path)
    plan_peak, plan_setup = _plan_peak_and_setup()
    assert peak == plan_peak
    assert setup["derived"] == plan_setup["derived"]
    supports_sdpa = transformers.LlamaForCausalLM._supports_sdpa          # what transformers itself would run
    assert (setup["attention"], setup["loss"]) == ("sdpa" if supports_sdpa else "eager", "hf")
    assert set(setup["derived"]) >= {"loss"}
    # the library's fixed defaults price another step: the test would catch check keeping them
    fixed_peak, _ = _plan_peak_and_setup("--attention", "eager", "--loss", "ce", "--experts-impl", "eager")
    assert fixed_peak != peak


def test_check_honours_setup_keys_the_budget_sets(tmp_path):
    pytest.importorskip("transformers")
    peak, setup = _check_peak_and_setup(tmp_path, 'attention = "eager"\nloss = "ce"\n')
    plan_peak, plan_setup = _plan_peak_and_setup("--attention", "eager", "--loss", "ce")
    assert peak == plan_peak and (setup["attention"], setup["loss"]) == ("eager", "ce")
    assert "attention" not in setup["derived"] and "loss" not in setup["derived"]
    assert setup["derived"] == plan_setup["derived"]


def test_check_names_the_budget_for_a_shape_a_static_export_cannot_price(tmp_path):
    """[setup] batch 4 on a file exported at [1, 32] (a dim of 1 is never re-bound): refused, one line."""
    from test_static_shapes import _graph
    _graph(tmp_path / "one.onnx", [1, 32])
    budget = budget_file(tmp_path, '[setup]\nbatch = 4\n[[plan]]\nspec = "full"\nstep_flops = "1 PFLOP"\n')
    one_line_error(run(check, tmp_path / "one.onnx", "--budget", budget), "[setup]", "not batch 4")
    budget = budget_file(tmp_path, '[[plan]]\nspec = "full"\nstep_flops = "1 PFLOP"\n', "own.toml")
    result = run(check, tmp_path / "one.onnx", "--budget", budget, "--format", "json")
    assert result.exit_code == 0, result.stderr                   # its own shape is the default
    assert (json.loads(result.stdout)["setup"]["batch"], json.loads(result.stdout)["setup"]["seq"]) == (1, 32)
