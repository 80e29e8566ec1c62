"""`costlens plan` / `compare`: exit codes, one-line errors, the costlens.plan/1 document."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from costlens.cli import main

LLAMA = str(FIXTURES / "llama.onnx")
MOE = str(FIXTURES / "moe.onnx")


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args, cause", [
    (["--train", "bogus"], "unknown role 'bogus'"),
    (["--lora", "attn", "--rank", "0"], "must be positive"),
    (["--lora", "attn", "--rank", "-3"], "must be positive"),
    (["--lora", "attn", "--rank", "attn=x"], "not a whole number"),
    (["--lora", "experts"], "dense model"),
    (["--train", "router"], "dense model"),
    (["--lora", "embed"], "not a linear role"),
    (["--train", "layers:0-7"], "layers 0-1"),
    (["--stop-grad", "ffn"], "only 'attn'"),
    (["--seq", "0"], "positive"),
])
def test_bad_plan_is_one_line_and_exit_2(args, cause):
    result = run("plan", LLAMA, *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("costlens: error:") and cause in lines[0]
    assert result.stdout == ""


def test_seq_beyond_learned_positions_is_refused():
    result = run("plan", str(FIXTURES / "gpt2.onnx"), "--seq", "4096")
    assert result.exit_code == 2 and "position table" in result.stderr


def test_plan_json_document():
    result = run("plan", LLAMA, "--lora", "attn", "--rank", "8", "--seq", "64", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema"] == "costlens.plan/1"
    assert (document["setup"]["batch"], document["setup"]["seq"]) == (1, 64)
    assert document["setup"]["optimizer"] == "adamw" and document["setup"]["gpu"] is None
    (plan,) = document["plans"]
    memory = plan["memory_bytes"]
    assert set(memory) == {"weights", "gradients", "optimizer", "activations", "peak"}
    assert memory["peak"] >= memory["weights"] + memory["optimizer"]
    assert plan["peak_phase"] in ("forward", "backward", "optimizer")
    # LoRA r=8 on q,k,v,o of 2 layers: q,o are 64->64, k,v are 64->32
    # per layer 8*(64+64)*2 + 8*(64+32)*2 = 2048 + 1536 = 3584; two layers = 7168
    assert plan["params"]["adapter"] == 7168 == plan["params"]["trainable"]
    flops = plan["flops"]
    assert flops["backward"] == flops["backward_input"] + flops["backward_weight"]
    assert flops["step"] == flops["forward"] + flops["backward"] + flops["recompute"]
    assert all(isinstance(v, int) for v in flops.values())


def test_compare_default_plans_fit_the_model():
    dense = json.loads(run("compare", LLAMA, "--seq", "32", "--json").stdout)
    assert [p["name"] for p in dense["plans"]] == ["full", "freeze-attn", "ffn-only", "lora-attn-r8", "lora-attn-ffn-r8"]
    moe = json.loads(run("compare", MOE, "--seq", "32", "--json").stdout)
    names = [p["name"] for p in moe["plans"]]
    assert "lora-attn-router-experts" in names and "router-only" in names
    # router LoRA r=4 on 64->4 (2 layers): 4*(64+4)*2 = 544 of the adapters
    router_only = next(p for p in moe["plans"] if p["name"] == "router-only")
    assert router_only["params"]["trainable"] == 2 * 64 * 4


def test_compare_text_table():
    result = run("compare", LLAMA, "--plan", "mine:freeze=attn", "--seq", "32")
    assert result.exit_code == 0 and "mine" in result.stdout and "trainable" in result.stdout


def test_gpu_gives_time_per_step():
    document = json.loads(run("plan", LLAMA, "--seq", "32", "--gpu", "h100", "--mfu", "0.5", "--json").stdout)
    (plan,) = document["plans"]
    # fp32 matmuls run at the H100 SXM fp32 peak (67 TFLOP/s dense, datasheet), not the bf16 one:
    # compute = step FLOPs / (67e12 x 0.5); memory = 2 x (weights + grads + optimizer + activations) / 3.35e12 B/s
    memory = plan["memory_bytes"]
    traffic = 2 * (memory["weights"] + memory["gradients"] + memory["optimizer"] + memory["activations"])
    compute_s, memory_s = plan["flops"]["step"] / (67e12 * 0.5), traffic / 3.35e12
    assert plan["time"]["dtype"] == "fp32" and plan["time"]["peak_flops"] == 67e12
    assert plan["time"]["compute_seconds"] == pytest.approx(compute_s)
    assert plan["time"]["memory_seconds"] == pytest.approx(memory_s)
    assert plan["time"]["seconds_per_step"] == pytest.approx(max(compute_s, memory_s))
    assert plan["time"]["bound"] == ("memory" if memory_s > compute_s else "compute")
    assert document["setup"]["optimizer_impl"] == "foreach"    # torch's default on CUDA
    assert "optimizer_impl" in document["setup"]["derived"]     # ... and said to come from --gpu


def test_precision_picks_the_peak():
    """Issue 16 item 2: bf16 autocast is priced at the bf16 peak, fp32 at the fp32 one (same FLOPs)."""
    def compute(precision):
        doc = json.loads(run("plan", LLAMA, "--seq", "32", "--gpu", "h100", "--precision", precision, "--json").stdout)
        return doc["plans"][0]["flops"]["step"], doc["plans"][0]["time"]
    flops32, fp32 = compute("fp32")
    flops16, bf16 = compute("bf16-mixed")
    assert (fp32["dtype"], bf16["dtype"]) == ("fp32", "bf16")
    assert fp32["compute_seconds"] == pytest.approx(flops32 / (67e12 * 0.4))
    assert bf16["compute_seconds"] == pytest.approx(flops16 / (989.5e12 * 0.4))


def test_derived_default_in_text_header():
    """Issue 16 item 1: --gpu switching the optimizer to foreach is printed in the header."""
    text = run("plan", LLAMA, "--seq", "32", "--gpu", "h100").stdout
    assert "adamw (foreach)" in text and "derived defaults: optimizer-impl foreach, from --gpu h100" in text
    plain = run("plan", LLAMA, "--seq", "32").stdout
    assert "adamw (for-loop)" in plain and "derived defaults" not in plain
    given = json.loads(run("plan", LLAMA, "--seq", "32", "--gpu", "h100", "--optimizer-impl", "for-loop",
                           "--json").stdout)
    assert given["setup"]["derived"] == {} and given["setup"]["optimizer_impl"] == "for-loop"


def test_unknown_gpu_is_one_line():
    result = run("plan", LLAMA, "--gpu", "tpu-v9")
    assert result.exit_code == 2 and "unknown GPU" in result.stderr


def test_plans_file(tmp_path):
    plans = tmp_path / "plans.toml"
    plans.write_text('[[plan]]\nname = "r16"\nspec = "lora=attn;rank=16"\n\n'
                     '[[plan]]\nname = "stacked"\nstack-ffn = 1\ntrain = "stacked"\n')
    document = json.loads(run("compare", LLAMA, "--plans", str(plans), "--plan", "ffn:train=ffn", "--seq", "32",
                              "--json").stdout)
    assert [p["name"] for p in document["plans"]] == ["r16", "stacked", "ffn"]
    stacked = document["plans"][1]["params"]
    # one stacked SwiGLU sublayer per block (3*64*176 = 33792) plus its RMSNorm (64), two blocks
    assert stacked["trainable"] == 2 * (3 * 64 * 176 + 64)
    assert stacked["total"] == 158_016 + stacked["trainable"]


@pytest.mark.parametrize("content, cause", [
    ("[[plan]\nname = 1", "not valid TOML"),
    ("[setup]\nbatch = 1\n", "[[plan]] tables"),
    ('[[plan]]\nname = "x"\nbogus = 1\n', "unknown key(s) bogus"),
    ('[[plan]]\nname = "x"\nspec = "train=ffn"\nlora = "attn"\n', "either spec or keys"),
])
def test_bad_plans_file(tmp_path, content, cause):
    plans = tmp_path / "plans.toml"
    plans.write_text(content)
    result = run("compare", LLAMA, "--plans", str(plans))
    assert result.exit_code == 2 and cause in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, cause", [
    (["--train", "stacked"], "give --stack-ffn"),
    (["--stack-ffn", "-1"], "must be >= 0"),
    (["--stack-ffn-width", "32"], "needs --stack-ffn"),
    (["--dropout", "1.5"], "[0, 1)"),
])
def test_bad_stacking_and_dropout(args, cause):
    result = run("plan", LLAMA, *args)
    assert result.exit_code == 2 and cause in result.stderr


def test_stacking_on_post_norm_model_is_refused():
    result = run("plan", str(FIXTURES / "bert.onnx"), "--stack-ffn", "1", "--seq", "16")
    assert result.exit_code == 2 and "pre-norm" in result.stderr


# --------------------------------------------------------------------------- issue 16 item 11

def test_share_and_exact_trainable_count():
    result = run("plan", LLAMA, "--seq", "32", "--lora", "attn", "--rank", "8")
    assert result.exit_code == 0
    # llama fixture: 158,016 base parameters; LoRA r=8 on q, k, v, o of 2 layers adds
    # 2 x 8 x ((64+64) + (64+32) + (64+32) + (64+64)) = 7,168, so PEFT would print
    # "trainable params: 7,168 || all params: 165,184 || trainable%: 4.339" (7,168 / 165,184 = 4.3394%)
    assert "trainable params: 7,168 || all params: 165,184 || trainable%: 4.339%" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("lora=attn"))
    assert " 4.34% " in row                                     # three significant figures, not 4.3%


def test_share_column_precision_by_hand():
    from costlens.render import units
    # PEFT on Llama-2-7B, LoRA r=8 on q,v: 4,194,304 of 6,742,609,920 -> 0.0622%
    assert units.share(4_194_304, 6_742_609_920) == "0.0622%"
    assert units.percent(4_194_304, 6_742_609_920) == "0.06221%"
    assert units.share(1, 8) == "12.5%" and units.share(1, 1) == "100.0%"


def test_compare_validate_prints_measured_values_and_verdict():
    result = run("compare", LLAMA, "--seq", "16", "--plan", "lora:lora=attn", "--validate", "cpu")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "Validation (measured steps):" in text
    row = next(line for line in text.splitlines() if line.startswith("lora") and "trainable params" in line)
    # 2 layers x 8 x ((64+64) q + (64+32) k + (64+32) v + (64+64) o) = 2 x 3,584 = 7,168, measured exactly
    assert row.split()[-1] == "ok" and "7,168" in row
    document = json.loads(run("compare", LLAMA, "--seq", "16", "--plan", "lora:lora=attn", "--validate", "cpu",
                              "--json").stdout)
    validation = document["plans"][0]["validation"]
    assert validation["trainable params"]["verdict"] == "ok" and validation["trainable params"]["tolerance"] == 0


def test_a_failed_validation_verdict_exits_1():
    from costlens.cli import _validation_failed
    ok = {"plans": [{"validation": {"peak bytes": {"verdict": "ok"}, "temporaries": {"verdict": "shown"}}}]}
    bad = {"plans": [{"validation": {"peak bytes": {"verdict": "OUTSIDE 5%"}}}, {}]}
    assert not _validation_failed(ok) and _validation_failed(bad)
