"""Every option honoured or refused (issue 16 items 5-8): contradictions and absurd values give exit 2
and one line naming the reason; help texts name the right schema and every plan key."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from costlens.cli import PLAN_OPTION_KEYS, main
from costlens.cli_errors import TOLERANCE

LLAMA = str(FIXTURES / "llama.onnx")


def run(*args):
    return CliRunner().invoke(main, list(args))


def one_line_error(result, cause: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and cause in lines[0], result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("args, cause", [
    # item 5: beyond any machine (2^24 tokens per sequence, 2^20 sequences per step)
    (["--seq", "99999999999999999999999"], "beyond any machine"),
    (["--seq", str(2**24 + 1)], "beyond any machine"),
    (["--batch", str(2**20 + 1)], "beyond sanity"),
    (["--batch", str(2**20), "--seq", str(2**13)], "tokens per step is beyond any machine"),   # 2^33 > 2^32
    # item 7: silently ignored or contradictory
    (["--lora", "attn", "--rank", "ffn=8"], "'ffn' is not a --lora target"),
    (["--rank", "8"], "--rank sets a LoRA adapter, but the plan has none"),
    (["--alpha", "32"], "--alpha sets a LoRA adapter"),
    (["--lora-dropout", "0.1"], "--lora-dropout sets a LoRA adapter"),
    (["--mfu", "0.5"], "--mfu sets the utilization of --gpu's peak"),
    (["--train", "attn", "--freeze", "attn"], "attn is both in --train and in --freeze"),
    # item 8: wording
    (["--lora", "attn", "--alpha", "abc"], "--alpha: 'abc' is not a number"),
])
def test_plan_refuses_with_one_line(args, cause):
    one_line_error(run("plan", LLAMA, *args), cause)


def test_seq_within_limits_is_priced():
    assert run("plan", LLAMA, "--seq", "64", "--batch", "4").exit_code == 0


def test_duplicate_plan_names_refused():
    one_line_error(run("compare", LLAMA, "--seq", "32", "--plan", "x:lora=attn", "--plan", "x:train=ffn"),
                   "two plans are named 'x'")


def test_plans_file_unknown_key_is_named(tmp_path):
    plans = tmp_path / "plans.toml"
    plans.write_text('[[plan]]\nname = "a"\nspec = "lora=attn"\nranks = 8\n')
    one_line_error(run("compare", LLAMA, "--plans", str(plans)), "unknown key(s) ranks")
    plans.write_text('[[plan]]\nname = "a"\nspec = "lora=attn"\nrank = 8\n')     # a real key beside spec
    one_line_error(run("compare", LLAMA, "--plans", str(plans)), "give either spec or keys, not both")
    plans.write_text('[[plan]]\nname = "a"\ntrain = "ffn"\n[[plan]]\nname = "a"\ntrain = "attn"\n')
    one_line_error(run("compare", LLAMA, "--plans", str(plans)), "taken by an earlier plan")


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("0.05", 0.05), ("0", 0.0), ("1", 1.0), ("150%", 1.5),
                                         ("0.5%", 0.005)])
def test_tolerance_accepts_percent_or_fraction(text, value):
    assert TOLERANCE.convert(text, None, None) == pytest.approx(value)


@pytest.mark.parametrize("text, cause", [("-1", "cannot be negative"), ("-5%", "cannot be negative"),
                                         ("5", "would mean 500%"), ("abc", "not a tolerance"), ("nan", "finite")])
def test_tolerance_refusals(text, cause):
    with pytest.raises(click.BadParameter, match=cause):
        TOLERANCE.convert(text, None, None)
    result = run("validate", LLAMA, "--tolerance", text)          # refused while parsing: nothing runs
    assert result.exit_code == 2 and cause in result.stderr


def help_of(command: str) -> str:
    return " ".join(run(command, "--help").stdout.split())


def test_help_names_the_right_schema():
    assert "costlens.validate/1" in help_of("validate") and "costlens.plan/1" not in help_of("validate")
    assert "costlens.plan/1" in help_of("plan") and "costlens.fit/1" in help_of("fit")
    assert "costlens.gpus/1" in help_of("gpus")


def test_compare_help_lists_every_plan_key():
    text = help_of("compare").replace("- ", "-")       # click may wrap inside a hyphenated key
    for key in PLAN_OPTION_KEYS:
        assert key.replace("_", "-") in text, key


# A walk over every option of plan: each changes the document, is refused alone, or is informational.
INFORMATIONAL = {"as_json": "output format", "tracer": "how a PyTorch source is traced (ONNX: unused)",
                 "revision": "Hub revision", "recipe": "a file of other options", "peft": "a file of plan options",
                 "alpha": "does not change costs (documented)", "bandwidth": "communication time of --gpus > 1",
                 "offload": "needs a parallel layout", "shard": "needs --gpus > 1", "ep": "needs experts",
                 "stop_grad": "attn only", "stack_ffn_width": "needs --stack-ffn", "epochs": "needs --dataset-tokens",
                 "price_per_hour": "needs --tokens", "grad_accum": "needs --tokens", "dataset_tokens": "job",
                 "lora_dropout": "needs --lora", "rank": "needs --lora", "dora": "needs --lora (tests/test_dora.py)",
                 "mfu": "needs --gpu", "loss": "changes half-weight steps only (tests/test_running_dtype.py)"}
CHANGES = {"train": ["--train", "ffn"], "freeze": ["--freeze", "attn"], "lora": ["--lora", "attn"],
           "batch": ["--batch", "2"], "seq": ["--seq", "48"], "optimizer": ["--optimizer", "sgd"],
           "optimizer_impl": ["--optimizer-impl", "foreach"], "precision": ["--precision", "bf16-mixed"],
           "attention": ["--attention", "fused"], "checkpointing": ["--checkpointing"], "gpu": ["--gpu", "h100"],
           "moe_dispatch": ["--moe-dispatch", "dense"], "dropout": ["--dropout", "0.1"],
           "stack_ffn": ["--stack-ffn", "1"], "gpus": ["--gpus", "2", "--shard", "ddp"], "tp": ["--tp", "2"],
           "tokens": ["--tokens", "1000"], "base_quant": ["--quant", "nf4"],
           "experts_impl": ["--experts-impl", "grouped_mm"]}


def test_every_plan_option_is_accounted_for():
    names = {p.name for p in main.commands["plan"].params if isinstance(p, click.Option)}
    assert names == set(INFORMATIONAL) | set(CHANGES), names ^ (set(INFORMATIONAL) | set(CHANGES))


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_option_changes_the_document(name):
    import json
    # dispatch needs experts; the experts' implementation, 3-D expert tensors
    model = {"moe_dispatch": str(FIXTURES / "moe.onnx"), "experts_impl": str(FIXTURES / "moe_fused.onnx")}.get(name, LLAMA)
    common = ["--lora", "attn"] if name == "base_quant" else []                  # a quantized base must be frozen
    base = json.loads(run("plan", model, "--seq", "32", *common, "--json").stdout)
    result = run("plan", model, "--seq", "32", *common, *CHANGES[name], "--json")
    assert result.exit_code == 0, result.output
    changed = json.loads(result.stdout)
    strip = lambda d: {k: v for k, v in d.items() if k != "model"}      # noqa: E731
    assert strip(changed) != strip(base), name


def test_a_plan_that_trains_nothing_is_warned():
    result = run("plan", LLAMA, "--seq", "32", "--freeze", "all")
    assert result.exit_code == 0 and "warning: plan" in result.stderr and "trains no parameter" in result.stderr
    assert "warning" not in run("plan", LLAMA, "--seq", "32", "--freeze", "attn").stderr
