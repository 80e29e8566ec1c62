"""memory.py's phase-by-phase walk of one step, per rank: the same saved storages, release points
and backward transients, with the rank's weights, gradients, buffers and unsharded units."""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

from costlens.estimate import Estimate
from costlens.gradients import StepAnalysis
from costlens.memory import _checkpointed, _layer_inputs, _transient
from costlens.parallel.layout import RankLayout, sharded_tensors
from costlens.storages import SavedStorage, StorageContext, collect_saved


@dataclass(frozen=True)
class RankMemory:
    """One rank's bytes, the maximum over ranks for each figure."""

    weights: int              # parameter shards (or replicas) resident on the device
    gradients: int            # gradients held when backward ends
    optimizer: int            # optimizer state (and fp32 master weights)
    activations: int          # saved for backward
    buffers: int              # DDP gradient buckets (allocated up front)
    transient: int            # unsharded units and collective buffers alive at the peak
    peak: int
    peak_phase: str
    host: int = 0             # offloaded to host memory


class Timeline:
    """memory.py's phase-by-phase walk with per-rank weights, gradients, buffers and units."""

    def __init__(self, analysis: StepAnalysis, result: Estimate, rank: RankLayout, tp: int):
        self.analysis, self.rank, self.setup = analysis, rank, result.setup
        precision = rank.precision
        self.ctx = StorageContext(analysis, precision, result.setup.device, result.setup.attention,
                                  result.setup.experts_impl)
        self.split = sharded_tensors(analysis, tp)
        self.tp = tp
        graph = analysis.model.graph
        arch = analysis.model.roles.architecture
        self.residual = result.batch * result.seq * (arch.hidden or 0) * precision.activation
        self.logits = self.ctx.nbytes(graph.outputs[0])
        saved = collect_saved(analysis, self.ctx, result.plan, result.setup)
        log_softmax = self.logits // precision.activation * (4 if precision.mixed else precision.activation)
        saved["loss:log_softmax"] = SavedStorage(log_softmax, len(graph.nodes))
        self.saved = {k: SavedStorage(self._local(k, v.n_bytes), v.release) for k, v in saved.items()}
        checkpointing = result.setup.checkpointing
        self.layer_items, self.layer_keys = _checkpointed(analysis, self.saved) if checkpointing else ({}, set())
        if checkpointing:     # held from the forward, each freed as its layer's backward ends
            self.saved.update(_layer_inputs(analysis, self.ctx))
        self.held = sum(v.n_bytes for k, v in self.saved.items() if k not in self.layer_keys)

    def _local(self, key: str, n_bytes: int) -> int:
        return n_bytes // self.tp if key in self.split else n_bytes

    def _unit_extra(self, layer, done: set) -> int:
        """Unsharded weights and all-gather buffers alive while ``layer`` (None: the root) runs
        backward; ``done``: layers whose backward has finished."""
        r = self.rank
        # inside a unit's backward FSDP2's pre-backward hook keeps the gradient of the unit's output
        # (one residual-stream tensor) beside the gradients autograd is computing
        held = self.residual if layer is not None else 0
        if r.shard == "zero3":   # the unit unsharded, and an all-gather buffer (the next unit's, prefetched)
            return r.unsharded[None] + (r.unsharded[layer] + r.gathered[layer] + held if layer is not None else 0)
        if r.shard == "zero2":
            return r.unsharded[None] + sum(r.unsharded[u] for u in r.layers if u not in done) + held
        return 0

    def memory(self, offload: str | None) -> RankMemory:
        r = self.rank
        host = r.optimizer if offload else 0
        optimizer = 0 if offload else r.optimizer
        weights = 0 if offload == "params" else r.weights
        host += r.weights if offload == "params" else 0
        base = weights + optimizer + r.buckets
        sharded = r.shard in ("zero2", "zero3")
        gathered = 0
        if r.shard == "zero3":
            gathered = r.unsharded[None] + (r.gathered[r.last] if r.last is not None else 0)
        elif r.shard == "zero2":
            gathered = sum(r.unsharded.values()) + (r.gathered[r.last] if r.last is not None else 0)
        # the end of forward: the logits exist, the loss's log-softmax not yet; with the model's own
        # loss ("hf") it is taken inside forward, while the root's last all-gather buffer is alive
        # (and half logits get HF's logits.float() copy, as memory.py prices it)
        log_softmax = self.saved["loss:log_softmax"].n_bytes
        in_forward = log_softmax + (log_softmax if log_softmax > self.logits else 0) if self.setup.loss == "hf" else 0
        phases = {"forward": base + gathered + self.held - log_softmax + in_forward + self.logits
                  + self._head_input_unsaved()}
        phases["backward"], at_peak = self._backward(base)
        temporaries = 0 if offload else r.temporaries
        phases["optimizer"] = base + r.grads + temporaries
        phase = max(phases, key=phases.get)
        transient = {"forward": gathered, "backward": at_peak, "optimizer": 0}[phase]
        return RankMemory(weights, r.grads, optimizer, self.held, r.buckets,
                          transient if sharded else 0, phases[phase], phase, host)

    def _head_input_unsaved(self) -> int:
        """Bytes of the LM head's input when autograd does not save it (a frozen head): when the
        logits exist it is still alive, held by the causal-LM forward (HF's ``outputs``) until
        that returns; a trainable head saves it, so it is already among the saved storages."""
        graph, ctx = self.analysis.model.graph, self.ctx
        head = ctx.producer(ctx.storage(graph.outputs[0]))
        if head is None:
            return 0
        data = [x for x in head.inputs if x and not ctx.is_weight(x) and x not in graph.inputs]
        roots = {ctx.storage(x) for x in data}
        return sum(ctx.nbytes(r) for r in roots if r not in self.saved)

    def _backward(self, base: int) -> tuple[int, int]:
        """(peak, unsharded bytes at it) of the backward walk."""
        analysis, r, ctx = self.analysis, self.rank, self.ctx
        graph = analysis.model.graph
        node_layers = analysis.model.roles.node_layers
        sharded = r.shard in ("zero2", "zero3")
        grads_at = self._grads_at()
        released: dict[int, int] = {}
        for key, item in self.saved.items():
            if key not in self.layer_keys:
                released[item.release] = released.get(item.release, 0) + item.n_bytes
        live = self.held
        done: set = set()
        extra = self._unit_extra(None, done)
        peak, at_peak = base + extra + live + 2 * self.logits, extra
        live -= self.saved["loss:log_softmax"].n_bytes
        grads, current = 0, None
        entered: set = set()
        for index in range(len(graph.nodes) - 1, -1, -1):
            if not analysis.runs_backward[index]:
                continue
            layer = node_layers[index]
            if sharded and layer != current and current is not None:
                # the unit's gradients are reduce-scattered: input copy and sharded output
                extra = self._unit_extra(current, done)
                peak, at_peak = _higher((peak, at_peak), base + live + grads + extra + r.grad_full[current], extra)
                grads += r.grad_shard[current] - r.grad_full[current]
                done.add(current)
            if layer is not None:
                current = layer
            if self.layer_items and layer is not None and layer not in entered:
                entered.add(layer)
                live += sum(item.n_bytes for item in self.layer_items.get(layer, ()))
                for item in self.layer_items.get(layer, ()):
                    released[item.release] = released.get(item.release, 0) + item.n_bytes
            grads += grads_at.get(index, 0)
            share = ctx.routed[index][0] if index in ctx.routed else 1.0
            transient = _transient(ctx, graph.nodes[index], share)
            if any(o in self.split for o in graph.nodes[index].outputs if o):
                transient //= self.tp
            extra = self._unit_extra(layer, done)
            peak, at_peak = _higher((peak, at_peak), base + live + grads + transient + extra, extra)
            live -= released.get(index, 0)
        if sharded:       # the root's reduce-scatter ends backward
            if current is not None:
                grads += r.grad_shard[current] - r.grad_full[current]
            root = r.unsharded[None]
            peak, at_peak = _higher((peak, at_peak), base + grads + root + r.grad_full[None], root)
        return peak, at_peak

    def _grads_at(self) -> dict[int, int]:
        """Local gradient bytes produced at each node (memory._grads_at, per rank)."""
        r = self.rank
        grads: dict[int, int] = {}
        for tensor, shape in zip(r.tensors, r.local):
            if tensor.trainable:
                grads[tensor.site] = grads.get(tensor.site, 0) + prod(shape) * r.precision.weight
        return grads


def _higher(current: tuple[int, int], value: int, extra: int) -> tuple[int, int]:
    return (value, extra) if value > current[0] else current

