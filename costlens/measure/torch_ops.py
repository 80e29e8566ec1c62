"""ONNX ops as torch calls, for the graph executor (measure/executor.py).

Only the transformer op set the front ends produce. Each implementation follows the ONNX
operator spec and calls the torch function a PyTorch model would call, so that autograd
saves the same tensors (``F.linear`` for Gemm, ``torch.matmul`` for MatMul, ``F.gelu``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from costlens.errors import CostlensError

OPS: dict[str, Callable] = {}
_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64, 9: torch.bool,
           10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def op(*names: str):
    def register(fn):
        for name in names:
            if name in OPS:
                raise ValueError(f"op {name!r} registered twice")
            OPS[name] = fn
        return fn
    return register


def run_op(node, args: list) -> list:
    fn = OPS.get(node.op)
    if fn is None:
        raise CostlensError(f"the executor cannot run op {node.op!r} (node {node.name!r})")
    result = fn(node, *args)
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _ints(tensor) -> list[int]:
    return [int(v) for v in torch.as_tensor(tensor).reshape(-1).tolist()]


def _axis(node, key: str, default: int) -> int:
    return int(node.attr(key, default))


# --------------------------------------------------------------------------- arithmetic
op("Add")(lambda n, a, b: a + b)
op("Sub")(lambda n, a, b: a - b)
op("Mul")(lambda n, a, b: a * b)
op("Div")(lambda n, a, b: a / b)
op("Neg")(lambda n, x: -x)
op("Sqrt")(lambda n, x: torch.sqrt(x))
op("Reciprocal")(lambda n, x: torch.reciprocal(x))
op("Exp")(lambda n, x: torch.exp(x))
op("Log")(lambda n, x: torch.log(x))
op("Cos")(lambda n, x: torch.cos(x))
op("Sin")(lambda n, x: torch.sin(x))
op("Tanh")(lambda n, x: torch.tanh(x))
op("Erf")(lambda n, x: torch.erf(x))
op("Sigmoid")(lambda n, x: torch.sigmoid(x))
op("Relu")(lambda n, x: F.relu(x))
op("Abs")(lambda n, x: torch.abs(x))
op("Equal")(lambda n, a, b: a == b)
op("Less")(lambda n, a, b: a < b)
op("Greater")(lambda n, a, b: a > b)
op("Not")(lambda n, x: ~x)
op("Identity", "Dropout")(lambda n, x, *rest: x)


@op("Pow")
def _pow(node, x, exponent):
    exponent = exponent.item() if exponent.numel() == 1 else exponent
    return torch.pow(x, exponent)


@op("Where")
def _where(node, condition, x, y):
    return torch.where(condition.bool(), x, y)


@op("Gelu")
def _gelu(node, x):
    return F.gelu(x, approximate=node.attr("approximate", "none"))


@op("Softmax")
def _softmax(node, x):
    return torch.softmax(x, dim=_axis(node, "axis", -1))


@op("Cast")
def _cast(node, x):
    return x.to(_DTYPES[int(node.attr("to"))])


# --------------------------------------------------------------------------- products
@op("MatMul")
def _matmul(node, a, b):
    if a.dim() == 2 and b.dim() >= 3:
        # [t, d] @ [E, d, f]: run it as a batched product over an expanded view, as expert code
        # does; torch.matmul would fold it into one mm over a transposed copy of the weight
        a = a.expand(*b.shape[:-2], *a.shape)
    return torch.matmul(a, b)


@op("Gemm")
def _gemm(node, a, b, c=None):
    if node.attr("transA", 0):
        a = a.t()
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    if node.attr("transB", 0) and alpha == 1.0 and beta == 1.0:
        return F.linear(a, b, c)            # what nn.Linear runs: addmm / mm with the weight's view
    out = alpha * torch.matmul(a, b.t() if node.attr("transB", 0) else b)
    return out if c is None else out + beta * c


# --------------------------------------------------------------------------- norms, reductions
@op("LayerNormalization")
def _layer_norm(node, x, scale, bias=None):
    axis = _axis(node, "axis", -1)
    shape = x.shape[axis:] if axis >= 0 else x.shape[axis:]
    return F.layer_norm(x, shape, scale, bias, eps=float(node.attr("epsilon", 1e-5)))


def _reduce(fn):
    def run(node, x, axes=None):
        dims = _ints(axes) if axes is not None else list(node.attr("axes", ()) or range(x.dim()))
        return fn(x, dim=dims, keepdim=bool(node.attr("keepdims", 1)))
    return run


op("ReduceMean")(_reduce(torch.mean))
op("ReduceSum")(_reduce(torch.sum))


@op("TopK")
def _topk(node, x, k):
    values, indices = torch.topk(x, _ints(k)[0], dim=_axis(node, "axis", -1),
                                 largest=bool(node.attr("largest", 1)), sorted=bool(node.attr("sorted", 1)))
    return values, indices


@op("ScatterElements")
def _scatter(node, data, indices, updates):
    return torch.scatter(data, _axis(node, "axis", 0), indices.long(), updates)


@op("Gather")
def _gather(node, data, indices):
    axis = _axis(node, "axis", 0)
    if indices.dim() == 0:
        return torch.select(data, axis, int(indices))
    if axis == 0 and data.dim() == 2 and data.is_floating_point():
        return F.embedding(indices.long(), data)               # an embedding lookup, as nn.Embedding runs it
    return torch.index_select(data, axis, indices.reshape(-1).long()).reshape(
        data.shape[:axis] + indices.shape + data.shape[axis + 1:])


# --------------------------------------------------------------------------- shapes
@op("Shape")
def _shape(node, x):
    dims = list(x.shape)
    start, end = node.attr("start", 0), node.attr("end", None)
    return torch.tensor(dims[start:end], dtype=torch.int64)


@op("Reshape")
def _reshape(node, x, shape):
    target = _ints(shape)
    if not node.attr("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return torch.reshape(x, target)


@op("Transpose")
def _transpose(node, x):
    perm = node.attr("perm") or tuple(reversed(range(x.dim())))
    return x.permute(*perm)


@op("Unsqueeze")
def _unsqueeze(node, x, axes=None):
    for axis in sorted(a % (x.dim() + len(_ints(axes))) for a in _ints(axes)):
        x = x.unsqueeze(axis)
    return x


@op("Squeeze")
def _squeeze(node, x, axes=None):
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in _ints(axes)), reverse=True):
        x = x.squeeze(axis)
    return x


@op("Concat")
def _concat(node, *xs):
    return torch.cat([x for x in xs if x is not None], dim=_axis(node, "axis", 0))


@op("Split")
def _split(node, x, split=None):
    axis = _axis(node, "axis", 0)
    if split is not None:
        return torch.split(x, _ints(split), dim=axis)
    parts = int(node.attr("num_outputs", len(node.outputs)))
    return torch.chunk(x, parts, dim=axis)


@op("Slice")
def _slice(node, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = x.shape[axis]
        index[axis] = slice(max(min(start, size), -size), max(min(end, size), -size - 1), step)
    return x[tuple(index)]


@op("Expand")
def _expand(node, x, shape):
    target = _ints(shape)
    rank = max(len(target), x.dim())
    dims = [1] * (rank - x.dim()) + list(x.shape)
    target = [1] * (rank - len(target)) + target
    return x.reshape(dims).expand([max(a, b) if a == 1 or b == 1 else b for a, b in zip(dims, target)])


@op("Range")
def _range(node, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@op("ConstantOfShape")
def _constant_of_shape(node, shape):
    value = node.attr("value")
    fill = 0.0
    dtype = torch.float32
    if value is not None:
        from onnx import numpy_helper
        array = numpy_helper.to_array(value)
        fill, dtype = array.reshape(-1)[0].item(), torch.from_numpy(array).dtype
    return torch.full(_ints(shape), fill, dtype=dtype)


@op("Trilu")
def _trilu(node, x, k=None):
    diagonal = _ints(k)[0] if k is not None else 0
    return torch.triu(x, diagonal) if node.attr("upper", 1) else torch.tril(x, diagonal)
