"""The accelerator table (costlens/gpus.py): per-dtype peaks, bandwidth, the roofline, `costlens gpus`."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from costlens import gpus
from costlens.cli import main


def test_datasheet_figures():
    h100 = gpus.gpu("h100")
    # H100 SXM datasheet: FP32 67; TF32 989 / BF16 1,979 / FP8 3,958 "with sparsity" -> halved; 3.35 TB/s
    assert (h100.peak("fp32"), h100.peak("tf32"), h100.peak("bf16"), h100.peak("fp8")) == (67e12, 494.5e12,
                                                                                            989.5e12, 1979e12)
    assert h100.bandwidth == 3.35e12
    assert gpus.gpu("a100-40gb").peak("fp8") is None            # Ampere has no fp8 units
    assert gpus.gpu("v100").peak("bf16") is None and gpus.gpu("v100").peak("fp16") == 125e12


@pytest.mark.parametrize("precision, dtype", [("fp32", "fp32"), ("bf16-autocast", "bf16"), ("bf16-mixed", "bf16"),
                                              ("bf16", "bf16"), ("fp16-mixed", "fp16")])
def test_precision_dtype(precision, dtype):
    assert gpus.compute_dtype(precision, gpus.gpu("h100")) == dtype


def test_roofline_by_hand():
    h100 = gpus.gpu("h100")
    # compute: 1e15 FLOP / (989.5e12 x 0.5) = 2.0212 s; memory: 1e12 B / 3.35e12 B/s = 0.2985 s -> compute-bound
    time = gpus.time_step(1e15, 10**12, h100, "bf16-mixed", 0.5)
    assert time.seconds_per_step == pytest.approx(1e15 / (989.5e12 * 0.5)) and time.bound == "compute"
    # 1e10 FLOP is 20 µs of compute; 1e11 B is 29.85 ms of memory traffic -> memory-bound
    time = gpus.time_step(1e10, 10**11, h100, "bf16-mixed", 0.5)
    assert time.seconds_per_step == pytest.approx(1e11 / 3.35e12) and time.bound == "memory"
    assert gpus.step_traffic_bytes(1, 2, 3, 4) == 20


def test_bf16_on_volta_falls_back_to_fp32():
    time = gpus.time_step(15.7e12, 0, gpus.gpu("v100"), "bf16-mixed", 1.0)
    assert time.dtype == "fp32" and time.seconds_per_step == pytest.approx(1.0)


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_gpus_command_text_and_json():
    text = run("gpus")
    assert text.exit_code == 0 and "h100-80gb" in text.stdout and "989.5" in text.stdout and "3.35" in text.stdout
    document = json.loads(run("gpus", "--json").stdout)
    assert document["schema"] == "costlens.gpus/1"
    names = [g["name"] for g in document["gpus"]]
    assert names == list(gpus.GPUS)
    l4 = next(g for g in document["gpus"] if g["name"] == "l4")
    assert l4["peak_flops"]["bf16"] == 121e12 and l4["bandwidth_bytes_per_s"] == 300e9 and l4["memory_bytes"] == 24 * 2**30


def test_custom_gpu_from_budget(tmp_path):
    budget = tmp_path / "costlens.toml"
    budget.write_text('[gpu.mi300x]\nmemory = "192GiB"\nbf16_tflops = 1307.4\nfp32_tflops = 163.4\n'
                      'bandwidth_tb_s = 5.3\nnote = "AMD MI300X"\n'
                      '[setup]\ngpu = "mi300x"\n[[plan]]\nspec = "full"\ntrainable_params = "1B"\n')
    document = json.loads(run("gpus", "--budget", str(budget), "--json").stdout)
    custom = next(g for g in document["gpus"] if g["name"] == "mi300x")
    assert custom["custom"] and custom["memory_bytes"] == 192 * 2**30 and custom["peak_flops"]["bf16"] == 1307.4e12
    assert "mi300x *" in run("gpus", "--budget", str(budget)).stdout


def test_custom_gpu_cannot_shadow_a_builtin(tmp_path):
    budget = tmp_path / "costlens.toml"
    budget.write_text('[gpu.h100]\nmemory = "1GiB"\nbf16_tflops = 1\n[[plan]]\nspec = "full"\ntrainable_params = 1\n')
    result = run("gpus", "--budget", str(budget))
    assert result.exit_code == 2 and "built-in" in result.stderr
