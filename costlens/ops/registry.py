"""The per-op registry: one rule per op, the single cost table flops.py and the memory model read.

Rule format (``Rule``), one per op, registered once (``rule`` / ``register`` refuse an op
registered twice, as ``torch.utils.flop_counter``'s registry does):

- ``family``: the op's kind (``Family``), for reports; nothing dispatches on it.
- ``flops(node, ctx) -> int | None``: forward FLOPs (2 x multiply-accumulates) as a pure
  function of shapes and attributes; ``ctx`` (``FlopContext``) gives concrete shapes at the
  plan's batch and seq and tells weights from data. None: the op multiplies matrices but its
  shapes are unknown (the estimate is then incomplete, never a silent zero).
- ``backward(node, ctx, needed, forward_flops) -> Backward``: backward FLOPs split in two,
  ``input`` (dX, per data input in ``needed.inputs``) and ``weight`` (dW when ``needed.weight``:
  the node's weight trains). ``forward_flops`` is the forward as priced (an expert's routed
  share of tokens already applied), so products scale with it.
- ``saved(node, ctx) -> list``: what autograd keeps for backward, as PyTorch's derivative
  formulas keep it (``tools/autograd/derivatives.yaml``): names of graph tensors, and ``Extra``
  entries (key, bytes) for tensors the graph does not show. ``ctx`` is a ``SavedContext``.
- ``transient(node, ctx) -> int`` (optional): bytes its backward allocates beyond its output's
  and inputs' gradients and its weights' ``.grad``.
- ``weight_flops(node, ctx, weight, forward_flops) -> int`` (optional): the part of the forward
  that multiplies by one weight (default: all of it; a fused MoE op holds several weights).

A facet with nothing to compute is an explicit ``Zero(reason)`` instead of a function, e.g.
``Zero(SHAPE_ONLY)``; a zero forward makes the backward zero with the same reason. An op
without a rule is unknown: reported by name and count, and the result is incomplete.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, NamedTuple, Protocol, Union

from costlens.ir import Node


class Family(str, Enum):
    """An op's kind, for reports only: nothing dispatches on it (each op's Rule says what it costs)."""

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
class Zero:
    """An explicit zero for one facet of a rule, with the reason it is zero."""

    reason: str


# Reasons shared by many rules.
SHAPE_ONLY = "shape-only: no arithmetic"
NOT_COUNTED = "elementwise: not counted, as torch.utils.flop_counter counts matrix products only"
SHAPES_ONLY_BACKWARD = "backward needs shapes only (views, adds, sums, layout ops)"
NOT_DIFFERENTIABLE = "no gradient flows through it (comparisons, indices, integer ops)"


@dataclass(frozen=True)
class Extra:
    """A saved tensor the exported graph does not show (e.g. a norm's mean and rstd), in bytes."""

    key: str
    n_bytes: int


class Needed(NamedTuple):
    """Which gradients one node's backward must produce."""

    inputs: frozenset[int]    # slots of data inputs (not weights) that need a gradient: dX
    weight: bool              # the node's weight trains: dW


class Backward(NamedTuple):
    """Backward FLOPs (2 x MACs) of one node, split as reports show them: dX and dW."""

    input: int                # FLOPs of the input gradients (backward_input)
    weight: int               # FLOPs of the weight gradients (backward_weight)


class FlopContext(Protocol):
    """What a FLOP rule may ask about a node's tensors: shapes in elements per dim, and weight or data."""

    def shape(self, tensor: str) -> tuple[int, ...] | None: ...   # concrete (batch, seq bound), constants too
    def is_weight(self, tensor: str) -> bool: ...                  # computed from constants alone


class SavedContext(Protocol):
    """What a saved-tensor rule may ask: which tensors need gradients, which weights train, and the
    precision's bytes per element (of activations, fp32 statistics and weights)."""

    def needs(self, tensor: str) -> bool: ...            # an activation that needs a gradient
    def receives(self, tensor: str) -> bool: ...         # ... and gets one from the loss in backward
    def is_weight(self, tensor: str) -> bool: ...        # computed from constants alone
    def trains(self, node: Node) -> bool: ...            # a trainable parameter meets data here
    def is_fused_inner(self, tensor: str) -> bool: ...  # the inner half of a fused pair: sigmoid of
                                                          # x * sigmoid(x), sqrt of 1 / sqrt(x)
    def rows(self, tensor: str) -> int: ...              # elements / last dim
    def stat_bytes(self) -> int: ...                     # bytes per element of fp32 statistics
    def shape(self, tensor: str) -> tuple | None: ...   # concrete shape (batch, seq bound), constants too
    def act_bytes(self, op: str = "") -> int: ...        # bytes per element of an activation ``op`` makes
                                                          # (fp32 where autocast runs ``op`` in fp32)
    def fused_attention(self) -> bool: ...               # attention runs as a fused kernel (no probs kept)
    def weight_bytes(self) -> int: ...                   # bytes per weight (and weight-gradient) element


FlopFn = Callable[[Node, FlopContext], Union[int, None]]
BackwardFn = Callable[[Node, FlopContext, Needed, int], Backward]
SavedFn = Callable[[Node, SavedContext], list]
TransientFn = Callable[[Node, SavedContext], int]
WeightFlopFn = Callable[[Node, FlopContext, str, int], int]


@dataclass(frozen=True)
class Rule:
    """One op's cost rule: forward and backward FLOPs (2 x MACs), tensors saved for backward, and
    backward transient bytes; a facet with nothing to compute is a ``Zero`` with its reason."""

    op: str
    family: Family
    flops: FlopFn | Zero
    backward: BackwardFn | Zero
    saved: SavedFn | Zero
    transient: TransientFn | None = None
    weight_flops: WeightFlopFn | None = None

    def forward_flops(self, node: Node, ctx: FlopContext) -> int | None:
        """Forward FLOPs of one node (None: it multiplies matrices but its shapes are unknown)."""
        return 0 if isinstance(self.flops, Zero) else self.flops(node, ctx)

    def backward_flops(self, node: Node, ctx: FlopContext, needed: Needed, forward_flops: int) -> Backward:
        if isinstance(self.backward, Zero) or not forward_flops:
            return Backward(0, 0)
        return self.backward(node, ctx, needed, forward_flops)

    def saved_by(self, node: Node, ctx: SavedContext) -> list:
        return [] if isinstance(self.saved, Zero) else self.saved(node, ctx)

    def backward_transient(self, node: Node, ctx: SavedContext) -> int:
        return self.transient(node, ctx) if self.transient else 0

    def flops_with(self, node: Node, ctx: FlopContext, weight: str, forward_flops: int) -> int:
        """The forward FLOPs that multiply by ``weight`` (all of them unless the rule says)."""
        return self.weight_flops(node, ctx, weight, forward_flops) if self.weight_flops else forward_flops


_RULES: dict[str, Rule] = {}


def register(*ops: str, family: Family, flops: FlopFn | Zero, saved: SavedFn | Zero,
             backward: BackwardFn | Zero | None = None, transient: TransientFn | None = None,
             weight_flops: WeightFlopFn | None = None) -> None:
    """Register one rule for each of ``ops``. A zero forward implies a zero backward (same
    reason); a real forward needs a real backward or an explicit ``Zero``."""
    if backward is None:
        if not isinstance(flops, Zero):
            raise ValueError(f"rule for {ops}: FLOPs without a backward rule")
        backward = flops
    for op in ops:
        if op in _RULES:
            raise ValueError(f"op {op!r} registered twice")
        _RULES[op] = Rule(op, family, flops, backward, saved, transient, weight_flops)


def rule(*ops: str, family: Family, saved: SavedFn | Zero, backward: BackwardFn | Zero,
         transient: TransientFn | None = None, weight_flops: WeightFlopFn | None = None):
    """Decorator form of ``register`` over the forward-FLOP function (as torch's
    ``register_flop_formula``): ``@rule("Einsum", family=..., saved=..., backward=...)``."""
    def decorate(flops: FlopFn) -> FlopFn:
        register(*ops, family=family, flops=flops, saved=saved, backward=backward, transient=transient,
                 weight_flops=weight_flops)
        return flops
    return decorate


def lookup(op: str) -> Rule | None:
    """The rule of ``op``, None when it has none (the caller reports the op as unknown, never prices it 0)."""
    return _RULES.get(op)


def known(op: str) -> bool:
    """The op has a rule (an op without one makes the result incomplete)."""
    return op in _RULES


def registered() -> dict[str, Rule]:
    """Every rule, by op (a copy)."""
    return dict(_RULES)


def rule_table(table: dict, what: str):
    """A decorator ``@rule(*ops)`` filling ``table`` with one function for several ops; an op
    registered twice is a bug (as in torch.utils.flop_counter's registry). The per-op tables
    outside the cost model (torch implementations, aten lowerings) are filled through it."""
    def rule(*ops: str):
        def register(fn):
            for op in ops:
                if op in table:
                    raise ValueError(f"{what} for {op!r} registered twice")
                table[op] = fn
            return fn
        return register
    return rule
