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

from costlens.gradients import StepAnalysis, gradient_sites
from costlens.ir import Node
from costlens.ops.saved import backward_transient
from costlens.optimizers import state_bytes, step_temporaries
from costlens.plans import Plan, Setup
from costlens.shapes import numel
from costlens.ops.autocast import autocast_grad_copies
from costlens.storages import VIEW_OPS, Precision, SavedStorage, StorageContext, collect_saved

# torchtune's CEWithChunkedOutputLoss default num_output_chunks, which its recipes pass to the
# model (set_num_output_chunks); the "chunked-ce" loss is priced at it
CHUNKED_CE_CHUNKS = 8


@dataclass(frozen=True)
class MemoryBytes:
    """Memory of one training step, in bytes: persistent weights, gradients and optimizer state
    (moments, fp32 masters), activations saved for backward, and the step's peak with the phase
    (forward, backward, optimizer) where it falls."""

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
    return shapes + [shape for adapter in analysis.adapters for shape in adapter.shapes]


def _grads_at(analysis: StepAnalysis, precision: Precision) -> dict[int, int]:
    """Bytes of weight gradients produced at each node's backward."""
    grads: dict[int, int] = {}
    # a tied weight's gradient exists from the backward of its use that runs first (the head)
    trained = [u for u in analysis.model.roles.params if u.key in analysis.trainable]
    last_site = gradient_sites(analysis.model, trained)
    for use in analysis.model.roles.params:
        if use.key in analysis.trainable and use.n_params:
            site = last_site[use.constant]
            grads[site] = grads.get(site, 0) + use.n_params * precision.weight
    for adapter in analysis.adapters:
        grads[adapter.site] = grads.get(adapter.site, 0) + adapter.n_params * precision.adapter
        if adapter.dora_weight_grad:    # PEFT's throwaway gradient of W.T, in the adapter's input dtype
            grads[adapter.site] += adapter.d_in * adapter.d_out * precision.adapter
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
    """The step's memory by category and its peak (bytes), from what each op saves for
    backward and a walk of the backward pass."""
    precision = Precision.of(setup.precision)
    ctx = StorageContext(analysis, precision, setup.device, setup.attention, setup.experts_impl)
    graph, roles = analysis.model.graph, analysis.model.roles
    shapes = trainable_shapes(analysis)
    n_trainable = sum(numel(s) for s in shapes)
    adapter_params = sum(a.n_params for a in analysis.adapters)
    n_base = n_trainable - adapter_params
    adapter_shapes = [shape for adapter in analysis.adapters for shape in adapter.shapes]
    base_shapes = shapes[:len(shapes) - len(adapter_shapes)]
    weights = roles.params_total * precision.weight + adapter_params * precision.adapter
    gradients = n_base * precision.weight + adapter_params * precision.adapter
    optimizer = sum(state_bytes(setup.optimizer, s, precision.state) for s in base_shapes)
    optimizer += sum(state_bytes(setup.optimizer, s, precision.adapter_state) for s in adapter_shapes)
    optimizer += n_trainable * precision.master      # every trainable half tensor, adapters too
    persistent = weights + optimizer

    logits = graph.outputs[0]
    logits_bytes = ctx.nbytes(logits)
    trains = any(analysis.runs_backward)
    saved = collect_saved(analysis, ctx, plan, setup) if trains else {}
    if trains:   # cross-entropy keeps log_softmax(logits), fp32 under autocast
        saved["loss:log_softmax"] = SavedStorage(_loss_bytes(ctx, precision, setup.loss), len(graph.nodes))
        if setup.loss == "chunked-ce":
            saved.update(_chunked_head_copies(ctx, saved))
    layer_items, layer_keys = _checkpointed(analysis, saved) if setup.checkpointing else ({}, set())
    held_at_start = sum(item.n_bytes for key, item in saved.items() if key not in layer_keys)
    kept = _layer_inputs(analysis, ctx) if setup.checkpointing else {}   # each freed as its layer's backward ends
    held_at_start += sum(item.n_bytes for item in kept.values())
    activations = held_at_start

    if trains and setup.loss in ("hf", "chunked-ce") and saved["loss:log_softmax"].n_bytes > logits_bytes:
        # the logits.float() copy, until the loss: HF's of the whole logits, torchtune's of one chunk
        logits_bytes += loss_chunk_bytes(ctx, saved["loss:log_softmax"].n_bytes, setup.loss)
    forward_peak = persistent + activations + logits_bytes     # the logits live until the loss is taken
    if not trains:
        return MemoryBytes(weights, 0, optimizer, 0, forward_peak + _largest_activation(ctx), "forward")
    backward_peak = _simulate_backward(analysis, ctx, {**saved, **kept}, layer_items, layer_keys, persistent,
                                       held_at_start, setup.loss)
    # half weights stepped through fp32 masters: each half gradient is converted to an fp32 one
    # on its master before the inner optimizer steps (all at once, as the master optimizer does)
    master_grads = n_trainable * precision.master
    optimizer_peak = persistent + gradients + master_grads + step_temporaries(
        setup.optimizer, setup.optimizer_impl, shapes, precision.state)
    phases = {"forward": forward_peak, "backward": backward_peak, "optimizer": optimizer_peak}
    phase = max(phases, key=phases.get)
    return MemoryBytes(weights, gradients, optimizer, activations, phases[phase], phase,
                       _by_layer(analysis, saved))


def _loss_bytes(ctx: StorageContext, precision: Precision, loss: str = "ce") -> int:
    """Bytes of one logits-sized tensor of the loss: autocast runs cross-entropy in fp32 (it
    upcasts half logits), and so do HF's own loss and torchtune's chunked one (``.float()``
    first, of the logits or of each chunk), so log_softmax and its gradients are fp32 there;
    otherwise it runs in the logits' own dtype (half when the weights are half)."""
    logits = ctx.graph.outputs[0]
    elements = numel(ctx.shape(logits) or ())
    return elements * (4 if precision.autocast or loss in ("hf", "chunked-ce") else ctx.element_bytes(logits))


@dataclass(frozen=True)
class LossChunks:
    """How a loss splits the [batch, seq, vocab] logits: ``positions`` sequence positions in
    each chunk but the last (which holds ``last``), ``count`` chunks. One chunk covering the
    whole sequence for every loss but "chunked-ce"."""

    positions: int
    count: int
    last: int

    def part(self, full: int, seq: int, positions: int | None = None) -> int:
        """Bytes of ``positions`` (default: one full chunk's) of a ``full``-byte tensor over ``seq``."""
        return full // seq * (self.positions if positions is None else positions) if seq else full


def loss_chunks(ctx: StorageContext, loss: str) -> tuple[LossChunks, int]:
    """(the chunks, seq). "chunked-ce" is torchtune's CEWithChunkedOutputLoss: the head runs on
    ``hidden.chunk(CHUNKED_CE_CHUNKS, dim=1)`` (ceil(seq / chunks) positions each, so fewer
    chunks when seq is short) and each chunk's loss is taken on its own."""
    shape = ctx.shape(ctx.graph.outputs[0]) or ()
    seq = shape[-2] if len(shape) >= 2 and shape[-2] else 0
    if loss != "chunked-ce" or not seq:
        return LossChunks(seq, 1, seq), seq
    positions = -(-seq // CHUNKED_CE_CHUNKS)
    count = -(-seq // positions)
    return LossChunks(positions, count, seq - (count - 1) * positions), seq


def loss_chunk_bytes(ctx: StorageContext, full: int, loss: str) -> int:
    """Bytes of the part of a logits-sized loss tensor (``full`` bytes) that the loss makes at
    once: its ``.float()`` copy and the two gradients of its backward (nll_loss's, log_softmax's)
    exist one chunk at a time under "chunked-ce", for the whole tensor otherwise."""
    chunks, seq = loss_chunks(ctx, loss)
    return chunks.part(full, seq)


def _head(ctx: StorageContext) -> tuple[int, Node] | None:
    """(index, node) of the product that makes the logits (the LM head), if found."""
    head = ctx.producer(ctx.storage(ctx.graph.outputs[0]))
    return next(((i, n) for i, n in enumerate(ctx.graph.nodes) if n is head), None) if head is not None else None


def _chunked_head_copies(ctx: StorageContext, saved: dict) -> dict[str, SavedStorage]:
    """Under autocast a frozen head's weight is cast to half on every call (autocast caches the
    casts of weights that train only): with the head run once per chunk, each chunk's matmul
    keeps its own half copy for dX (ops/autocast.py keys the per-call copy by node)."""
    found = _head(ctx)
    if found is None:
        return {}
    chunks = loss_chunks(ctx, "chunked-ce")[0]
    per_call = {k: v for k, v in saved.items() if k.startswith("autocast@") and k.endswith(f"@{found[1].name}")}
    return {f"{k}#chunk{i}": v for k, v in per_call.items() for i in range(1, chunks.count)}


def _chunked_head_peak(ctx: StorageContext, analysis: StepAnalysis, live: int) -> int:
    """Bytes above the persistent ones while torchtune's chunked loss runs backward through a
    head that trains: the chunks run one after the other (loss, then head), the head's weight
    gradients summed in autograd's input buffer; at the second chunk the buffer, that chunk's
    gradient and their out-of-place sum (the first is a transposed view) are alive, in the dtype
    the head multiplies in (half under autocast), with the two chunks' log-softmax gone and
    their input gradients (dX) kept. 0 when the head is frozen or runs once."""
    found = _head(ctx)
    chunks, seq = loss_chunks(ctx, "chunked-ce")
    if found is None or chunks.count < 2 or not ctx.trains(found[1]):
        return 0
    index, head = found
    weight = next((x for x in head.inputs if x and ctx.is_weight(x)), None)
    if weight is None:
        return 0
    width = 2 if ctx.precision.autocast else ctx.element_bytes(weight)
    log_softmax = _loss_bytes(ctx, ctx.precision, "chunked-ce")
    last_two = chunks.part(log_softmax, seq, chunks.positions + chunks.last)
    data = next((x for x in head.inputs if x and not ctx.is_weight(x)), None)
    input_grads = chunks.part(ctx.nbytes(data), seq, chunks.positions + chunks.last) if data and ctx.needs(data) else 0
    return live - last_two + 3 * numel(ctx.shape(weight) or ()) * width + input_grads


def _by_layer(analysis: StepAnalysis, saved: dict) -> tuple[tuple[int | None, int], ...]:
    """Saved bytes attributed to the layer of the node whose backward last needs them."""
    node_layers = analysis.model.roles.node_layers
    totals: dict[int | None, int] = {}
    for item in saved.values():
        layer = node_layers[item.release] if item.release < len(node_layers) else None
        totals[layer] = totals.get(layer, 0) + item.n_bytes
    return tuple(sorted(totals.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))


def _simulate_backward(analysis, ctx, saved, layer_items, layer_keys, base, held_at_start, loss: str = "ce") -> int:
    graph = analysis.model.graph
    grads_at = _grads_at(analysis, ctx.precision)
    released: dict[int, int] = {}
    for key, item in saved.items():
        if key not in layer_keys:
            released[item.release] = released.get(item.release, 0) + item.n_bytes
    live = held_at_start
    routed = ctx.routed
    grad_logits = saved["loss:log_softmax"].n_bytes  # the loss's dtype: fp32 under autocast
    grad_logits = loss_chunk_bytes(ctx, grad_logits, loss)
    peak = base + live + 2 * grad_logits          # nll_loss and log_softmax gradients together
    head = _head(ctx) if loss == "chunked-ce" else None
    if head is not None:       # torchtune's chunks run loss then head, one chunk after the other
        peak = max(peak, base + _chunked_head_peak(ctx, analysis, live))
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
        transient = _transient(ctx, graph.nodes[index], share)
        if head is not None and index == head[0]:   # the logits' gradient is made and used per chunk
            transient -= ctx.nbytes(graph.outputs[0]) - loss_chunk_bytes(ctx, ctx.nbytes(graph.outputs[0]), loss)
        peak = max(peak, base + live + grads + transient)
        live -= released.get(index, 0)
    return peak


def _checkpointed(analysis: StepAnalysis, saved: dict) -> tuple[dict[int, list], set[str]]:
    """Saved storages a layer's backward reads: with checkpointing none is kept from the
    forward; they exist only while that layer's backward runs, after its forward is recomputed.
    Returns (layer -> items the recompute makes again, keys of all of them). A storage made
    before the layer (its input hidden states, the mask, the RoPE tables) is not made again:
    the recompute reads the very tensors the checkpoint holds (``_layer_inputs``), so it is a
    key but no item."""
    by_layer: dict[int, list] = {}
    keys: set[str] = set()
    node_layers = analysis.model.roles.node_layers
    made_in = {o: node_layers[i] for i, n in enumerate(analysis.model.graph.nodes) for o in n.outputs if o}
    for key, item in saved.items():
        layer = node_layers[item.release] if item.release < len(node_layers) else None
        if layer is not None:
            keys.add(key)
            if made_in.get(key, layer) == layer:      # Extra keys (stats, copies) are made by the layer
                by_layer.setdefault(layer, []).append(item)
    return by_layer, keys


def _layer_inputs(analysis: StepAnalysis, ctx: StorageContext) -> dict[str, SavedStorage]:
    """What checkpointed layers keep from the forward (bytes, and the node after whose backward
    each is freed). torch.utils.checkpoint (non-reentrant) saves each layer's arguments until
    that layer's backward ends (its first node that runs backward): the input hidden states,
    and the side inputs HF passes into every layer (the attention mask, the RoPE cos / sin
    tables), shared by all layers, so counted once and freed with layer 0's. HF's
    gradient_checkpointing_enable (and PEFT) also make the token embedding's output require a
    gradient (``enable_input_require_grads``): with a frozen table that output is a leaf, which
    its gradient accumulator holds until the end of backward (counted when no layer reads it
    directly, e.g. GPT-2's token + position sum)."""
    arch, layers = analysis.model.roles.architecture, analysis.model.roles.node_layers
    tokens = analysis.bindings["batch"] * analysis.bindings["seq"]
    ends = {}                                   # layer -> its first node that runs backward
    for index in range(len(layers) - 1, -1, -1):
        if layers[index] is not None and analysis.runs_backward[index]:
            ends[layers[index]] = index
    hidden_bytes = tokens * (arch.hidden or 0) * ctx.precision.activation
    kept = {f"checkpoint_input@layer{layer}": SavedStorage(hidden_bytes, ends.get(layer, 0))
            for layer in range(arch.layers)}
    kept["checkpoint_side_inputs"] = SavedStorage(_side_inputs(analysis, ctx), min(ends.values(), default=0))
    leaf = _embedding_leaf(analysis, ctx)
    if leaf:
        kept["checkpoint_embedding_leaf"] = SavedStorage(leaf, 0)
    return kept


def _embedding_leaf(analysis: StepAnalysis, ctx: StorageContext) -> int:
    """Bytes of the frozen token embedding's output made a leaf that requires grad, when it is
    not itself a layer's input (0 when the table trains: the output is then no leaf). The
    hook sits on the embedding module, which applies its own constant scale (Gemma's scaled
    embedding): the leaf is the lookup after such constant-operand ops, not before."""
    graph, layers = analysis.model.graph, analysis.model.roles.node_layers
    token = next((u for u in analysis.model.roles.params if u.kind == "token" and u.n_params), None)
    if token is None or token.key in analysis.trainable:
        return 0
    site = next(i for i, n in enumerate(graph.nodes) if n.name == token.site)
    out = graph.nodes[site].outputs[0]
    while len(readers := ctx.consumers.get(out, ())) == 1 and graph.nodes[readers[0]].op in ("Mul", "Cast", "Div") \
            and layers[readers[0]] is None and all(x in analysis.weights or x in graph.constants
                                                   for x in graph.nodes[readers[0]].inputs if x and x != out):
        out = graph.nodes[readers[0]].outputs[0]
    root = ctx.storage(out)
    read_in_layer = any(layers[i] is not None and any(x and ctx.storage(x) == root for x in n.inputs)
                        for i, n in enumerate(graph.nodes))
    return 0 if read_in_layer else ctx.nbytes(root)


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
