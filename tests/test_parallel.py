"""Per-rank memory and communication (costlens/parallel.py) on the llama fixture, by hand.

The llama fixture (README: inspect): 158,016 parameters in 21 tensors, stored as ONNX keeps them
([d_in, d_out]): token embedding [512, 64], head [64, 512], final norm [64]; per layer q [64, 64],
k [64, 32], v [64, 32], o [64, 64], gate [64, 176], up [64, 176], down [176, 64], two norms [64].
Per layer 46,208 parameters = 184,832 fp32 bytes; the root (embedding, final norm, head) 65,600 =
262,400 bytes. The batch is 2 x 32 tokens per data-parallel rank.
"""
import pytest

from costlens.errors import PlanError
from costlens.estimate import estimate
from costlens.parallel import ddp_buckets, estimate_parallel, fsdp_shard, zero1_partition
from costlens.plans import Plan, Setup, check_setup, plan_from_options

PARAMS = 158_016
LAYER_BYTES = 46_208 * 4          # 184,832
ROOT_BYTES = 65_600 * 4           # 262,400
TENSORS = 21
TOKEN_BYTES = 2 * 32 * 64 * 4     # one [2, 32, 64] fp32 activation: 16,384


@pytest.fixture(scope="module")
def llama(loaded):
    return loaded("llama")


def full(model, **setup):
    return estimate(model, Plan(), Setup(batch=2, seq=32, device="cpu", **setup))


def lora_attn(model):
    return estimate(model, plan_from_options("lora", lora="attn", rank="8"), Setup(batch=2, seq=32, device="cpu"))


def test_ddp_holds_everything_plus_a_bucket_copy_of_the_gradients(llama):
    single = full(llama)
    p = estimate_parallel(single, 2, "ddp")
    assert p.memory.weights == PARAMS * 4 == 632_064
    assert p.memory.gradients == 632_064
    assert p.memory.optimizer == PARAMS * 8 + TENSORS * 4 == 1_264_212   # 2 moments + a step counter each
    assert p.memory.buffers == 632_064                                      # 25 MB buckets: all gradients again
    assert p.memory.peak == single.memory.peak + 632_064                    # the buckets exist at every phase
    assert p.communication.all_reduce == 632_064
    assert p.communication.broadcast == 4 * (TENSORS + 1) + 4 * 1          # bucket rebuild: indices, sizes = 92


def test_zero1_assigns_whole_tensors_largest_first(llama):
    # sizes: 2 x 32768, 6 x 11264, 4 x 4096, 4 x 2048, 5 x 64; rank 0 gets 32768, three 11264s,
    # two 4096s, two 2048s and three 64s = 79,040 elements in 11 tensors
    p = estimate_parallel(full(llama), 2, "zero1")
    assert p.memory.optimizer == 79_040 * 8 + 11 * 4 == 632_364
    assert p.memory.weights == 632_064 and p.memory.gradients == 632_064
    assert p.communication.broadcast == 632_064 + 92                       # updated parameters from their owners
    assert zero1_partition([(4,), (3,), (3,), (2,)], 2) == [[(4,), (2,)], [(3,), (3,)]]


def test_zero3_shards_each_tensor_and_gathers_layers_twice(llama):
    p = estimate_parallel(full(llama), 2, "zero3")
    assert p.memory.weights == 632_064 // 2
    assert p.memory.gradients == 632_064 // 2
    assert p.memory.optimizer == PARAMS * 8 // 2 + TENSORS * 4 == 632_148
    assert p.memory.buffers == 0                                             # no DDP buckets
    assert p.communication.all_gather == ROOT_BYTES + 2 * 2 * LAYER_BYTES == 1_001_728
    assert p.communication.reduce_scatter == 632_064
    assert p.communication.all_reduce == 0


def test_zero3_pads_rows_to_the_world_size(llama):
    # N=3: ceil(d0/3) rows. embedding 171x64=10944, head 22x512=11264, norms 22 each,
    # per layer q 22x64=1408, k 22x32=704, v 704, o 1408, gate 22x176=3872, up 3872, down 59x64=3776, norms 44
    layer = 1408 + 704 + 704 + 1408 + 3872 + 3872 + 3776 + 44          # 15,788
    root = 10944 + 11264 + 22                                              # 22,230
    p = estimate_parallel(full(llama), 3, "zero3")
    assert p.memory.weights == (root + 2 * layer) * 4 == 215_224
    assert p.communication.all_gather == 3 * 4 * (root + 2 * 2 * layer) == 1_024_584
    assert fsdp_shard((176, 64), 3) == (59, 64)


def test_zero2_gathers_once_and_peaks_with_every_unit_unsharded(llama):
    single = full(llama)
    z2 = estimate_parallel(single, 4, "zero2")
    z3 = estimate_parallel(single, 4, "zero3")
    assert z2.communication.all_gather == 632_064          # each unit once, in forward
    assert z3.communication.all_gather == ROOT_BYTES + 2 * 2 * LAYER_BYTES
    assert z2.communication.reduce_scatter == z3.communication.reduce_scatter == 632_064
    assert z3.memory.peak < z2.memory.peak < estimate_parallel(single, 4, "ddp").memory.peak


def test_lora_under_fsdp_regathers_every_frozen_weight(llama):
    # LoRA r=8 on q, k, v, o: per layer 8x(64+64) + 2 x 8x(64+32) + 8x(64+64) = 3584; 7168 in all
    result = lora_attn(llama)
    z3 = estimate_parallel(result, 2, "zero3")
    ddp = estimate_parallel(result, 2, "ddp")
    assert z3.memory.gradients == 7168 * 4 // 2                  # frozen weights carry none
    assert z3.memory.optimizer == 7168 * 8 // 2 + 16 * 4         # 16 adapter matrices, a step counter each
    assert z3.communication.reduce_scatter == 7168 * 4
    assert ddp.communication.all_reduce == 7168 * 4
    adapter_layer = 3584 * 4
    assert z3.communication.all_gather == ROOT_BYTES + 2 * 2 * (LAYER_BYTES + adapter_layer) == 1_059_072
    assert z3.communication.all_gather > 30 * ddp.communication.all_reduce


def test_tensor_parallel_splits_attention_and_ffn_only(llama):
    p = estimate_parallel(full(llama), 2, "none", tp=2)
    # root replicated; per layer the 46,080 attention + FFN weights halve, the two norms stay
    assert p.memory.weights == ROOT_BYTES + 2 * ((46_080 // 2 + 128) * 4) == 447_744
    # forward: o and down all-reduce their output (2 per layer); backward: q, k, v, gate, up their input's
    # gradient (5 per layer): 14 all-reduces of one [2, 32, 64] activation
    assert p.communication.all_reduce == 14 * TOKEN_BYTES == 229_376
    assert p.memory.activations < full(llama).memory.activations


def test_expert_parallel_splits_the_experts(loaded):
    moe = loaded("moe")
    result = estimate(moe, Plan(), Setup(batch=2, seq=32, device="cpu"))
    experts = moe.roles.params_by_role()["experts"]
    p = estimate_parallel(result, 2, "none", ep=2)
    assert p.memory.weights == (moe.roles.params_total - experts // 2) * 4
    # 2 MoE layers x (dispatch + combine) x (forward + backward) x 64 tokens x top-2 x 64 hidden x 4 bytes
    assert p.communication.all_to_all == 2 * 4 * 64 * 2 * 64 * 4


def test_peak_per_rank_shrinks_with_more_ranks(llama):
    single = full(llama)
    peaks = [estimate_parallel(single, n, "zero3").memory.peak for n in (2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < single.memory.peak


def test_offload_moves_optimizer_state_to_the_host(llama):
    single = full(llama)
    on = estimate_parallel(single, 2, "zero3")
    off = estimate_parallel(single, 2, "zero3", offload="optimizer")
    assert off.memory.optimizer == 0 and off.memory.host == on.memory.optimizer
    assert off.memory.peak < on.memory.peak
    params = estimate_parallel(single, 2, "zero3", offload="params")
    assert params.memory.weights == 0 and params.memory.host == on.memory.optimizer + on.memory.weights


def test_communication_time_at_the_stated_bandwidth(llama):
    p = estimate_parallel(full(llama), 4, "ddp", bandwidth_gbps=50.0)
    wire = 2 * 3 / 4 * 632_064 + 3 / 4 * 92      # ring all-reduce and the bucket-rebuild broadcast
    assert p.communication.wire_bytes == round(wire)
    assert p.communication.seconds == pytest.approx(wire / 50e9)


def test_ddp_bucket_count():
    mib = 2**20
    assert ddp_buckets([mib // 2, mib // 2]) == 1               # the first bucket holds 1 MiB
    assert ddp_buckets([10 * mib, 10 * mib, mib]) == 2         # then 25 MiB buckets


@pytest.mark.parametrize("setup", [dict(gpus=3, tp=2), dict(gpus=4, shard="none"),
                                   dict(gpus=2, shard="ddp", offload="params"), dict(gpus=2, shard="zero4"),
                                   dict(gpus=2, shard="ddp", bandwidth=0.0)])
def test_bad_layouts_are_refused(setup):
    with pytest.raises(PlanError):
        check_setup(Setup(**setup))


def test_plan_document_gains_a_parallel_object(llama):
    from costlens.render.plan import plan_document, plan_text
    single = full(llama)
    sharded = full(llama, gpus=2, shard="zero3")
    assert "parallel" not in plan_document(llama, [("full", single)])["plans"][0]
    document = plan_document(llama, [("full", sharded)])
    entry = document["plans"][0]["parallel"]
    assert entry["gpus"] == 2 and entry["shard"] == "zero3" and entry["dp"] == 2
    assert entry["per_rank_bytes"]["weights"] == 316_032
    assert entry["communication_bytes"]["all_gather"] == 1_001_728
    assert entry["bandwidth_gbps"] == 100.0
    assert "Per rank" in plan_text(document)
    assert document["plans"][0]["memory_bytes"]["peak"] == single.memory.peak   # the one-device figures stay


BUDGET = """
[setup]
batch = 2
seq = 32
device = "cpu"
gpus = 2
shard = "zero3"

[[plan]]
name = "full"
peak_memory = "fits: 2x h100-80gb"
"""


def test_a_budget_fits_n_gpus_with_a_shard_mode(llama):
    from costlens.budgets import judge, parse_budget, setup_of
    from costlens.render.plan import plan_document
    budget = parse_budget(BUDGET)
    setup = setup_of(budget)
    assert (setup.gpus, setup.shard) == (2, "zero3")
    document = plan_document(llama, [("full", estimate(llama, Plan(), setup))])
    (verdict,) = judge(budget, document)
    per_rank = estimate_parallel(full(llama), 2, "zero3").memory.peak
    assert verdict.value == per_rank < full(llama).memory.peak and verdict.passed
    assert verdict.written == "fits: 2x h100-80gb"


def test_a_budget_for_n_gpus_needs_the_setup_to_say_so():
    from costlens.budgets import BudgetError, parse_budget
    with pytest.raises(BudgetError, match="gpus = 8"):
        parse_budget('[[plan]]\nname = "full"\npeak_memory = "fits: 8x h100-80gb"\n')
    with pytest.raises(BudgetError, match="shard"):
        parse_budget('[setup]\ngpus = 2\nshard = "zero9"\n[[plan]]\nname = "full"\npeak_memory = "1GiB"\n')


def test_deepspeed_stages_by_formula(llama):
    from costlens.parallel.deepspeed import deepspeed_states
    result = full(llama)
    one = deepspeed_states(result, 2, 1)
    # 158,016 trainable elements, 79,008 per rank: two fp32 moments + one step counter, an fp32 master copy
    assert (one.optimizer, one.master) == (79_008 * 8 + 4, 79_008 * 4)
    assert one.gradients == 632_064 and one.weights == 632_064
    assert one.bucket == 500_000_000 * 4                        # reduce_bucket_size elements, whatever the model
    assert deepspeed_states(result, 2, 2).gradients == 79_008 * 4
    # stage 3: every tensor of the fixture is under 1e5 elements, so none is partitioned
    assert deepspeed_states(result, 2, 3).weights == 632_064
    assert deepspeed_states(result, 2, 3, persistence_threshold=1).weights == 79_008 * 4


def test_cli_plan_gpus_prints_per_rank_figures():
    import json
    from click.testing import CliRunner
    from costlens.cli import main
    from conftest import FIXTURES
    model = str(FIXTURES / "llama.onnx")
    result = CliRunner().invoke(main, ["plan", model, "--batch", "2", "--seq", "32", "--gpus", "2", "--shard",
                                       "zero3", "--json"])
    assert result.exit_code == 0, result.output
    parallel = json.loads(result.stdout)["plans"][0]["parallel"]
    assert parallel["per_rank_bytes"]["weights"] == 632_064 // 2
    assert parallel["communication_bytes"]["reduce_scatter"] == 632_064
    text = CliRunner().invoke(main, ["plan", model, "--batch", "2", "--seq", "32", "--tp", "2"])
    assert text.exit_code == 0 and "2x tp2" in text.stdout
    bad = CliRunner().invoke(main, ["plan", model, "--gpus", "3", "--tp", "2"])
    assert bad.exit_code == 2 and "not a multiple" in bad.stderr
