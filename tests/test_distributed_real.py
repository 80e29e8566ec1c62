"""Per-rank estimates beside real transformers modules on torch.distributed (gloo, loopback).

Each case launches 2 rank processes that build the real module of a corpus config
(fixtures/hf/ARCH.config.json; random weights, seed 0 on every rank), put the plan on it as
single-rank validate does, wrap it (FSDP2 per decoder layer + root, or DDP) and train two steps.
Sharded sizes and collective bytes are derived here from the real module's own parameters (its
names and shapes, read in this process), never from the estimator; the per-rank peak must be
within 3% of the measured one.
"""
import socket
from math import ceil, prod

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from costlens.measure.distributed import validate_distributed  # noqa: E402
from costlens.plans import Setup, plan_from_options  # noqa: E402

from conftest import FIXTURES  # noqa: E402

SETUP = Setup(batch=2, seq=32)
FULL = plan_from_options("full")
LORA = plan_from_options("lora", lora="attn", rank="8")
WORLD = 2
_TRACED = {}


@pytest.fixture(autouse=True, scope="module")
def loopback_gloo():
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed has no gloo backend")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
    except OSError as e:
        pytest.skip(f"cannot bind the loopback interface for gloo: {e}")


def config_path(arch):
    return str(FIXTURES / "hf" / f"{arch}.config.json")


def real_module(arch):
    """The real module of the corpus config, built here to read its parameters."""
    config = transformers.AutoConfig.from_pretrained(config_path(arch))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config), config


def run(arch, plan, shard):
    import costlens
    if arch not in _TRACED:
        _TRACED[arch] = costlens.load(config_path(arch))
    validation, estimate, measured = validate_distributed(config_path(arch), plan, SETUP, WORLD, shard,
                                                          model=_TRACED[arch])
    rows = {c.quantity: c for c in validation.comparisons}
    peak = rows["peak bytes (max rank)"]
    assert abs(peak.error) <= 0.03, (peak.estimated, peak.measured)
    assert validation.truth.startswith("real module (transformers")
    return measured, rows


def units(module, n_layers):
    """(root parameters, [parameters of each decoder layer]) as FSDP2 units see them: unique tensors."""
    blocks = next(m for m in module.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers)
    in_layers = {id(p) for p in blocks.parameters()}
    root = [p for p in module.parameters() if id(p) not in in_layers]
    return root, [list(block.parameters()) for block in blocks]


def padded(p):
    """FSDP2's dim-0 shard of one rank, padded: ceil(d0 / N) rows, fp32."""
    return ceil(p.shape[0] / WORLD) * prod(p.shape[1:]) * 4


def test_llama_zero3_full_shards_and_gathers_the_real_module():
    module, config = real_module("llama")
    root, layers = units(module, config.num_hidden_layers)
    buffers = sum(b.numel() * 4 for b in module.buffers())          # RoPE inv_freq, replicated
    shard = sum(padded(p) for p in module.parameters())
    measured, rows = run("llama", FULL, "zero3")
    assert all(r.weights_bytes == shard + buffers for r in measured.ranks)
    assert measured.max_over_ranks("gradient_bytes") == shard
    # the root once (kept from forward to backward), every layer in forward and again in backward
    gathered = WORLD * (sum(map(padded, root)) + 2 * sum(padded(p) for layer in layers for p in layer))
    assert measured.collective_bytes("all_gather") == gathered
    assert measured.collective_bytes("reduce_scatter") == WORLD * shard
    assert rows["all-gather bytes"].estimated == gathered
    assert rows["reduce-scatter bytes"].estimated == WORLD * shard


def test_gpt2_lora_ddp_all_reduces_only_the_adapters_of_the_tied_model():
    module, config = real_module("gpt2")
    assert module.lm_head.weight is module.transformer.wte.weight      # tied: one tensor, once
    hidden = config.n_embd
    # LoRA r=8 on each attention projection (c_attn: 64 -> 192, c_proj: 64 -> 64): A [8, d_in], B [d_out, 8]
    adapters = config.n_layer * 8 * ((hidden + 3 * hidden) + (hidden + hidden)) * 4
    measured, rows = run("gpt2", LORA, "ddp")
    assert measured.collective_bytes("all_reduce") == adapters
    assert rows["all-reduce bytes"].estimated == adapters
    assert measured.max_over_ranks("gradient_bytes") == adapters
    assert measured.max_over_ranks("optimizer_state_bytes") == 2 * adapters + 4 * 4 * config.n_layer
    weights = sum(p.numel() * 4 for p in module.parameters()) + adapters
    assert all(r.weights_bytes == weights for r in measured.ranks)


@pytest.mark.parametrize("args, says", [
    (["fixtures/hf/llama.config.json", "--precision", "bf16-mixed"], "fp32"),
    (["models:llama_like", "--tiny"], "shrink a Hugging Face config"),
])
def test_cli_validate_gpus_refuses_in_one_line(monkeypatch, args, says):
    from click.testing import CliRunner
    from costlens.cli import main
    monkeypatch.chdir(FIXTURES.parent if args[0].startswith("fixtures/") else FIXTURES)
    result = CliRunner().invoke(main, ["validate", *args, "--gpus", "2", "--shard", "zero3"])
    assert result.exit_code != 0
    assert says in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_cli_validate_gpus_on_a_shrunk_config_with_the_models_own_loss(monkeypatch):
    # --tiny llama3-70b: the CLI branch shrinks the config as single-rank validate does; with --loss hf
    # the loss's log-softmax is taken inside forward, where zero2 peaks (every unit unsharded)
    import json
    from click.testing import CliRunner
    from costlens.cli import main
    from costlens.frontends.hf_config import read_config
    from costlens.measure.hf_module import Dims, shrink_config
    path = FIXTURES.parent / "benchmarks" / "configs" / "llama3-70b.json"
    small = shrink_config(read_config(path), Dims.tiny())
    with torch.device("meta"):
        module = transformers.AutoModelForCausalLM.from_config(small)
    shard = sum(padded(p) for p in module.parameters())
    result = CliRunner().invoke(main, ["validate", str(path), "--tiny", "--batch", "2", "--seq", "32", "--gpus", "2",
                                       "--shard", "zero2", "--loss", "hf", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    rows = {c["quantity"]: c for c in document["comparisons"]}
    assert rows["all-gather bytes"]["measured"] == WORLD * shard == rows["all-gather bytes"]["estimated"]
    assert rows["reduce-scatter bytes"]["measured"] == WORLD * shard
    assert abs(rows["peak bytes (max rank)"]["error"]) <= 0.03
    assert document["truth"].startswith("real module (transformers")
