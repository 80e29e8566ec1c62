"""Lowering rules for layout, indexing, creation, reductions, norms and routing ops.

Part of the registry in ``aten.py`` (imported there). Shape arguments that hold symbolic
ints become shape-derived tensors (``Shape`` → ``Concat``), so that a table sliced or
indexed by the sequence length reads as a table, not a weight — as in ONNX exports.
"""
from __future__ import annotations

from costlens.frontends.aten import (
    ALIAS, Call, emit, lowers, norm_dim, shape_list, tensor, vector,
)
from costlens.frontends.irbuild import INT64_MAX, Builder, Sym, Value

# --------------------------------------------------------------------------- views

@lowers("aten.view", "aten.reshape", "aten._unsafe_view", "aten._reshape_alias")
def _reshape(b, c):
    x, size = c.arg("self"), c.arg("size", "shape")
    if x.shape is not None and tuple(size) == tuple(x.shape):
        return x
    return emit(b, c, "Reshape", [x, shape_list(b, size, c.scope)], {"allowzero": 0})


@lowers("aten.flatten", "aten.unflatten", "aten.view_as", "aten.reshape_as", "aten.squeeze_copy")
def _reshape_to_output(b, c):
    x = c.arg("self", "input")
    shape, _ = c.out()
    return emit(b, c, "Reshape", [x, _target(b, shape, c.scope)], {"allowzero": 0})


def _target(b: Builder, shape, scope: str) -> Value:
    """A reshape target from an output shape: one symbolic dim becomes -1; more stay unknown."""
    symbolic = [d for d in shape if not isinstance(d, int)]
    if len(symbolic) <= 1:
        return b.ints([d if isinstance(d, int) else -1 for d in shape])
    return b.add_constant(b.fresh("reshape_target"), (len(shape),), "int64")


@lowers("aten.t", "aten.transpose", "aten.permute", "aten.swapaxes", "aten.swapdims", "aten.numpy_T",
        "aten.movedim")
def _transpose(b, c):
    x = c.arg("self", "input")
    rank = x.rank
    if c.op == "aten.permute":
        perm = tuple(norm_dim(d, rank) for d in c.arg("dims"))
    elif c.op == "aten.t" or c.op == "aten.numpy_T":
        perm = tuple(reversed(range(rank)))
    elif c.op == "aten.movedim":
        source, dest = norm_dim(c.arg("source"), rank), norm_dim(c.arg("destination"), rank)
        order = [d for d in range(rank) if d != source]
        order.insert(dest, source)
        perm = tuple(order)
    else:
        d0 = norm_dim(c.arg("dim0", "axis0"), rank)
        d1 = norm_dim(c.arg("dim1", "axis1"), rank)
        order = list(range(rank))
        order[d0], order[d1] = order[d1], order[d0]
        perm = tuple(order)
    if perm == tuple(range(rank)):
        return x
    return emit(b, c, "Transpose", [x], {"perm": perm})


@lowers("aten.unsqueeze")
def _unsqueeze(b, c):
    return emit(b, c, "Unsqueeze", [c.arg("self"), b.ints([c.arg("dim")])])


@lowers("aten.squeeze")
def _squeeze(b, c):
    x, dims = c.arg("self"), c.arg("dim")
    if dims is None:
        return emit(b, c, "Squeeze", [x])
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d for d in dims if x.shape is None or x.shape[d] == 1]
    return emit(b, c, "Squeeze", [x, b.ints(dims)]) if dims else x


@lowers("aten.expand")
def _expand(b, c):
    x, size = c.arg("self"), list(c.arg("size"))
    if x.shape is not None and tuple(size) == tuple(x.shape):
        return x
    # torch's -1 keeps a dim; ONNX Expand broadcasts, where 1 does the same
    size = [1 if isinstance(d, int) and d == -1 else d for d in size]
    return emit(b, c, "Expand", [x, shape_list(b, size, c.scope)])


@lowers("aten.expand_as")
def _expand_as(b, c):
    x, other = c.arg("self"), c.arg("other")
    shape = b.one("Shape", [other], (other.rank,), "int64", {"start": 0}, c.scope)
    return emit(b, c, "Expand", [x, shape])


@lowers("aten.repeat")
def _repeat(b, c):
    return emit(b, c, "Tile", [c.arg("self"), shape_list(b, c.arg("repeats"), c.scope)])


@lowers("aten.repeat_interleave")
def _repeat_interleave(b, c):
    # [.., n, ..] -> Unsqueeze after dim -> Expand r copies -> Reshape: as torch.onnx writes it
    x, repeats, dim = c.arg("self"), c.arg("repeats"), c.arg("dim")
    if not isinstance(repeats, int) or dim is None:
        return None
    dim = norm_dim(dim, x.rank)
    shape, dtype = c.out()
    wide_shape = x.shape[:dim + 1] + (1,) + x.shape[dim + 1:]
    wide = b.one("Unsqueeze", [x, b.ints([dim + 1])], wide_shape, dtype, scope=c.scope)
    copies = [1] * len(wide_shape)
    copies[dim + 1] = repeats
    expanded_shape = wide_shape[:dim + 1] + (repeats,) + wide_shape[dim + 2:]
    expanded = b.one("Expand", [wide, b.ints(copies)], expanded_shape, dtype, scope=c.scope)
    return emit(b, c, "Reshape", [expanded, _target(b, shape, c.scope)], {"allowzero": 0})


# --------------------------------------------------------------------------- slicing

@lowers("aten.slice")
def _slice(b, c):
    x = c.arg("self")
    dim, start, end, step = c.arg("dim", default=0), c.arg("start"), c.arg("end"), c.arg("step", default=1)
    start = 0 if start is None else start
    end = INT64_MAX if end is None else end
    if start == 0 and step == 1 and (end == INT64_MAX or (x.shape and x.shape[dim] == end)):
        return x
    bounds = [_index_vector(b, v, c.scope) for v in (start, end)]
    return emit(b, c, "Slice", [x, *bounds, b.ints([dim]), b.ints([step])])


@lowers("aten.narrow")
def _narrow(b, c):
    x, dim, start, length = c.arg("self"), c.arg("dim"), c.arg("start"), c.arg("length")
    if isinstance(start, int) and isinstance(length, int):
        end = b.ints([start + length])
    else:
        shape, _ = c.out()
        end = b.one("Add", [tensor(b, start, "int64"), tensor(b, length, "int64")], (), "int64", scope=c.scope)
        end = b.one("Unsqueeze", [end, b.ints([0])], (1,), "int64", scope=c.scope)
    return emit(b, c, "Slice", [x, _index_vector(b, start, c.scope), end, b.ints([dim]), b.ints([1])])


def _index_vector(b: Builder, v, scope: str):
    return b.ints([v]) if isinstance(v, int) else vector(b, v, scope)


@lowers("aten.select")
def _select(b, c):
    index = c.arg("index")
    idx = b.scalar(index, "int64") if isinstance(index, int) else Value(index.scalar, (), "int64")
    return emit(b, c, "Gather", [c.arg("self"), idx], {"axis": c.arg("dim")})


@lowers("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.tensor_split", "aten.unsafe_split",
        "aten.unbind", "aten.split_copy")
def _split(b, c):
    x = c.arg("self")
    dim = norm_dim(c.arg("dim", default=0), x.rank)
    sizes = [shape[dim] if shape else None for shape, _ in c.outs]
    inputs = [x]
    attrs = {"axis": dim}
    if all(isinstance(s, int) for s in sizes):
        inputs.append(b.ints(sizes))
    else:
        attrs["num_outputs"] = len(sizes)
    if c.op == "aten.unbind":
        outs = [(None if s is None else s[:dim] + (1,) + s[dim:], t) for s, t in c.outs]
        parts = b.node("Split", inputs, outs, attrs, c.scope, c.base)
        return tuple(b.one("Squeeze", [p, b.ints([dim])], s, t, scope=c.scope) for p, (s, t) in zip(parts, c.outs))
    return tuple(b.node("Split", inputs, c.outs, attrs, c.scope, c.base))


@lowers("aten.cat", "aten.concat", "aten.concatenate")
def _cat(b, c):
    tensors = [t for t in c.arg("tensors") if isinstance(t, Value) and (t.shape is None or 0 not in t.shape)]
    if len(tensors) == 1:
        return tensors[0]
    return emit(b, c, "Concat", tensors, {"axis": c.arg("dim", default=0)})


@lowers("aten.stack")
def _stack(b, c):
    dim = c.arg("dim", default=0)
    parts = []
    for t in c.arg("tensors"):
        axis = norm_dim(dim, (t.rank or 0) + 1)
        shape = None if t.shape is None else t.shape[:axis] + (1,) + t.shape[axis:]
        parts.append(b.one("Unsqueeze", [t, b.ints([dim])], shape, t.dtype, scope=c.scope))
    return emit(b, c, "Concat", parts, {"axis": dim})


# --------------------------------------------------------------------------- indexing

@lowers("aten.embedding")
def _embedding(b, c):
    return emit(b, c, "Gather", [c.arg("weight"), c.arg("indices")], {"axis": 0})


@lowers("aten.index_select")
def _index_select(b, c):
    return emit(b, c, "Gather", [c.arg("self"), c.arg("index")], {"axis": c.arg("dim")})


@lowers("aten.index")
def _index(b, c):
    x, indices = c.arg("self"), list(c.arg("indices"))
    given = [(i, v) for i, v in enumerate(indices) if v is not None]
    if len(given) == 1:
        axis, idx = given[0]
        return emit(b, c, "Gather", [x, tensor(b, idx, "int64")], {"axis": axis})
    return emit(b, c, "GatherND", [x] + [tensor(b, v, "int64") for _, v in given])


@lowers("aten.gather")
def _gather(b, c):
    return emit(b, c, "GatherElements", [c.arg("self"), c.arg("index")], {"axis": c.arg("dim")})


@lowers("aten.scatter", "aten.scatter_add", "aten.scatter_reduce")
def _scatter(b, c):
    x, index, src = c.arg("self"), c.arg("index"), c.arg("src", "value")
    shape, dtype = c.out()
    if not isinstance(src, Value):
        index_shape = b.one("Shape", [index], (index.rank,), "int64", {"start": 0}, c.scope)
        src = b.one("Expand", [tensor(b, src, dtype), index_shape], index.shape, dtype, scope=c.scope)
    reduction = {"aten.scatter_add": "add"}.get(c.op, c.arg("reduce", default="none") or "none")
    reduction = {"sum": "add", "prod": "mul", "amax": "max", "amin": "min"}.get(reduction, reduction)
    return emit(b, c, "ScatterElements", [x, index, src], {"axis": c.arg("dim"), "reduction": reduction})


@lowers("aten.index_put", "aten.index_add", "aten.index_copy")
def _index_put(b, c):
    x = c.arg("self")
    if c.op == "aten.index_put":
        indices = [tensor(b, v, "int64") for v in c.arg("indices") if v is not None]
        values = c.arg("values")
        reduction = "add" if c.arg("accumulate") else "none"
    else:
        indices, values = [c.arg("index")], c.arg("source")
        reduction = "add" if c.op == "aten.index_add" else "none"
    dtype = x.dtype
    return emit(b, c, "ScatterND", [x, *indices, tensor(b, values, dtype)], {"reduction": reduction})


@lowers("aten.topk")
def _topk(b, c):
    k = c.arg("k")
    k_input = b.ints([k]) if isinstance(k, int) else vector(b, k, c.scope)
    attrs = {"axis": c.arg("dim", default=-1), "largest": int(c.arg("largest", default=True)),
             "sorted": int(c.arg("sorted", default=True))}
    return tuple(b.node("TopK", [c.arg("self"), k_input], c.outs, attrs, c.scope, c.base))


@lowers("aten.sort", "aten.argsort")
def _sort(b, c):
    # ONNX has no sort: torch.onnx writes TopK over the whole axis (k from the shape)
    x = c.arg("self")
    dim = norm_dim(c.arg("dim", default=-1), x.rank)
    k = b.one("Shape", [x], (1,), "int64", {"start": dim, "end": dim + 1}, c.scope)
    outs = c.outs if c.op == "aten.sort" else [(c.out()[0], x.dtype), c.out()]
    attrs = {"axis": dim, "largest": int(bool(c.arg("descending", default=False))), "sorted": 1}
    values = b.node("TopK", [x, k], outs, attrs, c.scope, c.base)
    return tuple(values) if c.op == "aten.sort" else values[1]


@lowers("aten.one_hot")
def _one_hot(b, c):
    depth = c.arg("num_classes")
    depth = b.scalar(depth, "int64") if isinstance(depth, int) else Value(depth.scalar, (), "int64")
    return emit(b, c, "OneHot", [c.arg("self"), depth, b.ints([0, 1])], {"axis": -1})


@lowers("aten.triu", "aten.tril")
def _trilu(b, c):
    k = c.arg("diagonal", default=0)
    return emit(b, c, "Trilu", [c.arg("self"), tensor(b, k, "int64")], {"upper": int(c.op == "aten.triu")})


@lowers("aten.cumsum")
def _cumsum(b, c):
    x = c.arg("self")
    shape, dtype = c.out()
    if x.dtype != dtype:
        from costlens.frontends.aten import _cast
        x = _cast(b, Call("aten.to", {"self": x}, [(x.shape, dtype)], c.scope))
    return b.one("CumSum", [x, b.scalar(c.arg("dim"), "int64")], shape, dtype, scope=c.scope, base=c.base)


@lowers("aten.diff")
def _diff(b, c):
    # x[1:] - x[:-1] along dim, after concatenating prepend/append
    x, dim = c.arg("self"), c.arg("dim", default=-1)
    parts = [p for p in (c.arg("prepend"), x, c.arg("append")) if p is not None]
    shape, dtype = c.out()
    if len(parts) > 1:
        axis = norm_dim(dim, x.rank)
        length = sum(p.shape[axis] for p in parts) if all(isinstance(p.shape[axis], int) for p in parts) else None
        joined_shape = None if length is None else x.shape[:axis] + (length,) + x.shape[axis + 1:]
        x = b.one("Concat", parts, joined_shape or shape, x.dtype, {"axis": dim}, c.scope)
    upper = b.one("Slice", [x, b.ints([1]), b.ints([INT64_MAX]), b.ints([dim]), b.ints([1])], shape, x.dtype,
                  scope=c.scope)
    lower_ = b.one("Slice", [x, b.ints([0]), b.ints([-1]), b.ints([dim]), b.ints([1])], shape, x.dtype,
                   scope=c.scope)
    return b.one("Sub", [upper, lower_], shape, dtype, scope=c.scope, base=c.base)


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
    from costlens.frontends.irbuild import ONNX_DTYPE_CODES
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
            values = emit(b, c, op, inputs, {"keepdims": keep})
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

@lowers("aten.sym_size")
def _sym_size(b, c):
    x, dim = c.arg("self"), norm_dim(c.arg("dim"), c.arg("self").rank)
    vec = b.one("Shape", [x], (1,), "int64", {"start": dim, "end": dim + 1}, c.scope, c.base + "_vec")
    scalar = b.one("Squeeze", [vec, b.ints([0])], (), "int64", scope=c.scope, base=c.base)
    return Sym(scalar.name, vec.name, c.outs[0] if c.outs else None)


@lowers("aten.sym_numel")
def _sym_numel(b, c):
    scalar = b.one("Size", [c.arg("self")], (), "int64", scope=c.scope, base=c.base)
    return Sym(scalar.name, None, c.outs[0] if c.outs else None)


_SYM_OPS = {"sym.add": "Add", "sym.sub": "Sub", "sym.mul": "Mul", "sym.floordiv": "Div", "sym.truediv": "Div",
            "sym.mod": "Mod", "sym.neg": "Neg", "sym.max": "Max", "sym.min": "Min"}


def _sym_arith(op: str):
    def rule(b, c):
        operands = [tensor(b, v, "int64") for v in c.args.values()]
        scalar = b.one(op, operands, (), "int64", scope=c.scope, base=c.base)
        return Sym(scalar.name, None, c.outs[0] if c.outs else None)
    return rule


for _sym, _onnx in _SYM_OPS.items():
    lowers(_sym)(_sym_arith(_onnx))

__all__ = ["ALIAS"]
