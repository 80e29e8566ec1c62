"""The per-op registry: which ops costlens knows, by family.

One table, filled by ``register``, which refuses an op registered twice (like
``torch.utils.flop_counter``'s registry). Every op a graph uses is looked up here; an op
with no entry is reported by name and count and marks the result incomplete — never a
silent zero. The cost formulas of each family live beside their registration in
``ops/costs.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Family(str, Enum):
    SHAPE = "shape"              # metadata or layout only: no arithmetic, no saved tensors
    ELEMENTWISE = "elementwise"  # one result per output element
    ACTIVATION = "activation"    # elementwise nonlinearity (saves its input or output)
    REDUCTION = "reduction"
    MATMUL = "matmul"
    SOFTMAX = "softmax"
    NORM = "norm"
    GATHER = "gather"            # embedding lookups, index selection, scatter
    ROUTING = "routing"          # TopK and friends
    FUSED_ATTENTION = "fused_attention"
    FUSED_MOE = "fused_moe"
    RANDOM = "random"            # dropout


@dataclass(frozen=True)
class OpInfo:
    op: str
    family: Family


_REGISTRY: dict[str, OpInfo] = {}


def rule_table(table: dict, what: str):
    """A decorator ``@rule(*ops)`` filling ``table`` with one function for several ops; an op
    registered twice is a bug (as in torch.utils.flop_counter's registry). Every per-op table
    in costlens (saved tensors, torch implementations, aten lowerings) is filled through it."""
    def rule(*ops: str):
        def register(fn):
            for op in ops:
                if op in table:
                    raise ValueError(f"{what} for {op!r} registered twice")
                table[op] = fn
            return fn
        return register
    return rule


def register(family: Family, *ops: str) -> None:
    for op in ops:
        if op in _REGISTRY:
            raise ValueError(f"op {op!r} registered twice")
        _REGISTRY[op] = OpInfo(op, family)


def lookup(op: str) -> OpInfo | None:
    return _REGISTRY.get(op)


def known(op: str) -> bool:
    return op in _REGISTRY


register(Family.SHAPE, "Shape", "Size", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity",
         "Cast", "CastLike", "Concat", "Split", "Slice", "Expand", "Tile", "Constant", "ConstantOfShape", "Range",
         "Trilu", "Pad", "EyeLike", "NonZero", "OneHot", "SequenceAt", "SplitToSequence")
register(Family.ELEMENTWISE, "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log",
         "Where", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Not", "Xor", "Min",
         "Max", "Clip", "Floor", "Ceil", "Round", "Sign", "Cos", "Sin", "IsNaN", "IsInf", "Mod", "BitwiseAnd",
         "BitwiseOr", "BitwiseNot")
register(Family.ACTIVATION, "Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "Softplus", "Softsign", "Mish", "Elu",
         "Selu", "Celu", "LeakyRelu", "HardSigmoid", "HardSwish", "PRelu", "com.microsoft.FastGelu",
         "com.microsoft.BiasGelu", "com.microsoft.QuickGelu", "com.microsoft.Gelu")
register(Family.REDUCTION, "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2",
         "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin", "CumSum")
register(Family.MATMUL, "MatMul", "Gemm", "Einsum", "com.microsoft.FusedMatMul", "Conv")
register(Family.SOFTMAX, "Softmax", "LogSoftmax")
register(Family.NORM, "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
         "com.microsoft.SimplifiedLayerNormalization", "com.microsoft.SkipLayerNormalization",
         "com.microsoft.SkipSimplifiedLayerNormalization", "com.microsoft.LayerNormalization",
         "GroupNormalization", "BatchNormalization", "InstanceNormalization")
register(Family.GATHER, "Gather", "GatherElements", "GatherND", "ScatterElements", "ScatterND", "Scatter",
         "com.microsoft.GatherBlockQuantized")
register(Family.ROUTING, "TopK")
register(Family.FUSED_ATTENTION, "Attention", "com.microsoft.Attention", "com.microsoft.MultiHeadAttention",
         "com.microsoft.GroupQueryAttention", "com.microsoft.PackedAttention",
         "com.microsoft.PackedMultiHeadAttention", "com.microsoft.RotaryEmbedding", "RotaryEmbedding")
register(Family.FUSED_MOE, "com.microsoft.MoE", "com.microsoft.QMoE", "com.microsoft.SparseMoE")
register(Family.RANDOM, "Dropout")
