"""Lowering rules for views, slicing, indexing and routing (TopK, sort) ops.

Part of the registry in ``aten.py`` (imported there). Shape arguments that hold symbolic
ints become shape-derived tensors (``Shape`` → ``Concat``), so that a table sliced or
indexed by the sequence length reads as a table, not a weight — as in ONNX exports.
"""
from __future__ import annotations

from costlens.frontends.aten.core import (
    Call, Unsupported, _cast, emit, lowers, norm_dim, shape_list, tensor, vector,
)
from costlens.frontends.irbuild import INT64_MAX, Builder, Value

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
        raise Unsupported("repeats given as a tensor, or no dim")
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


@lowers("aten.slice_scatter", "aten.select_scatter")
def _slice_scatter(b, c):
    # x[..., a:b] = src, functionalized: torch.onnx writes it as ScatterND (data flows from both
    # x and src; no arithmetic). The index tensor only stands for the written positions.
    x, src = c.arg("self"), c.arg("src")
    return emit(b, c, "ScatterND", [x, b.ints([0]), tensor(b, src, x.dtype)], {"reduction": "none"})


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
