"""FLOPs of one training step from the gradient analysis (2 x MACs, matrix products only).

Forward: every matmul, experts at the share of tokens routed to them (k / E), LoRA's two
thin matmuls per adapted site. Backward: per matmul that receives a gradient, one forward's
worth for each gradient it must produce — dX when its activation operand needs a gradient
(backward_input), dW when its weight trains (backward_weight). Recompute: with activation
checkpointing, the forward of every layer that runs backward, once more.
"""
from __future__ import annotations

from dataclasses import dataclass

from costlens.gradients import StepAnalysis
from costlens.ops import costs
from costlens.ops.registry import Family, lookup
from costlens.shapes import eval_shape, numel


@dataclass(frozen=True)
class FlopCounts:
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


def node_forward_flops(analysis: StepAnalysis, index: int, share: dict[int, float]) -> int | None:
    """Forward FLOPs of one node; None when it multiplies matrices but its shapes are unknown."""
    graph = analysis.model.graph
    node = graph.nodes[index]
    family = lookup(node.op).family if lookup(node.op) else None
    if family is Family.FUSED_ATTENTION:
        return _fused_attention_flops(analysis, index)
    if family is Family.FUSED_MOE:
        return _fused_moe_flops(analysis, index)
    if node.op not in ("MatMul", "Gemm"):
        return 0
    a_shape = eval_shape(graph.shape(node.inputs[0]), analysis.bindings)
    out_shape = eval_shape(graph.shape(node.outputs[0]), analysis.bindings)
    flops = costs.node_matmul_flops(node, a_shape, out_shape)
    return None if flops is None else round(flops * share.get(index, 1.0))


def _fused_attention_flops(analysis: StepAnalysis, index: int) -> int | None:
    block = next((b for b in analysis.model.roles.attentions if b.score_node == index), None)
    if block is None:
        return 0      # e.g. a standalone rotary-embedding op: no matrix product
    if not block.heads or not block.head_dim:
        return None
    batch, seq = analysis.bindings["batch"], analysis.bindings["seq"]
    return costs.attention_core_flops(batch, block.heads, seq, seq, block.head_dim)


def _fused_moe_flops(analysis: StepAnalysis, index: int) -> int | None:
    """com.microsoft.MoE: every token runs k experts through fc1 (and fc3) and fc2."""
    graph = analysis.model.graph
    node = graph.nodes[index]
    x_shape = eval_shape(graph.shape(node.inputs[0]), analysis.bindings)
    weights = [graph.constants[w] for w in node.inputs[2:] if w in graph.constants and len(graph.constants[w].shape) == 3]
    top_k = node.attr("k")
    if not x_shape or not weights or not top_k:
        return None
    tokens = numel(x_shape) // x_shape[-1]
    per_expert = sum(w.n_elements // w.shape[0] for w in weights)
    return costs.routed_expert_flops(tokens, top_k, per_expert)


def adapter_tokens(analysis: StepAnalysis, index: int, share: dict[int, float]) -> int:
    out_shape = eval_shape(analysis.model.graph.shape(analysis.model.graph.nodes[index].outputs[0]), analysis.bindings)
    return round(numel(out_shape) // out_shape[-1] * share.get(index, 1.0)) if out_shape else 0


def count_flops(analysis: StepAnalysis, checkpointing: bool = False) -> FlopCounts:
    graph = analysis.model.graph
    share = analysis.expert_share
    adapter_at = analysis.adapter_at
    tensor_adapters_at = analysis.tensor_adapters_at
    forward = backward_input = backward_weight = recompute = 0
    unpriced: list[str] = []
    for index, node in enumerate(graph.nodes):
        flops = node_forward_flops(analysis, index, share)
        if flops is None:
            unpriced.append(node.op)
            continue
        adapter = adapter_at.get(index)
        lora = 0
        tensor_adapters = tensor_adapters_at.get(index, ())
        if tensor_adapters:
            adapted_forward, adapted_weight_grads = _expert_tensor_adapters(analysis, index, tensor_adapters, flops)
            forward += adapted_forward
            backward_weight += adapted_weight_grads
            if _family(node) is Family.FUSED_MOE and analysis.runs_backward[index]:
                backward_input += _fused_moe_backward(analysis, index, weights_need_grad=True)[0]
            else:
                backward_input += _input_grads(analysis, index, flops)
            continue
        if adapter is not None:
            tokens = adapter_tokens(analysis, index, share)
            lora = costs.lora_flops(tokens, adapter.rank, adapter.d_in, adapter.d_out)
        forward += flops + lora
        if not analysis.runs_backward[index]:
            continue
        if checkpointing and analysis.model.roles.node_layers[index] is not None:
            recompute += flops + lora
        family = _family(node)
        if family is Family.FUSED_ATTENTION and flops:
            backward_input += _fused_attention_backward(analysis, node, flops)
        elif family is Family.FUSED_MOE and flops:
            moe_input, moe_weight = _fused_moe_backward(analysis, index)
            backward_input, backward_weight = backward_input + moe_input, backward_weight + moe_weight
        for operand in _operands(node) if flops and family is None else ():
            if operand in analysis.weights:
                backward_weight += flops if index in analysis.trainable_sites else 0
            elif analysis.needs(operand):
                backward_input += flops
        if adapter is not None:
            backward_weight += lora                                               # dA and dB
            backward_input += costs.matmul_flops(tokens, adapter.d_out, adapter.rank)  # d(xA)
            if analysis.needs(node.inputs[0]):
                backward_input += costs.matmul_flops(tokens, adapter.rank, adapter.d_in)  # dX through A
    return FlopCounts(forward, backward_input, backward_weight, recompute, tuple(unpriced))


def _family(node) -> Family | None:
    entry = lookup(node.op)
    family = entry.family if entry else None
    return family if family in (Family.FUSED_ATTENTION, Family.FUSED_MOE) else None


def _operands(node) -> tuple[str, ...]:
    """The inputs of a matmul whose gradients each cost one forward's worth of FLOPs."""
    return node.inputs[:2]


def _fused_attention_backward(analysis: StepAnalysis, node, flops: int) -> int:
    """Eager attention is two products of equal size, q·kᵀ and probs·v: dQ and dK each repeat
    the first when q or k needs a gradient; dProbs repeats the second when q or k does, dV when
    v does (q, k, v packed in one input or separate)."""
    query = node.inputs[0]
    key = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] else query
    value = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else query
    nq, nk, nv = (analysis.needs(x) and x not in analysis.weights for x in (query, key, value))
    product = flops // 2
    return product * (int(nq) + int(nk) + int(nq or nk) + int(nv))


def _fused_moe_backward(analysis: StepAnalysis, index: int, weights_need_grad: bool | None = None) -> tuple[int, int]:
    """(backward input, backward weight) FLOPs of com.microsoft.MoE run as routed experts:
    per (token, expert) pair, dX through fc1 (and fc3) when the input needs a gradient, the
    activation's gradient through fc2 whenever the experts' output needs one (the input does,
    or the expert weights train), and dW for every expert matrix when they train."""
    graph = analysis.model.graph
    node = graph.nodes[index]
    x_shape = eval_shape(graph.shape(node.inputs[0]), analysis.bindings)
    top_k = node.attr("k")
    weights = {slot: graph.constants[node.inputs[slot]] for slot in (2, 4, 6)
               if len(node.inputs) > slot and node.inputs[slot] in graph.constants
               and len(graph.constants[node.inputs[slot]].shape) == 3}
    if not x_shape or not top_k:
        return 0, 0
    pairs = numel(x_shape) // x_shape[-1] * int(top_k)
    per_pair = {slot: 2 * w.n_elements // w.shape[0] for slot, w in weights.items()}
    needs_x = analysis.needs(node.inputs[0])
    trains = index in analysis.trainable_sites if weights_need_grad is None else weights_need_grad
    backward_input = pairs * (per_pair.get(2, 0) + per_pair.get(6, 0)) if needs_x else 0
    backward_input += pairs * per_pair.get(4, 0) if needs_x or trains else 0
    backward_weight = pairs * sum(per_pair.values()) if trains else 0
    return backward_input, backward_weight


def _expert_tensor_adapters(analysis: StepAnalysis, index: int, adapters, flops: int) -> tuple[int, int]:
    """(forward, backward weight) FLOPs of a node whose 3-D expert weights carry LoRA as PEFT's
    ``target_parameters`` runs it: each weight is re-parametrized as W + B·A (one baddbmm over
    the experts), evaluated once when PEFT registers the parametrization (torch checks its
    output) and once for use; backward yields dA, dB (two baddbmm-sized products) and each
    merged weight's gradient (its share of the node's products)."""
    merges = [costs.merged_expert_delta_flops(a.n_experts, a.rank, a.d_in, a.d_out) for a in adapters]
    forward = flops + 2 * sum(merges)
    if not analysis.runs_backward[index]:
        return forward, 0
    return forward, 2 * sum(merges) + sum(_weight_share(analysis, index, a, flops) for a in adapters)


def _weight_share(analysis: StepAnalysis, index: int, adapter, flops: int) -> int:
    """The node's FLOPs that multiply by this adapter's weight (all of them for a matmul; for a
    fused MoE op, the weight's part of its expert products)."""
    graph = analysis.model.graph
    node = graph.nodes[index]
    weights = [graph.constants[w] for w in node.inputs[2:] if w in graph.constants
               and len(graph.constants[w].shape) == 3] if _family(node) is Family.FUSED_MOE else []
    if not weights:
        return flops
    mine = next((u.constant for u in analysis.model.roles.params if u.key == adapter.key), None)
    total = sum(w.n_elements for w in weights)
    return round(flops * graph.constants[mine].n_elements / total) if mine in graph.constants else flops


def _input_grads(analysis: StepAnalysis, index: int, flops: int) -> int:
    if not analysis.runs_backward[index]:
        return 0
    node = analysis.model.graph.nodes[index]
    return sum(flops for x in node.inputs[:2] if x not in analysis.weights and analysis.needs(x))
