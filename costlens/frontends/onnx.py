"""ONNX front end: a model file -> the graph IR, graph only.

Weights are never read: the file is parsed with ``load_external_data=False``, so a model
whose weights sit in a 100 GB external file loads as fast as its graph. Shapes are inferred
symbolically in ``batch`` and ``seq`` with onnxruntime's symbolic shape inference (ONNX's
own inference is the fallback). Because that inference reads initializer *values* where it
can, external initializers are handed to it as typed graph inputs instead.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

from costlens.errors import AbsurdModelError, ModelFormatError, UnsafePathError
from costlens.frontends.onnx_proto import constant_node_value, external_location, infer_shapes, read_model  # noqa: F401
from costlens.ir import BATCH, SEQ, Constant, Graph, Node, Tensor, frozen_map

# A dim larger than this, or a weight with more elements than MAX_ELEMENTS, is no real
# model: the largest published models have single tensors of a few 10^10 elements.
MAX_DIM = 2**40
MAX_ELEMENTS = 2**45
SMALL_VALUE_LIMIT = 64
MAX_LOCATION_CHARS = 4096       # PATH_MAX on Linux; a longer location names no file
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"

_DTYPE_NAMES = {
    TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
    TensorProto.INT16: "int16", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
    TensorProto.BOOL: "bool", TensorProto.FLOAT8E4M3FN: "float8e4m3fn",
    TensorProto.FLOAT8E5M2: "float8e5m2", TensorProto.INT4: "int4", TensorProto.UINT4: "uint4",
}


def dtype_name(elem_type: int, what: str = "a tensor") -> str:
    """The dtype's name; an element type ONNX does not define is a corrupted model."""
    if elem_type in _DTYPE_NAMES:
        return _DTYPE_NAMES[elem_type]
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        raise ModelFormatError(f"{what} has element type {elem_type}, which ONNX does not define "
                               "(corrupted model?)") from None


# --------------------------------------------------------------------------- reading

def resolve_external_path(model_dir: str | os.PathLike, location: str) -> Path:
    """The file an external-data location names, refusing any path that leaves the model's
    folder (the onnx path-traversal CVEs). For stages that must read weights."""
    if not isinstance(location, str) or "\x00" in location or len(location) > MAX_LOCATION_CHARS:
        raise UnsafePathError(f"external data path {_short(str(location))!r} is not a usable file name "
                              "(a NUL byte, or longer than any file system allows)")
    base = Path(model_dir).resolve()
    target = (base / location).resolve()
    if os.path.isabs(location) or (target != base and base not in target.parents):
        raise UnsafePathError(f"external data path {_short(location)!r} leaves the model's folder {base}")
    return target


def _short(name: str, limit: int = 80) -> str:
    """A name as an error message quotes it: at most ``limit`` characters."""
    return name if len(name) <= limit else f"{name[:limit // 2]}...{name[-limit // 4:]} ({len(name):,} characters)"


def read_external_tensor(tensor: TensorProto, model_dir: str | os.PathLike) -> None:
    """Load an external initializer's bytes into ``tensor.raw_data``, for stages that need
    weights: only from a regular file inside the model's folder (``resolve_external_path``),
    with the offset and length checked against the file and the tensor's size."""
    entries = {e.key: e.value for e in tensor.external_data}
    location, name = entries.get("location", ""), _short(tensor.name)
    target = resolve_external_path(model_dir, location)
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise ModelFormatError(f"initializer {name!r}: external-data offset or length is not a number") from None
    if not target.is_file():
        raise ModelFormatError(f"initializer {name!r}: external-data file {_short(location)!r} is not a file "
                               "in the model's folder")
    size = target.stat().st_size
    end = size if length is None else offset + length
    if offset < 0 or end < offset or end > size:
        raise ModelFormatError(f"initializer {name!r}: external data [{offset}, {end}) lies outside "
                               f"{_short(location)!r} ({size:,} bytes)")
    expected = _n_bytes(tensor)
    if expected is not None and expected != end - offset:
        raise ModelFormatError(f"initializer {name!r}: {end - offset:,} bytes of external data for "
                               f"{expected:,} bytes of {dtype_name(tensor.data_type)} {list(tensor.dims)}")
    with open(target, "rb") as handle:
        handle.seek(offset)
        tensor.raw_data = handle.read(end - offset)
    tensor.data_location = TensorProto.DEFAULT
    del tensor.external_data[:]


def _n_bytes(tensor: TensorProto) -> int | None:
    """Bytes a tensor's data takes (None: a dtype without a fixed item size)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    if tensor.data_type in (TensorProto.STRING, TensorProto.INT4, TensorProto.UINT4):
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * itemsize


# --------------------------------------------------------------------------- constants

def _check_dims(what: str, dims) -> None:
    count = 1
    for dim in dims:
        if dim < 0 or dim > MAX_DIM:
            raise AbsurdModelError(f"absurd dimension {dim} in {what}")
        count *= dim
    if count > MAX_ELEMENTS:
        raise AbsurdModelError(f"absurd size ({count} elements) of {what}")


def _constant_from(tensor: TensorProto, name: str, model_dir: Path, warnings: list) -> Constant:
    dims = tuple(int(d) for d in tensor.dims)
    _check_dims(f"initializer {_short(name)!r}", dims)
    location = external_location(tensor)
    if location is not None:
        try:
            resolve_external_path(model_dir, location)
        except UnsafePathError as e:
            warnings.append(f"initializer {name!r}: {e}; it will never be read")
    return Constant(name=name, shape=dims, dtype=dtype_name(tensor.data_type, f"initializer {name!r}"),
                    external=location)


def _small_value(tensor: TensorProto) -> tuple[int, ...] | None:
    if external_location(tensor) is not None:
        return None
    if tensor.data_type not in (TensorProto.INT64, TensorProto.INT32):
        return None
    n = 1
    for d in tensor.dims:
        n *= d
    if n > SMALL_VALUE_LIMIT:
        return None
    try:
        return tuple(int(v) for v in numpy_helper.to_array(tensor).reshape(-1))
    except ValueError:     # raw_data / int fields of another size than dims declare
        raise ModelFormatError(f"constant {_short(tensor.name)!r}: its data does not match its dims "
                               f"{list(tensor.dims)} (corrupted model?)") from None


# --------------------------------------------------------------------------- nodes

def _scope_of(node: onnx.NodeProto) -> str:
    """Deepest module path the torch exporter recorded for this node, or ''."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)   # a Python list literal; never eval'd
            except (ValueError, SyntaxError):
                return ""
            if isinstance(scopes, list) and len(scopes) >= 2:
                return str(scopes[-2])
    return ""


def _attrs_of(node: onnx.NodeProto) -> dict:
    attrs = {}
    for attribute in node.attribute:
        if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            attrs[attribute.name] = "<subgraph>"
            continue
        if attribute.type == onnx.AttributeProto.TENSOR:
            attrs[attribute.name] = attribute.t
            continue
        value = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, list):
            value = tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value)
        attrs[attribute.name] = value
    return attrs


def canonical_op(node: onnx.NodeProto) -> str:
    """The IR op name of an ONNX node: its op type, prefixed by its domain outside the default one
    (``com.microsoft.Attention``)."""
    domain = node.domain
    if domain in ("", "ai.onnx"):
        return node.op_type
    return f"{domain}.{node.op_type}"


def topological_order(model: onnx.ModelProto, available: set[str]) -> list[int]:
    """Kahn's algorithm over tensors; a node waiting forever is on a cycle or reads nothing."""
    nodes = model.graph.node
    producers: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producers[out] = i
    waiting = [0] * len(nodes)
    dependents: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in set(node.input):
            if not name or name in available:
                continue
            if name not in producers:
                raise ModelFormatError(f"node {_short(node.name or node.op_type)!r} reads tensor {_short(name)!r} that nothing produces")
            waiting[i] += 1
            dependents.setdefault(producers[name], []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    order: list[int] = []
    while ready:
        i = ready.pop()
        order.append(i)
        for j in dependents.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        stuck = next(i for i, count in enumerate(waiting) if count > 0)
        raise ModelFormatError(f"the graph has a cycle through node {_short(nodes[stuck].name or nodes[stuck].op_type)!r}")
    # Keep the file's order where it is already valid: stable and familiar to the user.
    return list(range(len(nodes))) if _is_valid_order(model, available) else order


def _is_valid_order(model: onnx.ModelProto, available: set[str]) -> bool:
    seen = set(available)
    for node in model.graph.node:
        if any(name and name not in seen for name in node.input):
            return False
        seen.update(node.output)
    return True


# --------------------------------------------------------------------------- dims

def _token_input_dims(model: onnx.ModelProto, initializers: set[str]) -> dict[str, str]:
    """Map the symbolic dims of the token-id input to ``batch`` and ``seq``.

    The token input is the rank-2 integer graph input that a Gather uses as indices (the
    embedding lookup); its first dim is the batch, its second the sequence."""
    gather_indices = {n.input[1] for n in model.graph.node if n.op_type == "Gather" and len(n.input) > 1}
    renames: dict[str, str] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in (TensorProto.INT64, TensorProto.INT32):
            continue
        dims = tensor_type.shape.dim
        if len(dims) != 2 or value.name not in gather_indices:
            continue
        for dim, canonical in zip(dims, (BATCH, SEQ)):
            if dim.HasField("dim_param") and dim.dim_param:
                renames.setdefault(dim.dim_param, canonical)
        break
    return renames


def _rename_dims(model: onnx.ModelProto, renames: dict[str, str]) -> None:
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]


def _check_input_dims(model: onnx.ModelProto) -> None:
    initializers = {tensor.name for tensor in model.graph.initializer}
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and (dim.dim_value < 0 or dim.dim_value > MAX_DIM):
                raise AbsurdModelError(f"absurd dimension {dim.dim_value} in graph input {_short(value.name)!r}")
            # an empty input is a broken model (inside the graph a zero-size slice is legitimate)
            if dim.HasField("dim_value") and dim.dim_value == 0 and value.name not in initializers:
                raise AbsurdModelError(f"graph input {_short(value.name)!r} has a dimension of 0 (an empty tensor)")


_FLOAT_TYPES = frozenset(("float32", "float16", "bfloat16", "float64"))


# ops whose operands are never legitimately empty in a working model: a product or a softmax
# of zero elements means the graph's shape constants are broken
NONEMPTY_OPERAND_OPS = frozenset({"MatMul", "Gemm", "Softmax", "LogSoftmax", "Einsum"})


def _check_inferred_dims(tensors: dict, nodes=()) -> None:
    """Activations whose inferred dims are negative or astronomical, or empty operands of a
    product or softmax, come from a broken graph (corrupted shape constants); refused here,
    before any cost is computed. Other empty tensors are legitimate (Phi-3's pass-through
    slice q[..., 64:] under full rotary is empty)."""
    for info in tensors.values():
        if info.dtype not in _FLOAT_TYPES or not info.shape:
            continue
        for dim in info.shape:
            if isinstance(dim, int) and (dim < 0 or dim > MAX_DIM):
                what = f"the absurd dimension {dim}"
                raise AbsurdModelError(f"tensor {_short(info.name)!r} has {what} after shape inference "
                                       "(corrupted shape constants?)")
    for node in nodes:
        if node.op not in NONEMPTY_OPERAND_OPS:
            continue
        for name in node.inputs:
            info = tensors.get(name)
            if info is not None and info.shape and 0 in info.shape:
                raise AbsurdModelError(f"tensor {_short(name)!r} into {node.op} {_short(node.name)!r} is empty "
                                       f"(shape {list(info.shape)}) after shape inference (corrupted shape constants?)")


def _dim_of(dim) -> int | str:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param") and dim.dim_param:
        return dim.dim_param
    return "?"


def _tensor_of(value: onnx.ValueInfoProto) -> Tensor:
    tensor_type = value.type.tensor_type
    shape = tuple(_dim_of(d) for d in tensor_type.shape.dim) if tensor_type.HasField("shape") else None
    return Tensor(name=value.name, shape=shape, dtype=dtype_name(tensor_type.elem_type, f"tensor {_short(value.name)!r}"))


# --------------------------------------------------------------------------- entry

def load_onnx(path: str | os.PathLike) -> Graph:
    """Read an ONNX file into the graph IR (no weight bytes are read)."""
    model = read_model(path)
    model_dir = Path(path).resolve().parent
    warnings: list[str] = []
    from costlens.frontends.static_shapes import symbolize   # issue 16 item 0: static exports re-bound
    model = symbolize(model, warnings)
    graph = model.graph

    constants: dict[str, Constant] = {}
    small_values: dict[str, tuple[int, ...]] = {}
    for tensor in graph.initializer:
        constants[tensor.name] = _constant_from(tensor, tensor.name, model_dir, warnings)
        value = _small_value(tensor)
        if value is not None:
            small_values[tensor.name] = value
    _check_input_dims(model)

    graph_inputs = tuple(v.name for v in graph.input if v.name not in constants)
    available = set(constants) | set(graph_inputs)
    order = topological_order(model, available)

    _rename_dims(model, _token_input_dims(model, set(constants)))
    inferred = infer_shapes(model, warnings)
    tensors = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if value.name not in constants:
            tensors[value.name] = _tensor_of(value)

    nodes = []
    for i in order:
        proto = graph.node[i]
        if proto.op_type == "Constant" and proto.domain in ("", "ai.onnx") and _fold_constant_node(
                proto, constants, small_values, model_dir, warnings):
            continue
        nodes.append(Node(
            name=proto.name or f"{proto.op_type}_{i}", op=canonical_op(proto),
            inputs=tuple(proto.input), outputs=tuple(proto.output),
            attrs=frozen_map(_attrs_of(proto)), scope=_scope_of(proto),
        ))
    tensors = {name: info for name, info in tensors.items() if name not in constants}
    _check_inferred_dims(tensors, nodes)
    return Graph(
        nodes=tuple(nodes), tensors=frozen_map(tensors), constants=frozen_map(constants),
        inputs=graph_inputs, outputs=tuple(v.name for v in graph.output), source=str(path),
        small_values=frozen_map(small_values), warnings=tuple(warnings),
    )


def _fold_constant_node(proto, constants, small_values, model_dir, warnings) -> bool:
    """A Constant node holding a tensor is treated like an initializer."""
    value = constant_node_value(proto)
    if value is None or not proto.output:
        return False
    name = proto.output[0]
    constants[name] = _constant_from(value, name, model_dir, warnings)
    small = _small_value(value)
    if small is not None:
        small_values[name] = small
    return True
