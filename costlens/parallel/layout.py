"""What each rank holds: tensors with their FSDP unit and tensor-parallel split, their local
and sharded shapes, ZeRO-1's partition, DDP's buckets, and the tensors tensor parallelism splits.
Shapes are the source's (torch ``[d_out, d_in]``); bytes follow the precision."""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil, prod

from costlens.gradients import StepAnalysis, gradient_sites
from costlens.optimizers import state_bytes, step_temporaries
from costlens.roles.types import Role
from costlens.storages import Precision

DEFAULT_BANDWIDTH_GBPS = 100.0       # GB/s of bus bandwidth per rank (stated in every result)
DDP_BUCKET_BYTES = 25 * 2**20        # DistributedDataParallel(bucket_cap_mb=25)
DDP_FIRST_BUCKET_BYTES = 2**20       # torch.distributed's _DEFAULT_FIRST_BUCKET_BYTES
COLWISE_KINDS = frozenset({"q", "k", "v", "qkv", "kv", "up", "gate", "gate_up"})
ROWWISE_KINDS = frozenset({"o", "down"})
SPLIT_ROLES = frozenset({Role.ATTENTION, Role.FFN, Role.EXPERTS, Role.SHARED_EXPERTS})


@dataclass(frozen=True)
class Tensor:
    """One tensor the optimizer (or only the forward) sees: a base weight or a LoRA matrix."""

    unit: int | None          # FSDP unit: the decoder layer, None for the root
    shape: tuple[int, ...]
    trainable: bool
    split: str | None         # tensor parallelism: "col" (dim 0), "row" (dim 1) or None
    experts: int = 0          # leading expert dimension (expert parallelism splits it)
    site: int = -1            # graph node where it meets data (its gradient appears there)


# --------------------------------------------------------------------------- tensors per rank

def tensors_of(analysis: StepAnalysis, tp: int, ep: int = 1) -> list[Tensor]:
    """Every parameter tensor with its FSDP unit, trainability and tensor-parallel split, in the
    order of the role map (the optimizer's order). With expert parallelism, per-expert tensors of
    experts another rank holds are left out (rank 0 holds the first ceil(E/ep) of each layer)."""
    roles = analysis.model.roles
    last_use = gradient_sites(analysis.model)      # a tied weight's gradient appears at the LM head
    found = []
    elsewhere: set[str] = set()
    seen: dict[tuple, int] = {}          # (layer, kind) -> per-expert tensors met so far: the expert's index
    for use in roles.params:
        if not use.n_params:
            continue
        if use.role is Role.EXPERTS and not use.n_experts:
            expert = seen[(use.layer, use.kind)] = seen.get((use.layer, use.kind), -1) + 1
            if expert >= ceil((roles.architecture.experts or 1) / ep):
                elsewhere.add(use.key)   # expert parallelism: this expert lives on another rank
                continue
        split = None
        if tp > 1 and use.role in SPLIT_ROLES:
            split = "col" if use.kind in COLWISE_KINDS else "row" if use.kind in ROWWISE_KINDS else None
        found.append(Tensor(use.layer, use.shape, use.key in analysis.trainable, split, use.n_experts,
                            last_use[use.constant]))
    by_key = {u.key: u for u in roles.params}
    for adapter in analysis.adapters:
        if adapter.key in elsewhere:
            continue
        base = by_key[adapter.key]
        experts = (adapter.n_experts,) if adapter.n_experts else ()
        split = None
        if tp > 1 and base.role in SPLIT_ROLES:
            split = "col" if base.kind in COLWISE_KINDS else "row" if base.kind in ROWWISE_KINDS else None
        # column-parallel: B [d_out, r] splits its rows; row-parallel: A [r, d_in] splits its columns
        found.append(Tensor(base.layer, experts + (adapter.rank, adapter.d_in), True,
                            "row" if split == "row" else None, adapter.n_experts, adapter.site))
        found.append(Tensor(base.layer, experts + (adapter.d_out, adapter.rank), True,
                            "col" if split == "col" else None, adapter.n_experts, adapter.site))
    return found


def local_shape(tensor: Tensor, tp: int, ep: int) -> tuple[int, ...]:
    """The tensor on one rank after tensor and expert parallelism (before FSDP sharding).
    Linear weights are [d_out, d_in] ([E, d_out, d_in] for expert tensors)."""
    shape = list(tensor.shape)
    lead = 1 if tensor.experts else 0
    if tensor.experts and ep > 1:
        shape[0] = ceil(shape[0] / ep)
    if tensor.split and tp > 1 and len(shape) - lead >= 1:
        axis = lead + (0 if tensor.split == "col" or len(shape) - lead == 1 else 1)
        shape[axis] = ceil(shape[axis] / tp)
    return tuple(shape)


def fsdp_shard(shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    """FSDP2 shards dim 0: ⌈d0/N⌉ rows per rank (the padded size every rank allocates)."""
    return (ceil(shape[0] / n),) + tuple(shape[1:]) if shape else shape


def zero1_partition(shapes: list[tuple[int, ...]], n: int) -> list[list[tuple[int, ...]]]:
    """ZeroRedundancyOptimizer: whole tensors, largest first, each to the least-loaded rank."""
    ranks: list[list[tuple[int, ...]]] = [[] for _ in range(n)]
    sizes = [0] * n
    for shape in sorted(shapes, key=prod, reverse=True):
        rank = sizes.index(min(sizes))
        ranks[rank].append(shape)
        sizes[rank] += prod(shape)
    return ranks


def ddp_buckets(sizes: list[int]) -> int:
    """Number of DDP buckets: gradients in reverse order, a 1 MiB first bucket, then 25 MiB."""
    buckets, filled = 0, None
    for size in reversed(sizes):
        cap = DDP_FIRST_BUCKET_BYTES if buckets <= 1 else DDP_BUCKET_BYTES
        if filled is None or filled + size > cap:
            buckets, filled = buckets + 1, 0
        filled += size
    return buckets


_NOT_MODULE_TENSORS = ("scalar.", "ints(", "reshape_target")      # constants the graph builder makes itself
_DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "int16": 2,
                "int8": 1, "uint8": 1, "bool": 1, "float8e4m3fn": 1, "float8e5m2": 1}


def module_buffer_bytes(analysis: StepAnalysis) -> int:
    """Bytes of the module's buffers (RoPE's ``inv_freq`` and ``original_inv_freq``, position ids, ...):
    what DDP's ``broadcast_buffers=True`` broadcasts from rank 0 at every forward. torch.export
    lifts every registered buffer, read in forward or not, as a named placeholder, so they are the
    traced graph's named constants that hold no parameter. An ONNX graph has no buffers (its
    initializers are weights or constants the exporter folded): 0. A tied parameter's second name,
    read by no node and shaped as the tied tensor, is not a buffer."""
    graph, roles = analysis.model.graph, analysis.model.roles
    if str(graph.source).endswith(".onnx"):
        return 0
    params = {u.constant for u in roles.params}
    tied_shapes = {tuple(u.shape) for u in roles.params if u.tied_to}
    read = {x for node in graph.nodes for x in node.inputs if x}
    total = 0
    for name, const in graph.constants.items():
        if name in params or name.startswith(_NOT_MODULE_TENSORS):
            continue
        if name not in read and tuple(const.shape) in tied_shapes:
            continue
        total += const.n_elements * _DTYPE_BYTES.get(const.dtype, 4)
    return total


def sharded_tensors(analysis: StepAnalysis, tp: int) -> set[str]:
    """Tensors that tensor parallelism splits: from a column-parallel linear's output through
    everything computed from it, up to (not including) a row-parallel linear's output."""
    if tp <= 1:
        return set()
    graph, roles = analysis.model.graph, analysis.model.roles
    kinds: dict[str, str] = {}
    for use in roles.params:
        if use.role in SPLIT_ROLES and use.kind in COLWISE_KINDS | ROWWISE_KINDS:
            kinds[use.site] = "row" if use.kind in ROWWISE_KINDS else "col"
    split: set[str] = set()
    for node in graph.nodes:
        kind = kinds.get(node.name)
        if kind == "col" or (kind is None and any(x in split for x in node.inputs if x)):
            split.update(o for o in node.outputs if o)
    return split


class RankLayout:
    """Per-rank sizes of one plan under one parallel layout (bytes)."""

    def __init__(self, analysis: StepAnalysis, setup, shard: str, dp: int, tp: int, ep: int):
        self.precision = Precision.of(setup.precision)
        wb = self.precision.weight
        self.shard, self.dp = shard, dp
        sharded = shard in ("zero2", "zero3")
        self.tensors = tensors_of(analysis, tp, ep)
        local = self.local = [local_shape(t, tp, ep) for t in self.tensors]
        resident = [fsdp_shard(s, dp) if sharded else s for s in local]
        units = sorted({t.unit for t in self.tensors if t.unit is not None})
        self.layers = units
        self.unsharded = {u: 0 for u in [None, *units]}     # a unit's full (local) weights
        self.gathered = {u: 0 for u in [None, *units]}      # its padded all-gather buffer
        self.grad_full = {u: 0 for u in [None, *units]}     # its unsharded trainable gradients
        self.grad_shard = {u: 0 for u in [None, *units]}    # its sharded (padded) gradients
        for t, full, mine in zip(self.tensors, local, resident):
            self.unsharded[t.unit] += prod(full) * wb
            self.gathered[t.unit] += prod(fsdp_shard(full, dp)) * wb * dp
            if t.trainable:
                self.grad_full[t.unit] += prod(full) * wb
                self.grad_shard[t.unit] += prod(mine) * wb
        self.weights = sum(prod(s) * wb for s in resident)
        trainable = [s for t, s in zip(self.tensors, local) if t.trainable]
        self.trainable_local = trainable
        self.n_trainable_tensors = len(trainable)
        mine_trainable = [s for t, s in zip(self.tensors, resident) if t.trainable]
        ordered = [self._in_order(part, trainable) for part in zero1_partition(trainable, dp)] \
            if shard == "zero1" else [mine_trainable]
        self.optimizer_shapes = max(ordered, key=lambda p: self._state(setup, p))
        self.optimizer = self._state(setup, self.optimizer_shapes)
        self.temporaries = max(step_temporaries(setup.optimizer, setup.optimizer_impl, p, self.precision.state)
                               for p in ordered)
        self.grads = sum(self.grad_shard.values()) if sharded else sum(prod(s) * wb for s in trainable)
        self.buckets = sum(prod(s) * wb for s in trainable) if shard in ("ddp", "zero1") and dp > 1 else 0
        self.last = units[-1] if units else None

    @staticmethod
    def _in_order(part: list, order: list) -> list:
        remaining = list(part)
        result = []
        for shape in order:
            if shape in remaining:
                remaining.remove(shape)
                result.append(shape)
        return result

    def _state(self, setup, shapes) -> int:
        return sum(state_bytes(setup.optimizer, s, self.precision.state) for s in shapes) + \
            sum(prod(s) for s in shapes) * self.precision.master

