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
    forward = backward_input = backward_weight = recompute = 0
    unpriced: list[str] = []
    for index, node in enumerate(graph.nodes):
        flops = node_forward_flops(analysis, index, share)
        if flops is None:
            unpriced.append(node.op)
            continue
        adapter = adapter_at.get(index)
        lora = 0
        if adapter is not None and adapter.n_experts:
            adapted_forward, adapted_weight_grads = _expert_tensor_adapter(analysis, index, adapter, flops)
            forward += adapted_forward
            backward_weight += adapted_weight_grads
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
        for operand in _operands(node) if flops else ():
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


def _operands(node) -> tuple[str, ...]:
    """The inputs whose gradients each cost one forward's worth of FLOPs."""
    family = lookup(node.op).family if lookup(node.op) else None
    if family is Family.FUSED_ATTENTION:
        # q, k, v (packed or separate): dQ, dK, dV together cost two forwards (4 products)
        data = [x for x in node.inputs[:3] if x]
        return (data[0], data[0]) if data else ()
    if family is Family.FUSED_MOE:
        return (node.inputs[0], next((w for w in node.inputs[2:] if w), ""))
    return node.inputs[:2]


def _expert_tensor_adapter(analysis: StepAnalysis, index: int, adapter, flops: int) -> tuple[int, int]:
    """(forward, backward weight) FLOPs of a matmul whose 3-D expert weight carries LoRA as PEFT's
    ``target_parameters`` runs it: the weight is re-parametrized as W + B·A (one baddbmm over
    the experts), evaluated once when PEFT registers the parametrization (torch checks its
    output) and once for use; backward yields dA, dB (two baddbmm-sized products) and the
    merged weight's gradient (one matmul-sized product)."""
    merge = costs.merged_expert_delta_flops(adapter.n_experts, adapter.rank, adapter.d_in, adapter.d_out)
    forward = flops + 2 * merge
    if not analysis.runs_backward[index]:
        return forward, 0
    return forward, 2 * merge + flops


def _input_grads(analysis: StepAnalysis, index: int, flops: int) -> int:
    if not analysis.runs_backward[index]:
        return 0
    node = analysis.model.graph.nodes[index]
    return sum(flops for x in node.inputs[:2] if x not in analysis.weights and analysis.needs(x))
