"""What autograd keeps for backward, per op (DESIGN.md §2.6).

Each rule mirrors PyTorch's derivative formulas (``tools/autograd/derivatives.yaml``): a
tensor is saved only when a gradient that needs it will be computed. A matmul saves X when
dW is needed and W when dX is needed (W is resident: not counted); softmax, sigmoid, tanh,
relu, sqrt and reciprocal save their output; gelu, erf and pow save their input; a
normalization saves its input and per-row statistics. SiLU exported as x * sigmoid(x)
saves x once, as ``torch.nn.functional.silu`` does. Rules return the names of graph
tensors (the memory stage maps them to storages) and ``Extra`` entries for tensors the
graph does not show.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from costlens.ir import Node


@dataclass(frozen=True)
class Extra:
    """A saved tensor the exported graph does not show (e.g. a norm's mean and rstd)."""

    key: str
    n_bytes: int


class SavedContext(Protocol):
    def needs(self, tensor: str) -> bool: ...            # an activation that needs a gradient
    def is_weight(self, tensor: str) -> bool: ...        # computed from constants alone
    def trains(self, node: Node) -> bool: ...            # a trainable parameter meets data here
    def is_fused_inner(self, tensor: str) -> bool: ...  # the inner half of a fused pair: sigmoid of
                                                          # x * sigmoid(x), sqrt of 1 / sqrt(x)
    def rows(self, tensor: str) -> int: ...              # elements / last dim
    def stat_bytes(self) -> int: ...                     # bytes per element of fp32 statistics


Rule = Callable[[Node, SavedContext], list]
SAVED_RULES: dict[str, Rule] = {}


def saves(*ops: str):
    def register(rule: Rule) -> Rule:
        for op in ops:
            if op in SAVED_RULES:
                raise ValueError(f"saved-tensor rule for {op!r} registered twice")
            SAVED_RULES[op] = rule
        return rule
    return register


def _grad_needed(node: Node, operand: str, ctx: SavedContext) -> bool:
    return ctx.trains(node) if ctx.is_weight(operand) else ctx.needs(operand)


def _data(operand: str, ctx: SavedContext) -> bool:
    return bool(operand) and not ctx.is_weight(operand)


@saves("MatMul", "Gemm", "com.microsoft.FusedMatMul")
def _matmul(node: Node, ctx: SavedContext) -> list:
    a, b = node.inputs[0], node.inputs[1]
    kept = []
    if _grad_needed(node, b, ctx) and _data(a, ctx):
        kept.append(a)            # dB = Aᵀ·dY
    if _grad_needed(node, a, ctx) and _data(b, ctx):
        kept.append(b)            # dA = dY·Bᵀ
    return kept


@saves("Mul")
def _mul(node: Node, ctx: SavedContext) -> list:
    a, b = node.inputs[0], node.inputs[1]
    if ctx.is_fused_inner(a) or ctx.is_fused_inner(b):
        x = b if ctx.is_fused_inner(a) else a
        return [x] if ctx.needs(x) else []          # silu saves its input only
    kept = []
    if _grad_needed(node, b, ctx) and _data(a, ctx):
        kept.append(a)
    if _grad_needed(node, a, ctx) and _data(b, ctx):
        kept.append(b)
    return kept


@saves("Div")
def _div(node: Node, ctx: SavedContext) -> list:
    a, b = node.inputs[0], node.inputs[1]
    if not _data(b, ctx):
        return []                                    # division by a constant: no saved activation
    kept = [b] if ctx.needs(a) else []
    if ctx.needs(b):
        kept += [a, b]                               # d/db (a/b) = -a/b²
    return kept


@saves("Pow", "Gelu", "Erf", "Log", "Softplus", "Abs", "com.microsoft.FastGelu", "com.microsoft.BiasGelu",
       "com.microsoft.QuickGelu", "Mish", "Elu", "Selu", "Celu", "LeakyRelu", "HardSwish", "Sin", "Cos")
def _input(node: Node, ctx: SavedContext) -> list:
    x = node.inputs[0]
    return [x] if ctx.needs(x) else []


@saves("Softmax", "LogSoftmax", "Sigmoid", "Tanh", "Relu", "Sqrt", "Reciprocal", "Exp")
def _output(node: Node, ctx: SavedContext) -> list:
    x, y = node.inputs[0], node.outputs[0]
    if not ctx.needs(x) or (node.op in ("Sigmoid", "Sqrt") and ctx.is_fused_inner(y)):
        return []                                    # the fused op (silu, rsqrt) keeps what it needs
    return [y]


@saves("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
       "com.microsoft.SimplifiedLayerNormalization", "com.microsoft.SkipLayerNormalization",
       "com.microsoft.SkipSimplifiedLayerNormalization", "com.microsoft.LayerNormalization")
def _norm(node: Node, ctx: SavedContext) -> list:
    x = node.inputs[0]
    if not (ctx.needs(x) or ctx.trains(node)):
        return []
    n_stats = 1 if "RMS" in node.op or "Simplified" in node.op else 2       # rstd (and mean)
    return [x, Extra(f"stats@{node.name}", n_stats * ctx.rows(x) * ctx.stat_bytes())]


@saves("Where")
def _where(node: Node, ctx: SavedContext) -> list:
    return [node.inputs[0]] if any(ctx.needs(x) for x in node.inputs[1:]) else []


@saves("TopK")
def _topk(node: Node, ctx: SavedContext) -> list:
    return [node.outputs[1]] if ctx.needs(node.inputs[0]) else []          # the indices


@saves("ScatterElements", "GatherElements", "ScatterND", "GatherND")
def _indexed(node: Node, ctx: SavedContext) -> list:
    return [node.inputs[1]] if any(ctx.needs(x) for x in node.inputs) else []


def saved_by(node: Node, ctx: SavedContext) -> list:
    """Saved tensors of one node; ops without a rule save nothing (views, adds, reductions)."""
    rule = SAVED_RULES.get(node.op)
    return rule(node, ctx) if rule else []
