"""Per-rank memory and per-step communication of a data-, ZeRO/FSDP- or tensor-parallel step.

Built on the single-device estimate: the same parameter uses (weights, gradients and optimizer
state per tensor), the same saved storages and phase-by-phase backward walk as memory.py, with
what each rank holds instead of what one device holds (DESIGN.md §6, "Per rank"):

- ``ddp``: every rank holds everything, plus gradient buckets: a second copy of the trainable
  gradients, allocated up front (25 MB buckets; ``gradient_as_bucket_view=False``).
- ``zero1``: DDP plus ZeroRedundancyOptimizer: the optimizer state of whole parameters, assigned
  greedily to the least-loaded rank, largest first; updated parameters are broadcast.
- ``zero3`` (FSDP2 ``fully_shard`` per decoder layer + root; FSDP1 FULL_SHARD): each parameter
  sharded ⌈d0/N⌉ rows (padded), the unit being computed unsharded with its all-gather buffer,
  the root (embeddings, final norm, head) unsharded from forward to the end of backward, the
  newest all-gather buffer alive until the next unit's copy-out (the last layer's until the
  root's forward ends); unsharded gradients of a unit until its reduce-scatter (whose input is a
  copy of them), then sharded ones. Nothing unsharded survives the step.
- ``zero2`` (FSDP2 ``reshard_after_forward=False``; FSDP1 SHARD_GRAD_OP): as zero3, but every unit
  stays unsharded from its forward to its backward, so nothing is gathered in backward.
- ``tp`` (``--tp T``): q, k, v, gate, up column-parallel, o, down row-parallel: their weights and
  every activation between them 1/T per rank; residual stream, norms, embeddings, router and
  logits replicated; one all-reduce per row-parallel linear in forward and per column-parallel
  linear in backward.
- ``--ep E``: each rank holds ⌈experts/E⌉ of every expert tensor; tokens travel by all-to-all.
- ``--offload optimizer|params``: optimizer state (and master weights, step temporaries) or also
  the parameter shards live in host memory.

All figures are bytes per rank (the maximum over ranks where ranks differ) and bytes per step.
"""
from __future__ import annotations

from dataclasses import dataclass

from costlens.estimate import Estimate
from costlens.gradients import analyze
from costlens.parallel.comm import Communication, communication
from costlens.parallel.layout import (DEFAULT_BANDWIDTH_GBPS, RankLayout, ddp_buckets,
                                      fsdp_shard, local_shape, sharded_tensors, tensors_of, zero1_partition)
from costlens.parallel.timeline import RankMemory, Timeline
from costlens.plans import check_parallel


@dataclass(frozen=True)
class ParallelEstimate:
    """A plan priced per rank of a parallel layout: the layout (GPUs, shard mode, tensor and
    expert parallel sizes, offload), each rank's memory (bytes) and the step's communication."""

    gpus: int
    shard: str
    tp: int
    ep: int
    offload: str | None
    dp: int                   # data-parallel replicas: gpus / (tp * ep)
    batch_per_rank: int
    memory: RankMemory
    communication: Communication
    notes: tuple[str, ...]


# --------------------------------------------------------------------------- the step, per rank

def estimate_parallel(result: Estimate, gpus: int, shard: str = "ddp", tp: int = 1, ep: int = 1,
                      offload: str | None = None, bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS) -> ParallelEstimate:
    """Per-rank bytes (weights, gradients, optimizer state, activations, buffers, peak and its
    phase) and per-step collective bytes of ``result``'s plan on ``gpus`` ranks. ``--batch`` is
    the batch of each data-parallel rank (tensor-parallel ranks share theirs)."""
    check_parallel(gpus, shard, tp, ep, offload)
    dp = gpus // (tp * ep)
    shard = "none" if dp == 1 and shard in ("ddp", "zero1", "zero2", "zero3") and gpus == 1 else shard
    model, setup = result.model, result.setup
    analysis = analyze(model, result.plan, {"batch": result.batch, "seq": result.seq},
                       routed=setup.moe_dispatch == "routed", input_grads=setup.checkpointing)
    rank = RankLayout(analysis, setup, shard, dp, tp, ep)
    walk = Timeline(analysis, result, rank, tp)
    memory = walk.memory(offload)
    notes = [f"batch {result.batch} per data-parallel rank; {dp} data-parallel x {tp} tensor-parallel"
             + (f" x {ep} expert-parallel" if ep > 1 else "") + " ranks",
             f"communication time at {bandwidth_gbps:g} GB/s per rank (ring all-reduce sends 2(N-1)/N of the buffer, "
             "all-gather and reduce-scatter (N-1)/N), not overlapped with compute"]
    if shard in ("zero2", "zero3"):
        notes.append("FSDP2 fully_shard per decoder layer + root: parameters sharded ceil(d0/N) rows (padded)")
    if shard in ("ddp", "zero1") and dp > 1:
        notes.append("DDP gradient buckets (25 MB) hold a second copy of the trainable gradients; the measured "
                     "second step also broadcasts the rebuilt bucket indices")
    return ParallelEstimate(gpus, shard, tp, ep, offload, dp, result.batch, memory,
                            communication(analysis, result, rank, tp, ep, bandwidth_gbps), tuple(notes))



__all__ = ["Communication", "ParallelEstimate", "RankMemory", "check_parallel", "ddp_buckets", "estimate_parallel",
           "fsdp_shard", "local_shape", "sharded_tensors", "tensors_of", "zero1_partition"]
