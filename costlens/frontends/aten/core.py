"""ATen ops -> canonical ONNX op kinds: one registry of lowering rules.

Every rule receives a ``Call`` (the op, its arguments bound by the op's schema, the traced
output metadata, the module path) and appends IR nodes to a ``Builder``; what it returns
stands for the op's result. The target forms are the ones torch.onnx's exporter writes, so
no later stage can tell which front end built a graph: ``linear`` on a 2-D input is
``Gemm(transB=1)``, on more dims ``Transpose`` of the weight then ``MatMul`` (+ ``Add`` of
the bias); ``silu`` is ``Sigmoid`` then ``Mul(x, sigmoid)``; ``rsqrt`` is ``Sqrt`` then
``Reciprocal``; ``embedding`` is ``Gather(table, ids)``; ``topk`` is ``TopK`` whose k is a
constant with a known value; fused scaled-dot-product attention is written out eagerly
(Q·Kᵀ → scale → mask → Softmax → ·V) so that the attention core and its FLOPs are visible.

Ops that only re-type or re-label a tensor without changing it (``contiguous``, ``clone``,
``detach``, ``dropout`` in eval mode, a cast to the same dtype, full-range slices, trace
assertions) lower to nothing: the result is the input. An op with no rule is kept as
``aten.<name>``: the registry of costs does not know it, so it is reported, never priced
as zero. Shared by the torch.export and fvcore front ends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from costlens.frontends.irbuild import Builder, Sym, Value
from costlens.ops.registry import rule_table

Lowering = Callable[["Builder", "Call"], Any]
LOWERINGS: dict[str, Lowering] = {}


@dataclass
class Call:
    """One traced op call. ``args`` are bound by schema name (positional ones too)."""

    op: str                                   # "aten.linear", "sym.mul", ...
    args: dict[str, Any]
    outs: list                                # per output: (shape, dtype), or a dim for SymInt results
    scope: str = ""
    base: str = ""                            # name hint for the outputs

    def arg(self, *names: str, default: Any = None) -> Any:
        for name in names:
            if name in self.args:
                return self.args[name]
        return default

    def out(self, i: int = 0):
        return self.outs[i] if i < len(self.outs) and self.outs[i] is not None else (None, "float32")


lowers = rule_table(LOWERINGS, "lowering")      # one rule for several ops; twice is a bug


# --------------------------------------------------------------------------- helpers

def tensor(b: Builder, x, dtype: str) -> Value:
    """A tensor argument: a Value as is, a Sym as its scalar, a number as a scalar constant."""
    if isinstance(x, Value):
        return x
    if isinstance(x, Sym):
        return Value(x.scalar, (), "int64")
    if isinstance(x, bool):
        return b.scalar(x, "bool")
    if isinstance(x, float) and not dtype.startswith("float") and not dtype.startswith("bfloat"):
        dtype = "float32"
    return b.scalar(float(x) if dtype.startswith(("float", "bfloat")) else x, dtype)


def vector(b: Builder, s: Sym | Value, scope: str) -> str:
    """A symbolic int as a 1-element vector, made once: symbolic ints are shared by every
    module that reads them (the trace reuses them), so the node belongs to no module.
    (TorchScript hands some ints over as 0-dim tensors: those are unsqueezed where used.)"""
    if isinstance(s, Value):
        return b.one("Unsqueeze", [s, b.ints([0])], (1,), s.dtype, scope=scope).name
    if s.vector is None:
        s.vector = b.one("Unsqueeze", [s.scalar, b.ints([0])], (1,), "int64", scope="", base="sym_vec").name
    return s.vector


def shape_list(b: Builder, items, scope: str) -> Value:
    """A list of ints and symbolic ints as a 1-D int64 tensor (a Concat when symbolic)."""
    items = list(items)
    if all(isinstance(i, int) for i in items):
        return b.ints(items)
    pieces, run = [], []
    for item in items:
        if isinstance(item, int):
            run.append(item)
            continue
        if run:
            pieces.append(b.ints(run).name)
            run = []
        pieces.append(vector(b, item, scope))
    if run:
        pieces.append(b.ints(run).name)
    return b.one("Concat", pieces, (len(items),), "int64", {"axis": 0}, scope, "shape")


def norm_dim(dim: int, rank: int | None) -> int:
    """A negative dim counted from the end as a non-negative one, when the rank is known."""
    return dim + rank if dim < 0 and rank is not None else dim


def emit(b: Builder, c: Call, op: str, inputs, attrs=None, i: int = 0) -> Value:
    """One IR node ``op`` standing for the call's output ``i`` (its traced shape and dtype)."""
    shape, dtype = c.out(i)
    return b.one(op, inputs, shape, dtype, attrs, c.scope, c.base)


class Unsupported(Exception):
    """A rule meets an argument form it does not lower (the op is then kept as unknown)."""


def lower(b: Builder, c: Call):
    """Apply the rule for ``c.op``. An op without a rule, or one its rule cannot lower, is
    kept under its own name: the cost registry does not know it, so it is reported."""
    rule = LOWERINGS.get(c.op)
    if rule is not None:
        mark = len(b.nodes)
        try:
            result = rule(b, c)
            return result
        except Unsupported as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - an odd argument form must not end the load
            reason = f"{type(e).__name__}: {e}"
        del b.nodes[mark:]
        b.warnings.append(f"{c.base or c.op}: {c.op} not lowered ({reason}); kept as an unknown op")
    inputs = [v for v in _flat(c.args.values()) if isinstance(v, (Value, Sym))]
    names = [v.name if isinstance(v, Value) else v.scalar for v in inputs]
    outs = [o if isinstance(o, tuple) else ((), "int64") for o in c.outs] or [(None, "float32")]
    values = b.node(c.op, names, outs, scope=c.scope, base=c.base)
    return values[0] if len(values) == 1 else tuple(values)


def _flat(items):
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _flat(item)
        else:
            yield item


# --------------------------------------------------------------------------- no-ops

@lowers("aten.contiguous", "aten.clone", "aten.detach", "aten.alias", "aten.lift_fresh_copy",
        "aten.lift_fresh", "aten.view_as_real_physical", "aten.resolve_conj", "aten.resolve_neg",
        "aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_constrain_range_for_size",
        "aten.sym_constrain_range", "aten._assert_async", "aten.detach_", "aten.requires_grad_",
        "aten._functional_assert_async", "aten.copy")
def _identity(b, c):
    values = [v for v in c.args.values() if isinstance(v, Value)]
    return values[-1] if c.op == "aten.copy" and len(values) > 1 else (values[0] if values else None)


@lowers("aten.dropout", "aten.feature_dropout", "aten.alpha_dropout", "aten.native_dropout")
def _dropout(b, c):
    x, p, train = c.arg("input", "self"), c.arg("p", default=0.0), c.arg("train", default=False)
    if not train or not p:
        return x if c.op != "aten.native_dropout" else (x, None)
    return emit(b, c, "Dropout", [x, b.scalar(float(p), "float32")])


@lowers("aten.to", "aten._to_copy", "aten.type_as", "aten._to_dtype", "aten.float", "aten.half",
        "aten.bfloat16", "aten.long", "aten.int", "aten.bool", "aten._autocast_to_reduced_precision",
        "aten._autocast_to_full_precision", "aten._to_copy_default")
def _cast(b, c):
    x = c.arg("self", "input")
    shape, dtype = c.out()
    if not isinstance(x, Value) or x.dtype == dtype:
        return x
    from costlens.frontends.irbuild import ONNX_DTYPE_CODES
    return b.one("Cast", [x], shape, dtype, {"to": ONNX_DTYPE_CODES.get(dtype, 0)}, c.scope, c.base)


# --------------------------------------------------------------------------- elementwise

_UNARY = {
    "aten.abs": "Abs", "aten.neg": "Neg", "aten.exp": "Exp", "aten.log": "Log", "aten.sqrt": "Sqrt",
    "aten.reciprocal": "Reciprocal", "aten.sigmoid": "Sigmoid", "aten.tanh": "Tanh", "aten.relu": "Relu",
    "aten.erf": "Erf", "aten.cos": "Cos", "aten.sin": "Sin", "aten.floor": "Floor", "aten.ceil": "Ceil",
    "aten.round": "Round", "aten.sign": "Sign", "aten.logical_not": "Not", "aten.bitwise_not": "Not",
    "aten.isnan": "IsNaN", "aten.isinf": "IsInf", "aten.softplus": "Softplus", "aten.mish": "Mish",
    "aten.elu": "Elu", "aten.selu": "Selu", "aten.celu": "Celu", "aten.leaky_relu": "LeakyRelu",
    "aten.hardswish": "HardSwish", "aten.hardsigmoid": "HardSigmoid", "aten.erfc": "Erf",
}


def _unary(op: str) -> Lowering:
    return lambda b, c: emit(b, c, op, [c.arg("self", "input")])


for _aten, _onnx in _UNARY.items():
    lowers(_aten)(_unary(_onnx))

_ARITH = {"aten.add": "Add", "aten.sub": "Sub", "aten.mul": "Mul", "aten.div": "Div", "aten.pow": "Pow",
          "aten.maximum": "Max", "aten.minimum": "Min", "aten.remainder": "Mod", "aten.fmod": "Mod",
          "aten.floor_divide": "Div", "aten.true_divide": "Div", "aten.multiply": "Mul"}
_COMPARE = {"aten.eq": "Equal", "aten.lt": "Less", "aten.le": "LessOrEqual", "aten.gt": "Greater",
            "aten.ge": "GreaterOrEqual", "aten.__and__": "And", "aten.bitwise_and": "And",
            "aten.logical_and": "And", "aten.__or__": "Or", "aten.bitwise_or": "Or", "aten.logical_or": "Or",
            "aten.logical_xor": "Xor", "aten.bitwise_xor": "Xor", "aten.__xor__": "Xor"}


def _binary(op: str, compare: bool) -> Lowering:
    def rule(b: Builder, c: Call):
        x, y = c.arg("self", "input"), c.arg("other", "exponent")
        shape, dtype = c.out()
        operand = next((v.dtype for v in (x, y) if isinstance(v, Value)), dtype) if compare else dtype
        x, y = tensor(b, x, operand), tensor(b, y, operand)
        alpha = c.arg("alpha", default=1)
        if alpha not in (1, None) and op in ("Add", "Sub"):
            y = b.one("Mul", [y, b.scalar(alpha, y.dtype)], y.shape, y.dtype, scope=c.scope)
        result = b.one(op, [x, y], shape, dtype, scope=c.scope, base=c.base)
        mode = c.arg("rounding_mode")
        if op == "Div" and (mode == "floor" or c.op == "aten.floor_divide") and dtype.startswith(("float", "bfloat")):
            result = b.one("Floor", [result], shape, dtype, scope=c.scope)
        return result
    return rule


for _aten, _onnx in _ARITH.items():
    lowers(_aten)(_binary(_onnx, compare=False))
for _aten, _onnx in _COMPARE.items():
    lowers(_aten)(_binary(_onnx, compare=True))


@lowers("aten.ne")
def _not_equal(b, c):
    x, y = c.arg("self"), c.arg("other")
    operand = next(v.dtype for v in (x, y) if isinstance(v, Value))
    shape, dtype = c.out()
    equal = b.one("Equal", [tensor(b, x, operand), tensor(b, y, operand)], shape, "bool", scope=c.scope)
    return b.one("Not", [equal], shape, dtype, scope=c.scope, base=c.base)


@lowers("aten.rsub")
def _rsub(b, c):
    shape, dtype = c.out()
    x, y = tensor(b, c.arg("self"), dtype), tensor(b, c.arg("other"), dtype)
    alpha = c.arg("alpha", default=1)
    if alpha != 1:
        x = b.one("Mul", [x, b.scalar(alpha, dtype)], x.shape, dtype, scope=c.scope)
    return b.one("Sub", [y, x], shape, dtype, scope=c.scope, base=c.base)


@lowers("aten.rsqrt")
def _rsqrt(b, c):
    shape, dtype = c.out()
    root = b.one("Sqrt", [c.arg("self")], shape, dtype, scope=c.scope)
    return b.one("Reciprocal", [root], shape, dtype, scope=c.scope, base=c.base)


@lowers("aten.silu")
def _silu(b, c):
    # x * sigmoid(x): the pair the role locator and the memory rules read as one silu
    x = c.arg("self")
    shape, dtype = c.out()
    gate = b.one("Sigmoid", [x], shape, dtype, scope=c.scope)
    return b.one("Mul", [x, gate], shape, dtype, scope=c.scope, base=c.base)


@lowers("aten.gelu")
def _gelu(b, c):
    return emit(b, c, "Gelu", [c.arg("self")], {"approximate": c.arg("approximate", default="none")})


@lowers("aten.where")
def _where(b, c):
    shape, dtype = c.out()
    return emit(b, c, "Where", [c.arg("condition"), tensor(b, c.arg("self"), dtype), tensor(b, c.arg("other"), dtype)])


@lowers("aten.masked_fill")
def _masked_fill(b, c):
    shape, dtype = c.out()
    return emit(b, c, "Where", [c.arg("mask"), tensor(b, c.arg("value"), dtype), c.arg("self")])


@lowers("aten.clamp", "aten.clip", "aten.clamp_min", "aten.clamp_max")
def _clamp(b, c):
    shape, dtype = c.out()
    low = c.arg("min") if c.op != "aten.clamp_max" else None
    high = c.arg("max") if c.op != "aten.clamp_min" else None
    bounds = [tensor(b, v, dtype) if v is not None else None for v in (low, high)]
    return emit(b, c, "Clip", [c.arg("self")] + bounds)


@lowers("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax")
def _softmax(b, c):
    op = "LogSoftmax" if "log" in c.op else "Softmax"
    x = c.arg("self")
    shape, dtype = c.out()
    if x.dtype != dtype:
        x = _cast(b, Call("aten.to", {"self": x}, [(x.shape, dtype)], c.scope))
    return b.one(op, [x], shape, dtype, {"axis": c.arg("dim")}, c.scope, c.base)


# --------------------------------------------------------------------------- matmuls

@lowers("aten.linear")
def _linear(b, c):
    x, weight, bias = c.arg("input"), c.arg("weight"), c.arg("bias")
    shape, dtype = c.out()
    if x.rank == 2:
        # torch.onnx: a 2-D linear is one Gemm with the [out, in] weight and transB=1
        inputs = [x, weight] + ([bias] if bias is not None else [])
        attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1}
        return b.one("Gemm", inputs, shape, dtype, attrs, c.scope, c.base)
    w_shape = None if weight.shape is None else tuple(reversed(weight.shape))
    transposed = b.one("Transpose", [weight], w_shape, weight.dtype, {"perm": (1, 0)}, c.scope, "weight_t")
    product = b.one("MatMul", [x, transposed], shape, dtype, scope=c.scope, base=c.base if bias is None else None)
    if bias is None:
        return product
    return b.one("Add", [product, bias], shape, dtype, scope=c.scope, base=c.base)


@lowers("aten.mm", "aten.bmm", "aten.matmul")
def _matmul(b, c):
    return emit(b, c, "MatMul", [c.arg("self", "input"), c.arg("mat2", "other")])


@lowers("aten.addmm")
def _addmm(b, c):
    attrs = {"alpha": float(c.arg("alpha", default=1)), "beta": float(c.arg("beta", default=1)),
             "transA": 0, "transB": 0}
    return emit(b, c, "Gemm", [c.arg("mat1"), c.arg("mat2"), c.arg("self")], attrs)


@lowers("aten.baddbmm", "aten.addbmm")
def _baddbmm(b, c):
    shape, dtype = c.out()
    product = b.one("MatMul", [c.arg("batch1"), c.arg("batch2")], shape, dtype, scope=c.scope)
    return b.one("Add", [product, c.arg("self")], shape, dtype, scope=c.scope, base=c.base)


@lowers("aten.outer", "aten.ger")
def _outer(b, c):
    # [n] x [m] -> [n, 1] * [m] -> [n, m], as torch.onnx writes it
    x, y = c.arg("self"), c.arg("vec2")
    column = b.one("Reshape", [x, b.ints([-1, 1])], (x.shape[0], 1) if x.shape else None, x.dtype, scope=c.scope)
    return emit(b, c, "Mul", [column, y])


@lowers("aten.einsum")
def _einsum(b, c):
    # the cost stage prices MatMul/Gemm only: an Einsum would cost a silent zero, so it stays unknown
    raise Unsupported(f"einsum {c.arg('equation')!r} is not priced; write it as matmuls")


@lowers("aten.scaled_dot_product_attention")
def _sdpa(b, c):
    """Fused attention written out eagerly: Q·Kᵀ -> ·scale -> +mask -> Softmax -> ·V."""
    q, k, v, mask = c.arg("query"), c.arg("key"), c.arg("value"), c.arg("attn_mask")
    shape, dtype = c.out()
    if c.arg("enable_gqa") and q.shape and k.shape and q.shape[-3] != k.shape[-3]:
        k, v = (_repeat_heads(b, t, q.shape[-3], c.scope) for t in (k, v))
    rank = q.rank
    perm = tuple(range(rank - 2)) + (rank - 1, rank - 2)
    k_t = b.one("Transpose", [k], tuple(k.shape[i] for i in perm), k.dtype, {"perm": perm}, c.scope)
    scores_shape = q.shape[:-1] + (k.shape[-2],)
    scores = b.one("MatMul", [q, k_t], scores_shape, dtype, scope=c.scope, base="scores")
    scale = c.arg("scale") or 1.0 / math.sqrt(q.shape[-1])
    scores = b.one("Mul", [scores, b.scalar(float(scale), dtype)], scores_shape, dtype, scope=c.scope)
    if mask is not None:
        if mask.dtype == "bool":
            scores = b.one("Where", [mask, scores, b.scalar(float("-inf"), dtype)], scores_shape, dtype, scope=c.scope)
        else:
            scores = b.one("Add", [scores, mask], scores_shape, dtype, scope=c.scope)
    if c.arg("is_causal"):
        square = (q.shape[-2], k.shape[-2])
        fill = b.one("Expand", [b.scalar(float("-inf"), dtype), _dims_tensor(b, [q, k], [-2, -2], c.scope)],
                     square, dtype, scope=c.scope)
        causal = b.one("Trilu", [fill, b.scalar(1, "int64")], square, dtype, {"upper": 1}, c.scope)
        scores = b.one("Add", [scores, causal], scores_shape, dtype, scope=c.scope)
    probs = b.one("Softmax", [scores], scores_shape, dtype, {"axis": -1}, c.scope, "probs")
    return b.one("MatMul", [probs, v], shape, dtype, scope=c.scope, base=c.base)


def _dims_tensor(b: Builder, sources, axes, scope) -> Value:
    pieces = []
    for source, axis in zip(sources, axes):
        rank = source.rank
        start = norm_dim(axis, rank)
        pieces.append(b.one("Shape", [source], (1,), "int64", {"start": start, "end": start + 1}, scope).name)
    return b.one("Concat", pieces, (len(pieces),), "int64", {"axis": 0}, scope)


def _repeat_heads(b: Builder, x: Value, heads: int, scope: str) -> Value:
    """[b, kv, s, d] -> [b, heads, s, d], each kv head serving heads/kv query heads."""
    bsz, kv, seq, dim = x.shape
    groups = heads // kv
    wide = b.one("Unsqueeze", [x, b.ints([2])], (bsz, kv, 1, seq, dim), x.dtype, scope=scope)
    wide = b.one("Expand", [wide, b.ints([1, 1, groups, 1, 1])], (bsz, kv, groups, seq, dim), x.dtype, scope=scope)
    return b.one("Reshape", [wide, b.ints([0, heads, -1, dim])], (bsz, heads, seq, dim), x.dtype, scope=scope)
