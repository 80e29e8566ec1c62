"""Bytes of the collectives of one step on one rank, and their time at a bandwidth."""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

from costlens.estimate import Estimate
from costlens.gradients import StepAnalysis
from costlens.parallel.layout import (COLWISE_KINDS, ROWWISE_KINDS, SPLIT_ROLES, RankLayout, ddp_buckets,
                                      module_buffer_bytes)
from costlens.storages import Precision, StorageContext


@dataclass(frozen=True)
class Communication:
    """Bytes of the full buffers of the step's collectives on one rank, and the time at a bandwidth."""

    all_reduce: int
    all_gather: int
    reduce_scatter: int
    broadcast: int
    all_to_all: int
    wire_bytes: int           # what one rank sends (ring algorithms)
    bandwidth_gbps: float
    seconds: float


def communication(analysis: StepAnalysis, result: Estimate, rank: RankLayout, tp: int, ep: int,
                   bandwidth_gbps: float) -> Communication:
    """Full-buffer bytes of each kind of collective in one (the second) step on one rank."""
    dp, wb = rank.dp, rank.precision.weight
    all_reduce = all_gather = reduce_scatter = broadcast = 0
    trainable_bytes = sum(prod(s) for s in rank.trainable_local) * wb
    if rank.shard in ("ddp", "zero1") and dp > 1:
        all_reduce += trainable_bytes
        sizes = [prod(s) * wb for s in rank.trainable_local]
        broadcast += 4 * (rank.n_trainable_tensors + 1) + 4 * ddp_buckets(sizes)   # bucket rebuild
        broadcast += module_buffer_bytes(analysis)      # broadcast_buffers=True: rank 0's buffers, every forward
        if rank.shard == "zero1":
            broadcast += trainable_bytes          # each updated parameter from its owner
    if rank.shard in ("zero2", "zero3") and dp > 1:
        layers = sum(rank.gathered[u] for u in rank.layers)
        all_gather = rank.gathered[None] + layers * (2 if rank.shard == "zero3" else 1)
        reduce_scatter = sum(dp * g for g in rank.grad_shard.values())
    tp_reduce = _tensor_parallel_all_reduce(analysis, result, tp) if tp > 1 else 0
    all_to_all = _expert_all_to_all(analysis, result, ep) if ep > 1 else 0
    wire = 0.0
    if dp > 1:
        wire += 2 * (dp - 1) / dp * all_reduce + (dp - 1) / dp * (all_gather + reduce_scatter + broadcast)
    if tp > 1:
        wire += 2 * (tp - 1) / tp * tp_reduce
    if ep > 1:
        wire += (ep - 1) / ep * all_to_all
    return Communication(all_reduce + tp_reduce, all_gather, reduce_scatter, broadcast, all_to_all, round(wire),
                         bandwidth_gbps, wire / (bandwidth_gbps * 1e9))


def _tensor_parallel_all_reduce(analysis: StepAnalysis, result: Estimate, tp: int) -> int:
    """Row-parallel linears all-reduce their output in forward; column-parallel ones their
    input's gradient in backward (when it needs one). LoRA: a row-parallel A all-reduces its
    r-wide output, a column-parallel B its input's gradient."""
    graph, roles = analysis.model.graph, analysis.model.roles
    ctx = StorageContext(analysis, Precision.of(result.setup.precision), result.setup.device, result.setup.attention,
                         result.setup.experts_impl)
    index_of = {n.name: i for i, n in enumerate(graph.nodes)}
    adapters = analysis.adapter_at
    total = 0
    for use in roles.params:
        if use.role not in SPLIT_ROLES or use.kind not in COLWISE_KINDS | ROWWISE_KINDS:
            continue
        index = index_of[use.site]
        node = graph.nodes[index]
        data = next((x for x in node.inputs if x and x not in analysis.weights), None)
        out = node.outputs[0]
        adapter = adapters.get(index)
        if use.kind in ROWWISE_KINDS:
            total += ctx.nbytes(out)
            if adapter:
                total += ctx.nbytes(out) // adapter.d_out * adapter.rank
        else:
            if data and analysis.runs_backward[index] and analysis.needs(data):
                total += ctx.nbytes(data)
            if adapter and analysis.runs_backward[index]:
                total += ctx.nbytes(out) // adapter.d_out * adapter.rank
    return total


def _expert_all_to_all(analysis: StepAnalysis, result: Estimate, ep: int) -> int:
    """Each MoE layer sends its tokens' k hidden vectors to the experts and back, in forward and
    again in backward: 4 x tokens x k x hidden x activation bytes."""
    arch = analysis.model.roles.architecture
    tokens = result.batch * result.seq
    act = Precision.of(result.setup.precision).activation
    return 4 * len(analysis.model.roles.routers) * tokens * (arch.top_k or 1) * (arch.hidden or 0) * act
