"""Rules of the matrix products: MatMul, Gemm, com.microsoft.FusedMatMul, Einsum, Conv.

Forward: 2 x MACs from the operands' and the output's shapes (ops/costs.py). Backward: one
forward's worth per gradient the product must produce (DESIGN.md §2.1): dX for each data
operand that needs a gradient, dW when the operand is a weight and it trains. Saved: a
product keeps X when dW is needed and W when dX is needed (W is resident: not counted);
a convolution keeps both whenever it runs backward (derivatives.yaml: one
``convolution_backward`` formula reads input and weight for every gradient).
"""
from __future__ import annotations

from costlens.errors import CostlensError
from costlens.ir import Node
from costlens.ops import costs
from costlens.ops.registry import Backward, Family, FlopContext, Needed, SavedContext, rule
from costlens.shapes import numel


def grad_needed(node: Node, operand: str, ctx: SavedContext) -> bool:
    """The gradient of one operand is computed: it trains (a weight) or needs one (data)."""
    return ctx.trains(node) if ctx.is_weight(operand) else ctx.needs(operand)


def is_data(operand: str, ctx: SavedContext) -> bool:
    """A present operand that is not a weight: saving it costs activation memory (a weight is resident)."""
    return bool(operand) and not ctx.is_weight(operand)


def matmul_saved(node: Node, ctx: SavedContext) -> list:
    """Names of the data operands autograd keeps for a product's backward: each operand the other's
    gradient reads (A for dB, B for dA); weights are never listed (resident, counted as weights)."""
    a, b = node.inputs[0], node.inputs[1]
    kept = []
    if grad_needed(node, b, ctx) and is_data(a, ctx):
        kept.append(a)            # dB = Aᵀ·dY
    if grad_needed(node, a, ctx) and is_data(b, ctx):
        kept.append(b)            # dA = dY·Bᵀ
    return kept


def per_operand(node: Node, ctx: FlopContext, needed: Needed, forward_flops: int) -> Backward:
    """One forward's worth per gradient of the two operands: dW for a weight that trains, dX
    for a data operand that needs one (a product of two weights trains both)."""
    dx = dw = 0
    for slot, operand in enumerate(node.inputs[:2]):
        if ctx.is_weight(operand):
            dw += forward_flops if needed.weight else 0
        elif slot in needed.inputs:
            dx += forward_flops
    return Backward(dx, dw)


@rule("MatMul", "Gemm", family=Family.MATMUL, saved=matmul_saved, backward=per_operand)
def _matmul_flops(node: Node, ctx: FlopContext) -> int | None:
    # [..., M, K] @ [K, N] -> [..., M, N]; Gemm's A may come transposed ([K, M])
    return costs.node_matmul_flops(node, ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0]))


def _fused_operand(shape: tuple[int, ...], trans: int, trans_batch: int, right: bool = False
                   ) -> tuple[tuple[int, ...], int, int]:
    """(batch dims, rows, cols) of a FusedMatMul operand as onnxruntime runs it: transBatch
    moves dim 0 next to the last (perm [1, ..., r-2, 0, r-1]: [M, B, H, K] runs as
    [B, H, M, K]); trans then swaps the two matrix dims."""
    if len(shape) == 1:              # numpy: a vector is a row on the left, a column on the right
        shape = (shape[0], 1) if right else (1, shape[0])
    if trans_batch and len(shape) > 2:
        shape = tuple(shape[1:-1]) + (shape[0], shape[-1])
    rows, cols = (shape[-1], shape[-2]) if trans else (shape[-2], shape[-1])
    return tuple(shape[:-2]), rows, cols


@rule("com.microsoft.FusedMatMul", family=Family.MATMUL, saved=matmul_saved, backward=per_operand)
def _fused_matmul_flops(node: Node, ctx: FlopContext) -> int | None:
    """alpha * op(A) @ op(B): [batch, M, K] @ [batch, K, N] -> 2 * batch * M * K * N, batch
    dims broadcast as numpy does. The alpha scaling is elementwise (not counted)."""
    a_shape, b_shape = ctx.shape(node.inputs[0]), ctx.shape(node.inputs[1])
    if not a_shape or not b_shape:
        return None
    a_batch, rows, inner = _fused_operand(a_shape, node.attr("transA", 0), node.attr("transBatchA", 0))
    b_batch, _, cols = _fused_operand(b_shape, node.attr("transB", 0), node.attr("transBatchB", 0), right=True)
    width = max(len(a_batch), len(b_batch))
    a_batch, b_batch = (1,) * (width - len(a_batch)) + a_batch, (1,) * (width - len(b_batch)) + b_batch
    batch = numel(tuple(max(x, y) for x, y in zip(a_batch, b_batch)))
    return batch * costs.matmul_flops(rows, inner, cols)


def _equation(node: Node) -> str:
    equation = node.attr("equation", "")
    return equation.decode() if isinstance(equation, bytes) else str(equation)


def einsum_saved(node: Node, ctx: SavedContext) -> list:
    """Two operands: as a matmul (torch lowers einsum to bmm, which keeps the other operand);
    one operand (a transpose, diagonal or sum) keeps nothing: its backward needs shapes only."""
    return matmul_saved(node, ctx) if len([x for x in node.inputs if x]) == 2 else []


@rule("Einsum", family=Family.MATMUL, saved=einsum_saved, backward=per_operand)
def _einsum_flops(node: Node, ctx: FlopContext) -> int | None:
    """2 x the product of the indices a two-operand contraction spans (ops/costs.einsum_flops).
    One operand: 0 (a permutation, diagonal or sum: no product). Three or more: unpriced
    (None), since the contraction order is the runtime's choice."""
    operands = [x for x in node.inputs if x]
    if len(operands) == 1:
        return 0
    shapes = [ctx.shape(x) for x in operands]
    if len(operands) != 2 or any(s is None for s in shapes):
        return None
    try:
        return costs.einsum_flops(_equation(node), shapes)
    except CostlensError:
        return None               # an equation the shapes contradict: unknown, never guessed


def conv_saved(node: Node, ctx: SavedContext) -> list:
    """Names of the data operands a convolution keeps: input and (data) weight whenever any gradient is
    needed, since torch's one convolution_backward reads both for every gradient."""
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else ""
    wanted = ctx.needs(x) or ctx.trains(node) or (is_data(w, ctx) and ctx.needs(w)) \
        or (is_data(bias, ctx) and ctx.needs(bias))
    if not wanted:
        return []
    return [t for t in (x, w) if is_data(t, ctx)]       # a weight is resident: not counted


@rule("Conv", family=Family.MATMUL, saved=conv_saved, backward=per_operand)
def _conv_flops(node: Node, ctx: FlopContext) -> int | None:
    """X [N, C_in, *spatial] * W [C_out, C_in / group, *kernel] -> Y [N, C_out, *out]:
    2 * N * prod(out) * C_out * (C_in / group) * prod(kernel). dX (a transposed convolution)
    and dW each cost the same again. (torch.utils.flop_counter agrees except for a grouped dW,
    which its grad_weight formula counts group times over: it ignores groups.)"""
    w_shape, out_shape = ctx.shape(node.inputs[1]), ctx.shape(node.outputs[0])
    if not w_shape or not out_shape or len(out_shape) != len(w_shape):
        return None
    return costs.conv_flops(out_shape[0], out_shape[2:], w_shape)
