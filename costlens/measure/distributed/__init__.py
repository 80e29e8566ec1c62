"""Per-rank memory and communication of a real data- or tensor-parallel step (torch.distributed).

Owns ``measure_distributed`` and its results (``RankMeasurement``, ``DistributedMeasurement``),
the ``PlanRecipe`` that carries a plan to the rank processes, and the rank entry point
(``python -m costlens.measure.distributed.rank CONFIG.json``, which reads the torchrun environment
variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, so ``torchrun
--nproc-per-node N -m costlens.measure.distributed.rank CONFIG.json`` runs it too).

Each rank: ``init_process_group("gloo")`` on the loopback interface, the real module built by the
import spec's factory (same seed on every rank, so replicas agree), the plan applied by parameter
name (as ``validate.apply_plan`` does), then wrapped. For a Hugging Face config (``RealModule``):
the real transformers module of the (shrunk) config (``hf_module.build_real_module``, seed 0),
the plan put on it by ``validate.apply_plan`` itself, and the FSDP units the ModuleList of the
config's decoder layers (``hf_config.layer_container``). The modes:

- ``ddp``: ``DistributedDataParallel`` (25 MB buckets, ``gradient_as_bucket_view=False``);
- ``zero1``: DDP + ``ZeroRedundancyOptimizer`` (optimizer state of whole parameters, greedily
  assigned to ranks largest first; updated parameters broadcast from their owner);
- ``zero2``: FSDP2 ``fully_shard`` per decoder layer + root with ``reshard_after_forward=False``;
- ``zero3``: FSDP2 ``fully_shard`` per decoder layer + root, default resharding (the root is
  left unsharded after forward);
- ``tp``: DTensor tensor parallelism: q, k, v, gate, up ``ColwiseParallel``, o, down
  ``RowwiseParallel`` (every expert's too), the rest replicated; every rank sees the same batch.

Two steps run under one ``StorageTracker`` (so buffers a wrapper allocates up front, such as DDP's
gradient buckets, are seen); the peak is reset between them and the second step is reported.
Collectives are counted by a dispatch mode over the c10d and functional-collective ops (DDP's
reducer and FSDP2's collectives both pass through the dispatcher): bytes of the full buffer of
each collective (all-reduce: the tensor; all-gather: the gathered output; reduce-scatter: the
unreduced input; broadcast: the tensor).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SHARD_MODES = ("ddp", "zero1", "zero2", "zero3", "tp")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
RANK_TIMEOUT_SECONDS = 600
# A run in which a rank's measured step had more than this many bytes freed on a gloo worker thread
# (storages that may have outlived the step's release of them, by however long the OS left that
# thread waiting) is launched again, up to LATE_FREE_ATTEMPTS times; the run with fewest is kept.
# Small tensors (DDP's bucket-rebuild broadcasts, 4-100 B) die there often and shift the peak by
# at most their size.
LATE_FREE_TOLERANCE_BYTES = 1024
LATE_FREE_ATTEMPTS = 3
_RANK_COMMAND = ("-m", "costlens.measure.distributed.rank")


@dataclass(frozen=True)
class PlanRecipe:
    """A plan as parameter names and a PEFT config: picklable, applied in each rank process."""

    trainable: tuple[str, ...]                 # base parameter names that train
    lora_modules: tuple[str, ...] = ()         # PEFT target_modules (full module paths)
    lora_parameters: tuple[str, ...] = ()      # PEFT target_parameters (3-D expert tensors)
    rank_pattern: dict = field(default_factory=dict)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0


@dataclass(frozen=True)
class RankMeasurement:
    """One rank's second step; bytes."""

    rank: int
    peak_bytes: int
    peak_phase: str
    by_category_at_peak: dict                  # MemCategory value -> bytes at the peak
    peak_bytes_by_phase: dict                  # phase -> most bytes live in it
    weights_bytes: int                         # local parameter storages (shards) and buffers
    gradient_bytes: int                        # local .grad storages after the step
    optimizer_state_bytes: int                 # this rank's optimizer state
    collective_bytes: dict                     # collective -> full-buffer bytes over the step
    collective_calls: dict                     # collective -> number of calls
    n_trainable_params: int                    # local elements of trainable parameters
    truth: str = ""                            # what ran, e.g. "real module (transformers 5.24 LlamaForCausalLM)"
    late_frees: int = 0                        # storages of the second step freed on a gloo worker thread
    late_free_bytes: int = 0                   # their bytes (each may have lived past its release)


@dataclass(frozen=True)
class DistributedMeasurement:
    """A training step measured on ``world`` gloo ranks: each rank's storages and collectives
    (bytes), the per-rank batch (sequences) and seq (tokens), and the wall seconds of the run."""

    source: str
    world: int
    shard: str
    batch: int                                 # per rank
    seq: int
    ranks: tuple[RankMeasurement, ...]
    seconds: float

    @property
    def peak_bytes(self) -> int:
        """The largest per-rank peak (ranks are not symmetric)."""
        return max(r.peak_bytes for r in self.ranks)

    @property
    def truth(self) -> str:
        return self.ranks[0].truth

    def max_over_ranks(self, name: str) -> int:
        return max(getattr(r, name) for r in self.ranks)

    def collective_bytes(self, kind: str) -> int:
        return max(r.collective_bytes.get(kind, 0) for r in self.ranks)


def recipe_of(model, result) -> PlanRecipe:
    """The plan of an Estimate as names on the real module (the mapping of validate.apply_plan)."""
    import re
    if result.plan.stop_grad or result.plan.stack_ffn or result.plan.dropout:
        from costlens.errors import PlanError
        raise PlanError("distributed validation runs plans of trainable sets and LoRA "
                        "(no --stop-grad, --stack-ffn or --dropout)")
    by_key = {u.key: u for u in model.roles.params}
    trainable = tuple(sorted(by_key[k].constant for k in result.trainable_keys))
    modules, tensors, pattern = [], [], {}
    for adapter in result.adapters:
        name = by_key[adapter.key].constant
        if adapter.n_experts:
            tensors.append(name)
            pattern[name.rsplit(".", 1)[-1]] = adapter.rank
        else:
            modules.append(name.rsplit(".", 1)[0])
            pattern[re.escape(modules[-1])] = adapter.rank
    plan = result.plan
    return PlanRecipe(trainable, tuple(modules), tuple(tensors), pattern, plan.rank, plan.alpha, plan.lora_dropout)


# --------------------------------------------------------------------------- launcher

def free_port() -> int:
    """A free TCP port on the loopback interface, for the ranks' rendezvous (never another host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RealModule:
    """What a rank needs to build the real transformers module of a Hugging Face config and put
    the plan on it with ``validate.apply_plan``: the (shrunk) config, the setup (attention,
    checkpointing, loss), and the priced plan as the parameter uses, trainable keys and adapters
    of the estimate (pickled: the traced graph itself is not picklable, and tracing it again in
    every rank would cost more than the step)."""

    config: object                             # a transformers PretrainedConfig
    setup: object                              # plans.Setup
    params: tuple                              # roles.ParamUse of the traced config
    trainable_keys: tuple[str, ...]
    adapters: tuple
    plan_fields: dict                          # the plans.Plan (its read-only mappings as dicts)

    def plan(self):
        from costlens.plans import Plan
        return Plan(**self.plan_fields)


def real_module_of(config, setup, model, result) -> RealModule:
    """The RealModule of an estimate priced on ``config``'s traced graph ``model``."""
    from dataclasses import fields
    from types import MappingProxyType
    recipe_of(model, result)                   # refuses what the ranks cannot run, in one line
    plan = {f.name: getattr(result.plan, f.name) for f in fields(result.plan)}
    plan = {k: dict(v) if isinstance(v, MappingProxyType) else v for k, v in plan.items()}
    return RealModule(config, setup, tuple(model.roles.params), tuple(result.trainable_keys), tuple(result.adapters),
                      plan)


def measure_distributed(source: str, recipe: PlanRecipe, world: int, shard: str, batch: int, seq: int,
                        vocab: int, optimizer: str = "adamw", lr: float = 1e-3,
                        timeout: float = RANK_TIMEOUT_SECONDS, tp: int = 1,
                        real: RealModule | None = None) -> DistributedMeasurement:
    """Run ``world`` rank processes (gloo, loopback) of two training steps; the second, per rank.
    ``real``: build the real transformers module of a config in each rank instead of ``source``'s
    import-spec factory."""
    import pickle

    from costlens.errors import CostlensError
    if shard not in SHARD_MODES:
        raise CostlensError(f"unknown shard mode {shard!r} (choose from {', '.join(SHARD_MODES)})")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="costlens-dist-") as folder:
        config = Path(folder) / "config.json"
        real_path = None
        if real is not None:
            real_path = str(Path(folder) / "real_module.pkl")
            Path(real_path).write_bytes(pickle.dumps(real))
        config.write_text(json.dumps({"source": source, "recipe": asdict(recipe), "shard": shard, "batch": batch,
                                      "seq": seq, "vocab": vocab, "optimizer": optimizer, "lr": lr, "tp": tp,
                                      "out": folder, "sys_path": sys.path, "real_module": real_path}))
        ranks = None
        for _ in range(LATE_FREE_ATTEMPTS):
            attempt = _run_ranks(config, folder, world, timeout)
            if ranks is None or _late_bytes(attempt) < _late_bytes(ranks):
                ranks = attempt
            if _late_bytes(ranks) <= LATE_FREE_TOLERANCE_BYTES:
                break
    return DistributedMeasurement(source, world, shard, batch, seq, ranks, time.perf_counter() - start)


def _run_ranks(config: Path, folder: str, world: int, timeout: float) -> tuple[RankMeasurement, ...]:
    """One launch of the ``world`` rank processes; each rank's second step."""
    from costlens.errors import CostlensError
    port = free_port()
    processes = [subprocess.Popen([sys.executable, *_RANK_COMMAND, str(config)],
                                  env=_rank_env(rank, world, port), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
                 for rank in range(world)]
    errors = _wait(processes, timeout)
    if errors:
        raise CostlensError(f"distributed measurement failed: {errors[0]}")
    return tuple(_read_rank(Path(folder) / f"rank{rank}.json") for rank in range(world))


def _late_bytes(ranks) -> int:
    """Bytes of the measured step freed on a gloo worker thread, on the worst rank: the most any
    rank's figures can be off by the worker outliving the step's own release (wrap.PeakResetTracker)."""
    return max(r.late_free_bytes for r in ranks)


def _rank_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _wait(processes, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    errors = []
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            return [f"a rank did not finish within {timeout:.0f} s"]
        if process.returncode:
            lines = [line for line in (stderr or "").strip().splitlines() if line.strip()]
            errors.append(lines[-1] if lines else f"rank exited with code {process.returncode}")
    if errors:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return errors


def _read_rank(path: Path) -> RankMeasurement:
    return RankMeasurement(**json.loads(path.read_text()))




# --------------------------------------------------------------------------- estimate beside measurement

def validate_distributed(source, plan, setup, gpus: int, shard: str, tp: int = 1, tolerance: float = 0.03,
                         progress=lambda message: None, model=None, dims=None):
    """Price ``plan`` per rank (costlens.parallel) and measure it on ``gpus`` gloo ranks: the
    largest per-rank peak, weights, gradients and optimizer state beside the estimate, and each
    collective's bytes (which must be equal). ``source``: an import spec (its factory's module
    runs) or a Hugging Face config (config.json, model folder, hub id or config object; the real
    transformers module runs, shrunk to ``dims`` (hf_module.Dims) when given). ``model``:
    ``source`` already loaded (traced; for a config, of the shrunk config).
    Returns (Validation, ParallelEstimate, DistributedMeasurement)."""
    from dataclasses import replace as _replace

    from costlens.frontends.source import load_graph
    from costlens.model import analyse
    from costlens.errors import PlanError
    from costlens.estimate import estimate
    from costlens.measure.validate import Comparison, Validation, _measurable
    from costlens.parallel import estimate_parallel
    from costlens.plans import check_setup

    setup = check_setup(_replace(setup, device="cpu"))
    config = _hf_config(source, dims)
    if config is None:
        _measurable(setup, "cpu")
    else:
        _measurable_real(setup)
    two_d = tp > 1 and shard in ("zero2", "zero3")
    mode = shard if two_d or tp == 1 else "tp"
    if tp > 1 and not two_d and tp != gpus:
        raise PlanError("measured tensor parallelism runs --tp equal to --gpus, or inside FSDP2 "
                        "(--shard zero2|zero3 with --gpus a multiple of --tp)")
    if mode not in SHARD_MODES:
        raise PlanError(f"validate --gpus: --shard ddp|zero1|zero2|zero3 or --tp N, not {shard!r}")
    if config is None and (not isinstance(source, str) or ":" not in source):
        raise PlanError("distributed validation needs an import spec package.module:factory or a Hugging Face "
                        "config (config.json, model folder or hub id)")
    if model is None:
        progress("tracing the config" if config is not None else "tracing the module")
        model = analyse(load_graph(config if config is not None else source))
    result = estimate(model, plan, setup)
    parallel = estimate_parallel(result, gpus, shard if two_d or tp == 1 else "none", tp=tp)
    real = real_module_of(config, setup, model, result) if config is not None else None
    progress(f"measuring two steps on {gpus} gloo ranks ({mode})")
    measured = measure_distributed(str(source) if config is None else "hf", recipe_of(model, result), gpus, mode,
                                   result.batch, result.seq, model.roles.architecture.vocab, setup.optimizer,
                                   tp=tp if two_d else 1, real=real)
    memory, comm = parallel.memory, parallel.communication
    rows = [Comparison("peak bytes (max rank)", memory.peak, measured.peak_bytes, tolerance),
            Comparison("weights bytes", memory.weights, measured.max_over_ranks("weights_bytes"), tolerance),
            Comparison("gradient bytes", memory.gradients, measured.max_over_ranks("gradient_bytes"), tolerance),
            Comparison("optimizer bytes", memory.optimizer, measured.max_over_ranks("optimizer_state_bytes"), tolerance)]
    for kind in COLLECTIVES:
        estimated = getattr(comm, kind)
        if estimated or measured.collective_bytes(kind):
            rows.append(Comparison(f"{kind.replace('_', '-')} bytes", estimated, measured.collective_bytes(kind), 0.0))
    phase = max(measured.ranks, key=lambda r: r.peak_bytes).peak_phase
    notes = (f"{gpus} ranks, {mode}; per-rank figures are the maximum over ranks; "
             f"measured in {measured.seconds:.1f} s",) + parallel.notes
    truth = f"{measured.truth} on {gpus} gloo ranks" if config is not None else ""
    return Validation(result.plan, setup, result.batch, result.seq, "cpu", "torch.distributed", tuple(rows),
                      memory.peak_phase, phase, notes, truth), parallel, measured


def _hf_config(source, dims):
    """The (shrunk) transformers config of a Hugging Face source, or None for an import spec."""
    from costlens.errors import PlanError
    from costlens.frontends.hf_config import read_config
    from costlens.frontends.source import SourceKind, classify, torch_source
    from costlens.measure.hf_module import shrink_config
    found = classify(source)
    if found.kind not in (SourceKind.HF_CONFIG, SourceKind.HUB_ID, SourceKind.CONFIG_OBJECT):
        if dims is not None and dims.given:
            raise PlanError("--tiny and the size options shrink a Hugging Face config, not an import spec")
        return None
    config = torch_source(found)[0] if found.kind is not SourceKind.HF_CONFIG else read_config(found.path)
    return shrink_config(config, dims) if dims is not None and dims.given else config


def _measurable_real(setup) -> None:
    """The recipes a rank runs on the real module: fp32 steps (attention and checkpointing as
    single-rank validate runs them; mixed precision is not priced per rank yet)."""
    from costlens.errors import PlanError
    from costlens.measure.hf_module import check_recipe
    check_recipe(setup, "cpu")
    if setup.precision != "fp32":
        raise PlanError("validate --gpus measures fp32 steps (per-rank mixed precision is not validated yet)")
