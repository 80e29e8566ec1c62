"""Per-rank estimates beside real torch.distributed runs (gloo on the CPU, loopback only).

Each case launches 2 or 4 rank processes that train models:llama_like / models:moe_like
(fixtures/models.py) for two steps under DDP, ZeroRedundancyOptimizer, FSDP2 or DTensor tensor
parallelism. Measured figures are checked against numbers derived by hand (llama_like: 158,016
fp32 parameters in 21 tensors, 184,832 bytes per decoder layer, 262,400 in the root; batch 2 x 32
tokens per rank), and the per-rank peak estimate against the measured one (3%).
"""
import json
import os

import pytest

torch = pytest.importorskip("torch")

from costlens.measure.distributed import validate_distributed  # noqa: E402
from costlens.plans import Setup, plan_from_options  # noqa: E402

from conftest import FIXTURES  # noqa: E402

SETUP = Setup(batch=2, seq=32, moe_dispatch="dense")
FULL = plan_from_options("full")
LORA = plan_from_options("lora", lora="attn", rank="8")
LAYER, ROOT, ALL = 184_832, 262_400, 158_016 * 4


_TRACED = {}


@pytest.fixture(autouse=True)
def in_fixtures(monkeypatch):
    monkeypatch.chdir(FIXTURES)          # import specs models:... resolve from here, as for python -m


def run(source, plan, gpus, shard, tp=1):
    import costlens
    if source not in _TRACED:
        _TRACED[source] = costlens.load(source)
    validation, estimate, measured = validate_distributed(source, plan, SETUP, gpus, shard, tp=tp,
                                                          model=_TRACED[source])
    rows = {c.quantity: c for c in validation.comparisons}
    peak = rows["peak bytes (max rank)"]
    assert abs(peak.error) <= 0.03, (peak.estimated, peak.measured)
    return validation, measured, rows


def test_ddp_all_reduces_every_gradient_once():
    validation, measured, rows = run("models:llama_like", FULL, 2, "ddp")
    assert validation.ok
    assert measured.collective_bytes("all_reduce") == ALL
    assert measured.collective_bytes("broadcast") == 4 * (21 + 1) + 4 * 1    # bucket indices and sizes, rebuilt
    # the buckets are a second copy of the gradients: 632,064 bytes above one device's weights+grads+state
    assert all(r.weights_bytes == ALL and r.gradient_bytes == ALL for r in measured.ranks)


def test_zero3_shards_and_gathers_each_layer_twice():
    validation, measured, rows = run("models:llama_like", FULL, 2, "zero3")
    assert validation.ok
    assert all(r.weights_bytes == ALL // 2 for r in measured.ranks)
    assert measured.collective_bytes("all_gather") == ROOT + 2 * 2 * LAYER == 1_001_728
    assert measured.collective_bytes("reduce_scatter") == ALL
    assert rows["all-gather bytes"].estimated == rows["all-gather bytes"].measured


def test_zero1_optimizer_state_of_whole_tensors():
    validation, measured, rows = run("models:llama_like", FULL, 2, "zero1")
    assert validation.ok
    # greedy, largest first: rank 0 holds 79,040 elements in 11 tensors (two moments + a step each)
    assert measured.max_over_ranks("optimizer_state_bytes") == 79_040 * 8 + 11 * 4
    assert measured.collective_bytes("broadcast") == ALL + 92


def test_lora_under_zero2_on_four_ranks_gathers_the_frozen_weights():
    validation, measured, rows = run("models:llama_like", LORA, 4, "zero2")
    assert validation.ok
    adapters = 7168 * 4                      # r=8 on q, k, v, o of both layers
    assert measured.collective_bytes("reduce_scatter") == adapters
    assert measured.collective_bytes("all_gather") == ALL + adapters       # every frozen weight, once
    assert measured.max_over_ranks("gradient_bytes") == adapters // 4


def test_tensor_parallel_all_reduces_activations():
    validation, measured, rows = run("models:llama_like", FULL, 2, "ddp", tp=2)
    assert validation.ok
    assert measured.collective_bytes("all_reduce") == 14 * 2 * 32 * 64 * 4   # 4 forward (o, down), 10 backward
    assert all(r.weights_bytes == ROOT + 2 * (46_080 * 4 // 2 + 512) for r in measured.ranks)


def test_tensor_parallel_inside_fsdp2_on_four_ranks():
    # 2 data-parallel x 2 tensor-parallel: TP-local weights (447,744 bytes, as above) sharded in two
    validation, measured, rows = run("models:llama_like", FULL, 4, "zero3", tp=2)
    assert validation.ok
    local = ROOT + 2 * (46_080 * 4 // 2 + 512)
    assert all(r.weights_bytes == local // 2 for r in measured.ranks)
    assert measured.collective_bytes("all_gather") == ROOT + 2 * 2 * (46_080 * 4 // 2 + 512)
    assert measured.collective_bytes("reduce_scatter") == local
    assert measured.collective_bytes("all_reduce") == 14 * 2 * 32 * 64 * 4


def test_moe_full_fine_tuning_under_zero3_on_four_ranks():
    validation, measured, rows = run("models:moe_like", FULL, 4, "zero3")
    assert validation.ok
    assert rows["reduce-scatter bytes"].measured == 238_400 * 4       # every parameter trains


def test_cli_validate_gpus(tmp_path):
    from click.testing import CliRunner
    from costlens.cli import main
    result = CliRunner().invoke(main, ["validate", "models:llama_like", "--batch", "2", "--seq", "32",
                                       "--gpus", "2", "--shard", "zero3", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    rows = {c["quantity"]: c for c in document["comparisons"]}
    assert rows["all-gather bytes"]["measured"] == 1_001_728
    assert abs(rows["peak bytes (max rank)"]["error"]) <= 0.03
    assert os.getcwd() == str(FIXTURES)
