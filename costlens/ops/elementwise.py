"""Rules of the ops without matrix products: layout, elementwise, activations, reductions,
softmax, gathers, routing and dropout. Their forward and backward FLOPs are zero by
convention (``NOT_COUNTED``: torch.utils.flop_counter counts matrix products only) or by
nature (``SHAPE_ONLY``); what they save follows derivatives.yaml: softmax, sigmoid, tanh,
relu, sqrt, reciprocal and exp save their output; gelu, erf, pow and most other nonlinearities
their input; SiLU exported as x * sigmoid(x) saves x once, as ``torch.nn.functional.silu``
does; views, adds and sums save nothing (their backward needs shapes only).
"""
from __future__ import annotations

from costlens.ir import Node
from costlens.ops.linear import grad_needed, is_data
from costlens.ops.registry import NOT_COUNTED, NOT_DIFFERENTIABLE, SHAPE_ONLY, SHAPES_ONLY_BACKWARD, Extra, \
    Family, SavedContext, Zero, register
from costlens.shapes import numel

NO_FLOPS = Zero(NOT_COUNTED)


def _mul(node: Node, ctx: SavedContext) -> list:
    a, b = node.inputs[0], node.inputs[1]
    if ctx.is_fused_inner(a) or ctx.is_fused_inner(b):
        x = b if ctx.is_fused_inner(a) else a
        return [x] if ctx.needs(x) else []          # silu saves its input only
    kept = []
    if grad_needed(node, b, ctx) and is_data(a, ctx):
        kept.append(a)
    if grad_needed(node, a, ctx) and is_data(b, ctx):
        kept.append(b)
    return kept


def _div(node: Node, ctx: SavedContext) -> list:
    a, b = node.inputs[0], node.inputs[1]
    if not is_data(b, ctx):
        return []                                    # division by a constant: no saved activation
    kept = [b] if ctx.needs(a) else []
    if ctx.needs(b):
        kept += [a, b]                               # d/db (a/b) = -a/b²
    return kept


def _input(node: Node, ctx: SavedContext) -> list:
    x = node.inputs[0]
    return [x] if ctx.needs(x) else []


def _output(node: Node, ctx: SavedContext) -> list:
    x, y = node.inputs[0], node.outputs[0]
    if not ctx.needs(x) or (node.op in ("Sigmoid", "Sqrt") and ctx.is_fused_inner(y)):
        return []                                    # the fused op (silu, rsqrt) keeps what it needs
    return [y]


def _data_inputs(node: Node, ctx: SavedContext) -> list:
    """torch.maximum / minimum / prelu: one formula reads every operand (constants resident)."""
    if not any(ctx.needs(x) for x in node.inputs if x):
        return []
    return [x for x in node.inputs if is_data(x, ctx)]


def _softsign(node: Node, ctx: SavedContext) -> list:
    """F.softsign is x / (1 + |x|): abs keeps x, the division keeps x and its denominator."""
    x = node.inputs[0]
    if not ctx.needs(x):
        return []
    shape = ctx.shape(x)
    return [x, Extra(f"denominator@{node.name}", numel(shape) * ctx.act_bytes() if shape else 0)]


def _where(node: Node, ctx: SavedContext) -> list:
    if ctx.is_fused_inner(node.outputs[0]):
        return []             # _safe_softmax's NaN guard: part of the one softmax op, which keeps its output
    return [node.inputs[0]] if any(ctx.needs(x) for x in node.inputs[1:]) else []


def _topk(node: Node, ctx: SavedContext) -> list:
    return [node.outputs[1]] if ctx.needs(node.inputs[0]) else []          # the indices


def _indexed(node: Node, ctx: SavedContext) -> list:
    return [node.inputs[1]] if any(ctx.needs(x) for x in node.inputs) else []


def _input_and_output(node: Node, ctx: SavedContext) -> list:
    """amax / amin / prod / norm / logsumexp: the backward reads the input and the result. A
    max / min over one dim that also returns its indices (``x.max(dim)``, ``selects_index``)
    scatters the gradient through those indices: it keeps them (int64) and nothing else."""
    if not ctx.needs(node.inputs[0]):
        return []
    if node.attr("selects_index", 0):
        return [Extra(f"indices@{node.name}", numel(ctx.shape(node.outputs[0]) or ()) * 8)]
    return [node.inputs[0], node.outputs[0]]


# --------------------------------------------------------------------------- layout
register("Shape", "Size", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "CastLike",
         "Concat", "Split", "Slice", "Expand", "Tile", "Constant", "ConstantOfShape", "Range", "Trilu", "Pad",
         "EyeLike", "NonZero", "OneHot", "SequenceAt", "SplitToSequence",
         family=Family.SHAPE, flops=Zero(SHAPE_ONLY), saved=Zero(SHAPES_ONLY_BACKWARD))

# --------------------------------------------------------------------------- elementwise
register("Add", "Sub", "Neg", family=Family.ELEMENTWISE, flops=NO_FLOPS, saved=Zero(SHAPES_ONLY_BACKWARD))
register("Mul", family=Family.ELEMENTWISE, flops=NO_FLOPS, saved=_mul)
register("Div", family=Family.ELEMENTWISE, flops=NO_FLOPS, saved=_div)
register("Pow", "Log", "Abs", "Sin", "Cos", "Clip", family=Family.ELEMENTWISE, flops=NO_FLOPS, saved=_input)
register("Sqrt", "Reciprocal", "Exp", family=Family.ELEMENTWISE, flops=NO_FLOPS, saved=_output)
register("Where", family=Family.ELEMENTWISE, flops=NO_FLOPS, saved=_where)
register("Min", "Max", family=Family.ELEMENTWISE, flops=NO_FLOPS, saved=_data_inputs)
register("Floor", "Ceil", "Round", "Sign", family=Family.ELEMENTWISE, flops=NO_FLOPS,
         saved=Zero("piecewise constant: the gradient is zero, nothing is read"))
register("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Not", "Xor", "IsNaN", "IsInf",
         "Mod", "BitwiseAnd", "BitwiseOr", "BitwiseNot", family=Family.ELEMENTWISE, flops=NO_FLOPS,
         saved=Zero(NOT_DIFFERENTIABLE))

# --------------------------------------------------------------------------- activations
register("Relu", "Sigmoid", "Tanh", family=Family.ACTIVATION, flops=NO_FLOPS, saved=_output)
register("Gelu", "Erf", "Softplus", "Mish", "Elu", "Selu", "Celu", "LeakyRelu", "HardSwish", "HardSigmoid",
         "com.microsoft.FastGelu", "com.microsoft.BiasGelu", "com.microsoft.QuickGelu", "com.microsoft.Gelu",
         family=Family.ACTIVATION, flops=NO_FLOPS, saved=_input)
register("PRelu", family=Family.ACTIVATION, flops=NO_FLOPS, saved=_data_inputs)     # input and slope
register("Softsign", family=Family.ACTIVATION, flops=NO_FLOPS, saved=_softsign)

# --------------------------------------------------------------------------- reductions, softmax
register("ReduceMean", "ReduceSum", "CumSum", family=Family.REDUCTION, flops=NO_FLOPS,
         saved=Zero(SHAPES_ONLY_BACKWARD))
register("ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceLogSumExp", family=Family.REDUCTION,
         flops=NO_FLOPS, saved=_input_and_output)
register("ReduceSumSquare", family=Family.REDUCTION, flops=NO_FLOPS, saved=_input)
register("ArgMax", "ArgMin", family=Family.REDUCTION, flops=NO_FLOPS, saved=Zero(NOT_DIFFERENTIABLE))
register("Softmax", "LogSoftmax", family=Family.SOFTMAX, flops=NO_FLOPS, saved=_output)

# --------------------------------------------------------------------------- gathers, routing, dropout
register("Gather", "com.microsoft.GatherBlockQuantized", family=Family.GATHER, flops=Zero(SHAPE_ONLY),
         saved=Zero("keeps only its indices: token ids (a graph input) or shape-derived, not activations"))
register("ScatterElements", "GatherElements", "ScatterND", "GatherND", "Scatter", family=Family.GATHER,
         flops=Zero(SHAPE_ONLY), saved=_indexed)
register("TopK", family=Family.ROUTING, flops=Zero(SHAPE_ONLY), saved=_topk)
register("Dropout", family=Family.RANDOM, flops=NO_FLOPS,
         saved=Zero("the graph's dropout is inference-mode (identity); the plan's training dropout is "
                    "priced by storages._dropout_saved"))
