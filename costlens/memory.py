"""Memory of one steady-state training step (the second step: optimizer state exists).

Persistent: weights, optimizer state (and fp32 master weights under mixed precision).
Activations: the storages autograd saves for backward (storages.py), and the loss's
log-softmax. The training loop is taken to keep only the loss (as the Hugging Face Trainer
does), not the logits. The peak is simulated phase by phase (DESIGN.md §2.8): the end of the
forward; backward in reverse order, saved storages released after the last node that needs
them while weight gradients appear; the optimizer step with its temporaries. Gradients are
freed by ``zero_grad(set_to_none=True)`` before each forward.
"""
from __future__ import annotations

from dataclasses import dataclass

from costlens.gradients import StepAnalysis
from costlens.ir import Node
from costlens.ops.saved import backward_transient
from costlens.optimizers import state_bytes, step_temporaries
from costlens.plans import Plan, Setup
from costlens.shapes import numel
from costlens.ops.autocast import autocast_grad_copies
from costlens.storages import VIEW_OPS, Precision, SavedStorage, StorageContext, collect_saved


@dataclass(frozen=True)
class MemoryBytes:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    peak: int
    peak_phase: str
    activations_by_layer: tuple[tuple[int | None, int], ...] = ()   # (layer or None outside blocks, bytes)


# --------------------------------------------------------------------------- persistent

def trainable_shapes(analysis: StepAnalysis) -> list[tuple[int, ...]]:
    """Shapes of the tensors the optimizer holds: trainable base weights and LoRA A, B."""
    shapes = [u.shape for u in analysis.model.roles.params if u.key in analysis.trainable and u.n_params]
    for adapter in analysis.adapters:
        experts = (adapter.n_experts,) if adapter.n_experts else ()
        shapes += [experts + (adapter.rank, adapter.d_in), experts + (adapter.d_out, adapter.rank)]
    return shapes


def _grads_at(analysis: StepAnalysis, precision: Precision) -> dict[int, int]:
    """Bytes of weight gradients produced at each node's backward."""
    index_of = {n.name: i for i, n in enumerate(analysis.model.graph.nodes)}
    grads: dict[int, int] = {}
    for use in analysis.model.roles.params:
        if use.key in analysis.trainable and use.n_params:
            site = index_of[use.site]
            grads[site] = grads.get(site, 0) + use.n_params * precision.weight
    for adapter in analysis.adapters:
        grads[adapter.site] = grads.get(adapter.site, 0) + adapter.n_params * precision.adapter
    return grads


def _transient(ctx: StorageContext, node: Node, share: float = 1.0) -> int:
    """Gradient tensors alive while one node runs backward: its output's and its inputs' (an
    expert's, at its routed share of tokens)."""
    if node.op in VIEW_OPS:
        return 0
    total = sum(ctx.nbytes(o) for o in node.outputs if o and ctx.needs(o))
    total += sum(ctx.nbytes(x) for x in node.inputs if x and ctx.needs(x))
    return round(total * share) + backward_transient(node, ctx) + autocast_grad_copies(node, ctx)


# --------------------------------------------------------------------------- estimate

def estimate_memory(analysis: StepAnalysis, plan: Plan, setup: Setup) -> MemoryBytes:
    precision = Precision.of(setup.precision)
    ctx = StorageContext(analysis, precision, setup.device, setup.attention)
    graph, roles = analysis.model.graph, analysis.model.roles
    shapes = trainable_shapes(analysis)
    n_trainable = sum(numel(s) for s in shapes)
    adapter_params = sum(a.n_params for a in analysis.adapters)
    n_base = n_trainable - adapter_params
    adapter_shapes = shapes[len(shapes) - 2 * len(analysis.adapters):] if analysis.adapters else []
    base_shapes = shapes[:len(shapes) - len(adapter_shapes)]
    weights = roles.params_total * precision.weight + adapter_params * precision.adapter
    gradients = n_base * precision.weight + adapter_params * precision.adapter
    optimizer = sum(state_bytes(setup.optimizer, s, precision.state) for s in base_shapes)
    optimizer += sum(state_bytes(setup.optimizer, s, precision.adapter_state) for s in adapter_shapes)
    optimizer += n_base * precision.master
    persistent = weights + optimizer

    logits = graph.outputs[0]
    logits_bytes = ctx.nbytes(logits)
    trains = any(analysis.runs_backward)
    saved = collect_saved(analysis, ctx, plan, setup) if trains else {}
    if trains:   # cross-entropy keeps log_softmax(logits), fp32 under autocast
        saved["loss:log_softmax"] = SavedStorage(_loss_bytes(ctx, precision), len(graph.nodes))
    layer_items, layer_keys = _checkpointed(analysis, saved) if setup.checkpointing else ({}, set())
    held_at_start = sum(item.n_bytes for key, item in saved.items() if key not in layer_keys)
    if setup.checkpointing:
        held_at_start += _layer_inputs(analysis, ctx)
    activations = held_at_start

    forward_peak = persistent + activations + logits_bytes     # the logits live until the loss is taken
    if not trains:
        return MemoryBytes(weights, 0, optimizer, 0, forward_peak + _largest_activation(ctx), "forward")
    backward_peak = _simulate_backward(analysis, ctx, saved, layer_items, layer_keys, persistent, held_at_start)
    optimizer_peak = persistent + gradients + step_temporaries(
        setup.optimizer, setup.optimizer_impl, shapes, precision.state)
    phases = {"forward": forward_peak, "backward": backward_peak, "optimizer": optimizer_peak}
    phase = max(phases, key=phases.get)
    return MemoryBytes(weights, gradients, optimizer, activations, phases[phase], phase,
                       _by_layer(analysis, saved))


def _loss_bytes(ctx: StorageContext, precision: Precision) -> int:
    """Bytes of one logits-sized tensor of the loss: autocast runs cross-entropy in fp32 (it
    upcasts half logits), so log_softmax and its gradients are fp32 there."""
    logits = ctx.graph.outputs[0]
    elements = numel(ctx.shape(logits) or ())
    return elements * (4 if precision.mixed else precision.activation)


def _by_layer(analysis: StepAnalysis, saved: dict) -> tuple[tuple[int | None, int], ...]:
    """Saved bytes attributed to the layer of the node whose backward last needs them."""
    node_layers = analysis.model.roles.node_layers
    totals: dict[int | None, int] = {}
    for item in saved.values():
        layer = node_layers[item.release] if item.release < len(node_layers) else None
        totals[layer] = totals.get(layer, 0) + item.n_bytes
    return tuple(sorted(totals.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))


def _simulate_backward(analysis, ctx, saved, layer_items, layer_keys, base, held_at_start) -> int:
    graph = analysis.model.graph
    grads_at = _grads_at(analysis, ctx.precision)
    released: dict[int, int] = {}
    for key, item in saved.items():
        if key not in layer_keys:
            released[item.release] = released.get(item.release, 0) + item.n_bytes
    live = held_at_start
    routed = ctx.routed
    grad_logits = saved["loss:log_softmax"].n_bytes  # the loss's dtype: fp32 under autocast
    peak = base + live + 2 * grad_logits          # nll_loss and log_softmax gradients together
    live -= saved["loss:log_softmax"].n_bytes
    grads = 0
    entered: set[int] = set()
    for index in range(len(graph.nodes) - 1, -1, -1):
        if not analysis.runs_backward[index]:
            continue
        layer = analysis.model.roles.node_layers[index]
        if layer_items and layer is not None and layer not in entered:
            entered.add(layer)       # checkpointing: the layer's forward runs again here
            live += sum(item.n_bytes for item in layer_items.get(layer, ()))
            for item in layer_items.get(layer, ()):
                released[item.release] = released.get(item.release, 0) + item.n_bytes
        grads += grads_at.get(index, 0)
        share = routed[index][0] if index in routed else 1.0
        peak = max(peak, base + live + grads + _transient(ctx, graph.nodes[index], share))
        live -= released.get(index, 0)
    return peak


def _checkpointed(analysis: StepAnalysis, saved: dict) -> tuple[dict[int, list], set[str]]:
    """Saved storages made inside a layer: with checkpointing they exist only while that
    layer's backward runs (after recomputing its forward). Returns (layer -> items, keys)."""
    by_layer: dict[int, list] = {}
    keys: set[str] = set()
    node_layers = analysis.model.roles.node_layers
    for key, item in saved.items():
        layer = node_layers[item.release] if item.release < len(node_layers) else None
        if layer is not None:
            by_layer.setdefault(layer, []).append(item)
            keys.add(key)
    return by_layer, keys


def _layer_inputs(analysis: StepAnalysis, ctx: StorageContext) -> int:
    """What checkpointed layers keep from the forward: each layer's input hidden states, and
    the side inputs HF passes into every layer (the attention mask, the RoPE cos / sin
    tables), which the recompute closures hold alive; those are shared, so counted once."""
    arch = analysis.model.roles.architecture
    tokens = analysis.bindings["batch"] * analysis.bindings["seq"]
    return arch.layers * tokens * (arch.hidden or 0) * ctx.precision.activation + _side_inputs(analysis, ctx)


def _side_inputs(analysis: StepAnalysis, ctx: StorageContext) -> int:
    """Float storages made outside the layers and read inside them, other than the residual
    stream ([b, s, hidden], counted per layer); a fused attention kernel gets no mask tensor
    (HF calls it with is_causal), so 4-D masks are left out then."""
    from costlens.storages import fused_kernel
    graph, layers = analysis.model.graph, analysis.model.roles.node_layers
    hidden = analysis.model.roles.architecture.hidden
    outside = {o for i, n in enumerate(graph.nodes) if layers[i] is None for o in n.outputs if o}
    found: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        if layers[index] is None:
            continue
        for x in node.inputs:
            if not x or x not in outside or ctx.is_weight(x) or ctx.graph.dtype(x) in ("int64", "int32", "bool"):
                continue
            root = ctx.storage(x)
            shape = ctx.shape(root) or ()
            if (len(shape) == 3 and shape[-1] == hidden) or (len(shape) == 4 and fused_kernel(ctx.attention)):
                continue
            found[root] = ctx.nbytes(root)
    return sum(found.values())


def _largest_activation(ctx: StorageContext) -> int:
    return max((ctx.nbytes(o) for n in ctx.graph.nodes for o in n.outputs if o), default=0)


# --------------------------------------------------------------------------- inference

def inference_activation_peak(analysis: StepAnalysis, precision_name: str = "fp32") -> int:
    """Peak bytes of live activations in a forward pass without autograd: each storage lives
    from the node that makes it to the last node that reads it (an inference runtime's memory
    planner reuses the rest). Views share their base's storage."""
    ctx = StorageContext(analysis, Precision.of(precision_name))
    graph = analysis.model.graph
    last_use: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        for name in node.inputs:
            if name:
                last_use[ctx.storage(name)] = index
    for name in graph.outputs:
        last_use[ctx.storage(name)] = len(graph.nodes)
    live: dict[str, int] = {}
    peak = 0
    for index, node in enumerate(graph.nodes):
        for out in node.outputs:
            root = ctx.storage(out) if out else ""
            if out and root == out and out not in analysis.weights:
                live[out] = ctx.nbytes(out)
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if last_use.get(n, -1) <= index]:
            del live[name]
    return peak
