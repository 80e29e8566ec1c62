"""FLOPs of one training step from the gradient analysis (2 x MACs, matrix products only).

Every node is priced by its op's rule (ops/registry.py): forward FLOPs from shapes, experts
at the share of tokens routed to them (k / E); backward, for a node that receives a gradient,
split into dX (backward_input: the data inputs that need a gradient) and dW (backward_weight:
its weight trains) -- one forward's worth per gradient for a product. LoRA adds its two thin
matmuls per adapted site; LoRA on 3-D expert tensors re-parametrizes them (PEFT
``target_parameters``). Recompute: with activation checkpointing, the forward of every layer
that runs backward, once more. No op name or family is dispatched here.
"""
from __future__ import annotations

from dataclasses import dataclass

from costlens.gradients import StepAnalysis
from costlens.ops import costs
from costlens.ops.registry import Needed, lookup
from costlens.shapes import eval_shape, numel


@dataclass(frozen=True)
class FlopCounts:
    """FLOPs of one training step (2 x multiply-accumulates, matrix products only, as
    torch.utils.flop_counter counts them): forward, backward split into gradients w.r.t.
    activations (``backward_input``) and w.r.t. weights and adapters (``backward_weight``),
    checkpointing's replayed forward (``recompute``)."""

    forward: int
    backward_input: int
    backward_weight: int
    recompute: int = 0
    unpriced: tuple[str, ...] = ()      # ops whose FLOPs could not be priced (shapes unknown)

    @property
    def backward(self) -> int:
        return self.backward_input + self.backward_weight

    @property
    def step(self) -> int:
        return self.forward + self.backward + self.recompute


class _FlopContext:
    """The FlopContext the op rules read: concrete shapes at the plan's batch and seq."""

    def __init__(self, analysis: StepAnalysis):
        self.graph, self.bindings, self.weights = analysis.model.graph, analysis.bindings, analysis.weights

    def shape(self, tensor: str) -> tuple[int, ...] | None:
        return eval_shape(self.graph.shape(tensor), self.bindings) if tensor else None

    def is_weight(self, tensor: str) -> bool:
        return tensor in self.weights


def _rule(node):
    """The rule of a node that has FLOPs (an op without a rule is priced 0, never reaches here)."""
    found = lookup(node.op)
    assert found is not None, node.op
    return found


def node_forward_flops(analysis: StepAnalysis, index: int, share: dict[int, float], ctx=None) -> int | None:
    """Forward FLOPs of one node, from its op's rule, at its routed share of tokens (k / E for
    an expert matmul); 0 for an op without a rule (reported unknown by the loader); None when
    it multiplies matrices but its shapes are unknown."""
    node = analysis.model.graph.nodes[index]
    found = lookup(node.op)
    if found is None:
        return 0
    flops = found.forward_flops(node, ctx or _FlopContext(analysis))
    return None if flops is None else round(flops * share.get(index, 1.0))


def _needed(analysis: StepAnalysis, index: int, weight: bool | None = None) -> Needed:
    """The gradients node ``index``'s backward must produce: dX per data input that needs one,
    dW when its weight trains (``weight`` overrides: a LoRA'd 3-D expert tensor needs its
    merged weight's gradient)."""
    node = analysis.model.graph.nodes[index]
    inputs = frozenset(i for i, x in enumerate(node.inputs)
                       if x and x not in analysis.weights and analysis.needs(x))
    return Needed(inputs, index in analysis.trainable_sites if weight is None else weight)


def gathered_weights(analysis: StepAnalysis) -> frozenset[str]:
    """Outputs of the routed Gathers that pick expert matrices per token (batched experts,
    ``ParamUse.via``): an operand of the product that is a weight in all but form, so its
    gradient is the expert weight's gradient, not an activation's."""
    via = {u.via for u in analysis.model.roles.params if u.via}
    return frozenset(out for node in analysis.model.graph.nodes if node.name in via for out in node.outputs)


def _backward_split(analysis: StepAnalysis, ctx, index: int, needed: Needed, flops: int,
                    gathered: frozenset[str]) -> tuple[int, int]:
    """(input-gradient, weight-gradient) FLOPs of a node's backward; the gradient of a gathered
    expert operand is a weight gradient (its share of the product)."""
    node = analysis.model.graph.nodes[index]
    rule = _rule(node)
    full = rule.backward_flops(node, ctx, needed, flops)
    weights_in = frozenset(i for i in needed.inputs if node.inputs[i] in gathered)
    if not weights_in:
        return full.input, full.weight
    data_only = rule.backward_flops(node, ctx, Needed(needed.inputs - weights_in, needed.weight), flops)
    return data_only.input, full.weight + (full.input - data_only.input)


def adapter_tokens(analysis: StepAnalysis, index: int, share: dict[int, float]) -> int:
    """Rows (tokens) a LoRA'd linear at node ``index`` multiplies: its output's leading elements,
    at the routed share of tokens for an expert's linear."""
    out_shape = eval_shape(analysis.model.graph.shape(analysis.model.graph.nodes[index].outputs[0]), analysis.bindings)
    return round(numel(out_shape) // out_shape[-1] * share.get(index, 1.0)) if out_shape else 0


def recomputed_nodes(analysis: StepAnalysis) -> dict[int, bool]:
    """Nodes whose forward HF's non-reentrant checkpointing runs again in backward, each with
    whether its LoRA B product runs too. The recompute replays each layer's forward in order
    and stops (torch.utils.checkpoint's early stop) inside the pack hook of the last tensor the
    layer's forward saved: ops pack their inputs before their kernel runs, so the last node
    that saves anything does not run again, nor does anything after it (a layer's down
    projection and residual add). A LoRA'd linear saves last in its B product (x·A), after its
    base product and A ran: where it is the last saver, those two run and B does not."""
    from costlens.ops.saved import saved_by
    from costlens.storages import Precision, StorageContext
    ctx = StorageContext(analysis, Precision.of("fp32"))
    graph, layers = analysis.model.graph, analysis.model.roles.node_layers
    last: dict[int, int] = {}                  # layer -> its last node that saves a tensor
    for index, node in enumerate(graph.nodes):
        layer = layers[index]
        if layer is None or not analysis.runs_backward[index]:
            continue
        if index in analysis.adapter_at or any(x for x in saved_by(node, ctx)):
            last[layer] = index
    found = {i: True for i, layer in enumerate(layers) if layer is not None and i < last.get(layer, -1)}
    found.update({i: False for i in last.values() if i in analysis.adapter_at})
    return found


def kernel_score_recompute(analysis: StepAnalysis) -> int:
    """FLOPs a fused attention kernel's backward adds: it keeps no probabilities, so it computes
    Q·Kᵀ once more before dP, dS, dQ, dK, dV (torch.utils.flop_counter's sdpa backward: 5
    products of a forward's 2)."""
    from costlens.storages import kernel_blocks
    total = 0
    for block in kernel_blocks(analysis.model):
        if analysis.runs_backward[block.score_node]:
            total += node_forward_flops(analysis, block.score_node, analysis.expert_share) or 0
    return total


def count_flops(analysis: StepAnalysis, checkpointing: bool = False, attention: str = "eager") -> FlopCounts:
    """FLOPs of one step (2 x MACs): forward, backward split into input and weight gradients,
    and the recompute of checkpointed layers; ops whose shapes are unknown listed as unpriced."""
    graph = analysis.model.graph
    ctx = _FlopContext(analysis)
    share = analysis.expert_share
    adapter_at = analysis.adapter_at
    tensor_adapters_at = analysis.tensor_adapters_at
    gathered = gathered_weights(analysis)
    forward = backward_input = backward_weight = recompute = 0
    unpriced: list[str] = []
    recomputed = recomputed_nodes(analysis) if checkpointing else set()
    for index, node in enumerate(graph.nodes):
        flops = node_forward_flops(analysis, index, share, ctx)
        if flops is None:
            unpriced.append(node.op)
            continue
        adapter = adapter_at.get(index)
        lora = 0
        tensor_adapters = tensor_adapters_at.get(index, ())
        if tensor_adapters:
            adapted_forward, adapted_weight_grads = _expert_tensor_adapters(analysis, ctx, index, tensor_adapters,
                                                                            flops)
            forward += adapted_forward
            backward_weight += adapted_weight_grads
            if analysis.runs_backward[index] and flops:     # the merged weights' gradients are counted above
                backward_input += _backward_split(analysis, ctx, index, _needed(analysis, index, True), flops,
                                                  gathered)[0]
            continue
        dora_forward = dora_input_grads = 0
        if adapter is not None:
            tokens = adapter_tokens(analysis, index, share)
            lora = costs.lora_flops(tokens, adapter.rank, adapter.d_in, adapter.d_out)
            if adapter.dora:
                dora_forward, dora_input_grads = _dora_flops(adapter, tokens)
        forward += flops + lora + dora_forward
        if not analysis.runs_backward[index]:
            continue
        if index in recomputed:     # where the recompute stops inside a LoRA'd linear: base and A
            # DoRA keeps its own outputs (B's among them): the replay runs the whole adapter
            recompute += flops + (lora + dora_forward if adapter is None or recomputed[index] or adapter.dora
                                  else costs.matmul_flops(tokens, adapter.d_in, adapter.rank))
        if flops:
            grads_input, grads_weight = _backward_split(analysis, ctx, index, _needed(analysis, index), flops, gathered)
            backward_input, backward_weight = backward_input + grads_input, backward_weight + grads_weight
        if adapter is not None:
            backward_weight += lora                                               # dA and dB
            if adapter.dora_weight_grad:
                backward_weight += costs.matmul_flops(tokens, adapter.d_in, adapter.d_out)
            backward_input += costs.matmul_flops(tokens, adapter.d_out, adapter.rank)  # d(xA)
            if analysis.needs(node.inputs[0]):
                backward_input += costs.matmul_flops(tokens, adapter.rank, adapter.d_in)  # dX through A
                backward_input += dora_input_grads
    from costlens.storages import fused_kernel
    if fused_kernel(attention):
        backward_input += kernel_score_recompute(analysis)
    return FlopCounts(forward, backward_input, backward_weight, recompute, tuple(unpriced))


def _dora_flops(adapter, tokens: int) -> tuple[int, int]:
    """(forward, input-gradient) FLOPs DoRA adds to a LoRA'd linear, as PEFT runs it: B·A made
    through an identity matrix every forward (detached: no backward); with LoRA dropout, the
    base product runs again on the dropped input, and its dX flows back through the frozen W."""
    forward = costs.dora_weight_flops(adapter.rank, adapter.d_in, adapter.d_out)
    if adapter.dropout <= 0:
        return forward, 0
    again = costs.matmul_flops(tokens, adapter.d_in, adapter.d_out)
    return forward + again, again


def _expert_tensor_adapters(analysis: StepAnalysis, ctx, index: int, adapters, flops: int) -> tuple[int, int]:
    """(forward, backward weight) FLOPs of a node whose 3-D expert weights carry LoRA as PEFT's
    ``target_parameters`` runs it: each weight is re-parametrized as W + B·A (one baddbmm over
    the experts), evaluated once when PEFT registers the parametrization (torch checks its
    output) and once for use; backward yields dA, dB (two baddbmm-sized products) and each
    merged weight's gradient (its share of the node's products)."""
    merges = [costs.merged_expert_delta_flops(a.n_experts, a.rank, a.d_in, a.d_out) for a in adapters]
    forward = flops + 2 * sum(merges)
    if not analysis.runs_backward[index]:
        return forward, 0
    return forward, 2 * sum(merges) + sum(_weight_share(analysis, ctx, index, a, flops) for a in adapters)


def _weight_share(analysis: StepAnalysis, ctx, index: int, adapter, flops: int) -> int:
    """The node's FLOPs that multiply by this adapter's weight, as its op's rule splits them
    (all of them for a matmul; a fused MoE op's part of its expert products)."""
    node = analysis.model.graph.nodes[index]
    mine = next((u.constant for u in analysis.model.roles.params if u.key == adapter.key), None)
    if mine not in analysis.model.graph.constants:
        return flops
    return _rule(node).flops_with(node, ctx, mine, flops)
