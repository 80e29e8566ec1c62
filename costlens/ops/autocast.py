"""torch.autocast as the memory model sees it: which dtype each op runs in, and the half copies
of fp32 operands that the half-precision ops make and keep for backward.

torch.autocast (the HF Trainer's bf16=True / fp16=True) leaves the weights fp32 and picks a
dtype per op: its lower-precision list (matmuls, linear, conv, SDPA) casts every float operand
to half first; on CUDA an fp32 list (softmax, norms, pow, exp, ...) runs in fp32; every other
op follows type promotion over its inputs. The CPU fp32 list holds only losses.
"""
from __future__ import annotations

from costlens.ir import Node
from costlens.ops.registry import Extra
from costlens.shapes import numel

# Ops autocast runs in fp32 under mixed precision (torch.amp's CUDA fp32 list).
AUTOCAST_FP32 = frozenset({"Softmax", "LogSoftmax", "LayerNormalization", "Pow", "ReduceMean", "Sqrt",
                           "Reciprocal", "Exp", "Log", "RMSNormalization"})
# Ops torch.autocast runs in the half dtype (its lower-precision list: mm, bmm, matmul, linear,
# addmm, baddbmm, conv, scaled_dot_product_attention): their float inputs are cast to half first.
AUTOCAST_HALF = frozenset({"MatMul", "Gemm", "com.microsoft.FusedMatMul", "Einsum", "Conv", "Attention"})
INT_BYTES = {"int64": 8, "int32": 4, "bool": 1, "int8": 1, "uint8": 1}


def autocast_dtypes(graph, weights, device: str, unlisted: frozenset = frozenset()) -> dict[str, int]:
    """Bytes per element of each float tensor under torch.autocast on fp32 weights: the half
    list (matmuls) makes half outputs, the fp32 list (CUDA: softmax, norms, pow, exp, ...; the
    CPU list holds only losses) fp32 ones, and every other op follows torch's type promotion
    over its float inputs (a half matmul output added to the fp32 residual stream is fp32;
    0-d and 1-element constants do not promote). ``unlisted``: names of product nodes that run
    outside autocast's lists in their weights' dtype (``torch._grouped_mm``: transformers casts
    the routed tokens to the expert weights' dtype, fp32 under autocast)."""
    found: dict[str, int] = {}
    fp32_ops = AUTOCAST_FP32 if device == "cuda" else frozenset()
    for node in graph.nodes:
        if node.name in unlisted:
            width = 4
        elif node.op in AUTOCAST_HALF:
            width = 2
        elif node.op in fp32_ops:
            width = 4
        elif node.op == "Add" and _is_bias_of_half_product(graph, node, weights, found):
            width = 2          # a linear's bias: torch adds it inside the one half addmm / linear
        else:
            widths = [found.get(x, 4) for x in node.inputs if x and _promotes(graph, x)]
            width = max(widths, default=4)
        for out in node.outputs:
            if out:
                found[out] = width
    return found


def _is_bias_of_half_product(graph, node: Node, weights, found: dict[str, int]) -> bool:
    """A weight added to a half tensor: the bias the front end split off a linear / addmm."""
    return any(x in weights for x in node.inputs) and any(
        found.get(x) == 2 and x not in weights for x in node.inputs)


def _promotes(graph, tensor: str) -> bool:
    """A float tensor with more than one element: it takes part in type promotion."""
    if (graph.dtype(tensor) or "float32") in INT_BYTES:
        return False
    shape = graph.shape(tensor)
    return shape is None or any(not isinstance(d, int) or d > 1 for d in shape)


def autocast_casts(node: Node, items: list, ctx) -> list:
    """What a half-list op keeps under autocast: the half copies of its fp32 operands (a fresh
    cast per call; a trainable weight's copy is cached for the whole forward, so one per
    weight), in place of the fp32 tensors. A weight's copy is kept exactly when the other
    operand needs a gradient (dX = dY·Wᵀ), though the fp32 weight itself is resident."""
    if not ctx.precision.autocast or node.op not in AUTOCAST_HALF or node.name in ctx.autocast_unlisted:
        return items
    kept = []
    for item in items:
        if isinstance(item, Extra) or not item or ctx.autocast_bytes.get(ctx.storage(item), 4) == 2 \
                or ctx.graph.dtype(item) in INT_BYTES:
            kept.append(item)
        else:
            kept.append(Extra(f"autocast@{item}@{node.name}", numel(ctx.shape(item) or ()) * 2))
    data = [x for x in node.inputs[:2] if x and not ctx.is_weight(x)]
    for weight in (x for x in node.inputs[:2] if x and ctx.is_weight(x)):
        if any(ctx.needs(x) for x in data):
            key = f"autocast@{weight}" if ctx.trains(node) else f"autocast@{weight}@{node.name}"
            kept.append(Extra(key, numel(ctx.shape(weight) or ()) * 2))
    return kept


def autocast_grad_copies(node: Node, ctx) -> int:
    """Bytes of the half gradients a half-list op's backward makes for its cast fp32 operands
    before the casts' backward turns them into fp32 ones (dX, and dW of a trainable weight):
    both are alive while the op's backward runs."""
    if not ctx.precision.autocast or node.op not in AUTOCAST_HALF or node.name in ctx.autocast_unlisted:
        return 0
    total = 0
    for operand in (x for x in node.inputs[:2] if x):
        weight = ctx.is_weight(operand)
        if (ctx.trains(node) if weight else ctx.needs(operand)) and \
                (weight or ctx.autocast_bytes.get(ctx.storage(operand), 4) == 4):
            total += numel(ctx.shape(operand) or ()) * 2
    return total
