"""Lowering rules for ops that make tensors (creation), reduce them, normalize them, and for
symbolic ints (sizes read from the trace).

Part of the registry in ``aten.py`` (imported there). A filled tensor is ``Expand`` of a
scalar over a shape (as torch.onnx writes ``zeros_like``): derived from constants, it can
never be mistaken for a weight.
"""
from __future__ import annotations

from costlens.frontends.aten.core import Call, emit, lowers, norm_dim, shape_list, tensor
from costlens.frontends.irbuild import ONNX_DTYPE_CODES, Builder, Sym, Value

# --------------------------------------------------------------------------- creation

def _fill(b: Builder, c: Call, value, shape_tensor: Value):
    shape, dtype = c.out()
    if shape == ():
        return tensor(b, value, dtype)
    return b.one("Expand", [tensor(b, value, dtype), shape_tensor], shape, dtype, scope=c.scope, base=c.base)


@lowers("aten.zeros", "aten.ones", "aten.full", "aten.empty", "aten.new_zeros", "aten.new_ones", "aten.new_full",
        "aten.new_empty", "aten.empty_strided", "aten.scalar_tensor")
def _create(b, c):
    if c.op in ("aten.ones", "aten.new_ones"):
        value = 1
    elif c.op in ("aten.full", "aten.new_full", "aten.scalar_tensor"):
        value = c.arg("fill_value", "s")
    else:
        value = 0                      # zeros, empty: the values never matter to costs
    size = c.arg("size") or []
    return _fill(b, c, value, shape_list(b, size, c.scope))


@lowers("aten.zeros_like", "aten.ones_like", "aten.full_like", "aten.empty_like", "aten.rand_like",
        "aten.randn_like")
def _create_like(b, c):
    x = c.arg("self")
    value = {"aten.ones_like": 1, "aten.full_like": c.arg("fill_value")}.get(c.op, 0)
    shape = b.one("Shape", [x], (x.rank,), "int64", {"start": 0}, c.scope)
    return _fill(b, c, value, shape)


@lowers("aten.fill")
def _fill_tensor(b, c):
    return _create_like(b, Call("aten.full_like", {"self": c.arg("self"), "fill_value": c.arg("value")},
                                c.outs, c.scope, c.base))


@lowers("aten.arange")
def _arange(b, c):
    shape, dtype = c.out()
    start, end, step = c.arg("start", default=0), c.arg("end"), c.arg("step", default=1)
    bounds = [tensor(b, v, dtype) if not isinstance(v, Sym) else _sym_as(b, v, dtype, c.scope)
              for v in (start, end, step)]
    return b.one("Range", bounds, shape, dtype, scope=c.scope, base=c.base)


def _sym_as(b: Builder, s: Sym, dtype: str, scope: str) -> Value:
    if dtype == "int64":
        return Value(s.scalar, (), "int64")
    return b.one("Cast", [s.scalar], (), dtype, {"to": ONNX_DTYPE_CODES.get(dtype, 1)}, scope)


# --------------------------------------------------------------------------- reductions

_REDUCE = {"aten.mean": "ReduceMean", "aten.sum": "ReduceSum", "aten.amax": "ReduceMax", "aten.amin": "ReduceMin",
           "aten.prod": "ReduceProd", "aten.logsumexp": "ReduceLogSumExp", "aten.norm": "ReduceL2",
           "aten.max": "ReduceMax", "aten.min": "ReduceMin", "aten.all": "ReduceMin", "aten.any": "ReduceMax"}


def _reduce(op: str):
    def rule(b, c):
        x = c.arg("self", "input")
        dims = c.arg("dim")
        keep = int(bool(c.arg("keepdim", default=False)))
        inputs = [x] if dims is None or dims == [] else [x, b.ints([dims] if isinstance(dims, int) else dims)]
        if c.op in ("aten.max", "aten.min") and isinstance(dims, int):     # (values, indices)
            arg = "ArgMax" if c.op == "aten.max" else "ArgMin"
            # its backward scatters through the indices: no input kept (ops/elementwise.py)
            values = emit(b, c, op, inputs, {"keepdims": keep, "selects_index": 1})
            shape, dtype = c.out(1)
            index = b.one(arg, [x], shape, dtype, {"axis": dims, "keepdims": keep}, c.scope)
            return values, index
        return emit(b, c, op, inputs, {"keepdims": keep})
    return rule


for _aten, _onnx in _REDUCE.items():
    lowers(_aten)(_reduce(_onnx))


@lowers("aten.argmax", "aten.argmin")
def _argmax(b, c):
    op = "ArgMax" if c.op == "aten.argmax" else "ArgMin"
    return emit(b, c, op, [c.arg("self")], {"axis": c.arg("dim", default=0) or 0,
                                            "keepdims": int(bool(c.arg("keepdim", default=False)))})


# --------------------------------------------------------------------------- norms

@lowers("aten.layer_norm", "aten.native_layer_norm")
def _layer_norm(b, c):
    x, normalized = c.arg("input"), c.arg("normalized_shape")
    attrs = {"axis": -len(normalized), "epsilon": float(c.arg("eps", default=1e-5))}
    inputs = [x, c.arg("weight"), c.arg("bias")]
    while inputs and inputs[-1] is None:
        inputs.pop()
    if c.op == "aten.layer_norm":
        return emit(b, c, "LayerNormalization", inputs, attrs)
    return tuple(b.node("LayerNormalization", inputs, c.outs, attrs, c.scope, c.base))


@lowers("aten.rms_norm", "aten._fused_rms_norm")
def _rms_norm(b, c):
    x, normalized = c.arg("input"), c.arg("normalized_shape")
    eps = c.arg("eps")
    attrs = {"axis": -len(normalized), "epsilon": float(eps if eps is not None else 1.1920928955078125e-07)}
    inputs = [x] + ([c.arg("weight")] if c.arg("weight") is not None else [])
    result = emit(b, c, "RMSNormalization", inputs, attrs)
    return result if c.op == "aten.rms_norm" else (result, None)


# --------------------------------------------------------------------------- symbolic ints

# Symbolic ints are shared by every module that reads them (the trace reuses them), so the
# nodes that make them belong to no module (scope "").

@lowers("aten.sym_size")
def _sym_size(b, c):
    x, dim = c.arg("self"), norm_dim(c.arg("dim"), c.arg("self").rank)
    vec = b.one("Shape", [x], (1,), "int64", {"start": dim, "end": dim + 1}, "", c.base + "_vec")
    scalar = b.one("Squeeze", [vec, b.ints([0])], (), "int64", scope="", base=c.base)
    return Sym(scalar.name, vec.name, c.outs[0] if c.outs else None)


@lowers("aten.sym_numel")
def _sym_numel(b, c):
    scalar = b.one("Size", [c.arg("self")], (), "int64", scope="", base=c.base)
    return Sym(scalar.name, None, c.outs[0] if c.outs else None)


_SYM_OPS = {"sym.add": "Add", "sym.sub": "Sub", "sym.mul": "Mul", "sym.floordiv": "Div", "sym.truediv": "Div",
            "sym.mod": "Mod", "sym.neg": "Neg", "sym.max": "Max", "sym.min": "Min"}


def _sym_arith(op: str):
    def rule(b, c):
        operands = [tensor(b, v, "int64") for v in c.args.values()]
        scalar = b.one(op, operands, (), "int64", scope="", base=c.base)
        return Sym(scalar.name, None, c.outs[0] if c.outs else None)
    return rule


for _sym, _onnx in _SYM_OPS.items():
    lowers(_sym)(_sym_arith(_onnx))

