"""ONNX front end: a model file -> the graph IR, graph only.

Weights are not loaded: the file is parsed with ``load_external_data=False``, so a model
whose weights sit in a 100 GB external file loads as fast as its graph. The one exception is
tie detection (``merge_tied_copies``, issue 9): 2-D float initializers whose shapes pair up are
compared where the file holds their data (a sampled block first, memory-mapped, only inside the
model's folder), because an exporter that writes a tied weight twice shows it only in the values. Shapes are inferred
symbolically in ``batch`` and ``seq`` with onnxruntime's symbolic shape inference (ONNX's
own inference is the fallback). Because that inference reads initializer *values* where it
can, external initializers are handed to it as typed graph inputs instead.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    target, offset, end = external_span(tensor, model_dir)
    with open(target, "rb") as handle:
        handle.seek(offset)
        tensor.raw_data = handle.read(end - offset)
    tensor.data_location = TensorProto.DEFAULT
    del tensor.external_data[:]


def external_span(tensor: TensorProto, model_dir: str | os.PathLike) -> tuple[Path, int, int]:
    """(file, start, end) in bytes of an external initializer's data, checked: a regular file
    inside the model's folder, the span inside the file and as long as the tensor's dtype and
    dims need. Raises UnsafePathError or ModelFormatError; nothing is read."""
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
    return target, offset, end


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


# --------------------------------------------------------------------------- ties

# An exporter can write one tensor of the model twice: torch.onnx's TorchScript exporter stores a
# tied lm_head as a transposed copy of the token table under an anonymous name (gpt2:
# ``onnx::MatMul_656 [64, 256]`` beside ``transformer.wte.weight [256, 64]``). Only the values show
# it, so where the file holds them, 2-D float initializers whose shapes pair up are compared.
TIE_SAMPLE = 8                  # rows and columns of the block every candidate is compared on first
TIE_CHUNK_BYTES = 1 << 24       # a full comparison reads slices of about this many bytes at a time
TIE_NODE_PREFIX = "costlens.tie/"
_TIE_TYPES = frozenset((TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE))
_GOLDEN = 0.6180339887498949    # spreads the sampled rows over a dim without a regular stride


@dataclass(frozen=True)
class Tie:
    """Initializer ``copy`` holds exactly the values of ``original`` (``transposed``: of its
    transpose): one tensor of the model, which the graph now reads through a view node."""

    copy: str
    original: str
    transposed: bool


class _TensorBits:
    """Initializer data as unsigned integers of the dtype's width (bit patterns: -0.0, NaN and
    bfloat16 compare exactly), or None where the file does not hold it. External data goes
    through one read-only memory map per file, checked by ``external_span`` (inside the model's
    folder, inside the file): a sampled block touches a few pages, never the whole tensor."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._maps: dict[Path, np.ndarray] = {}
        self._arrays: dict[str, np.ndarray | None] = {}

    def array(self, tensor: TensorProto) -> np.ndarray | None:
        """The tensor's bits shaped as its dims, or None (no data, unreadable, inconsistent)."""
        if tensor.name not in self._arrays:
            try:
                self._arrays[tensor.name] = self._read(tensor)
            except (UnsafePathError, ModelFormatError, OSError, ValueError, TypeError):
                self._arrays[tensor.name] = None   # a graph-only load never needed these bytes
        return self._arrays[tensor.name]

    def _read(self, tensor: TensorProto) -> np.ndarray | None:
        dims = tuple(int(d) for d in tensor.dims)
        width = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        bits = np.dtype(f"<u{width}")
        if external_location(tensor) is not None:
            target, start, end = external_span(tensor, self.model_dir)
            if target not in self._maps:
                self._maps[target] = np.memmap(target, dtype=np.uint8, mode="r")
            return self._maps[target][start:end].view(bits).reshape(dims)
        if tensor.raw_data:
            return np.frombuffer(tensor.raw_data, dtype=bits).reshape(dims)
        values = np.ascontiguousarray(numpy_helper.to_array(tensor))   # float_data / int32_data fields
        if values.size == 0 or values.shape != dims:
            return None
        return values.view(f"<u{values.itemsize}")

    def close(self) -> None:
        """Drop the memory maps (the files close with them)."""
        self._maps.clear()
        self._arrays.clear()


def merge_tied_copies(model: onnx.ModelProto, model_dir: Path, warnings: list) -> tuple[Tie, ...]:
    """Find initializers that are bit-for-bit copies or transposes of another and make each copy a
    view of its original (a Transpose or Identity node just before its first reader), so one tensor
    of the model is one constant: a tie is counted once and trains or freezes as one.

    Only 2-D float initializers whose shape (or its transpose) another one has are read: a
    TIE_SAMPLE x TIE_SAMPLE block of each first (matched by hashing, so many same-shape matrices
    cost one pass), the full tensors only for a pair whose blocks agree. A tensor whose block is
    one repeated value (zeros) is no evidence and is never merged. Where the data is not in the
    file, nothing is merged; a pair that looks like an exporter's tied head is said in ``warnings``."""
    graph = model.graph
    readers = _top_level_readers(graph)
    candidates = _tie_candidates(graph, readers)
    source = _TensorBits(model_dir)
    try:
        ties = _verified_ties(candidates, source, readers)
        _note_unseen_ties(graph, readers, source, ties, warnings)
    finally:
        source.close()
    by_name = {t.name: t for t in graph.initializer}
    for tie in ties:
        copy, original = by_name[tie.copy], by_name[tie.original]
        warnings.append(f"initializer {_short(tie.copy)!r} {list(copy.dims)} is "
                        f"{'the transpose' if tie.transposed else 'a copy'} of {_short(tie.original)!r} "
                        f"{list(original.dims)}, bit for bit: one tensor written twice by the exporter "
                        f"(a tied weight), counted once")
    _rewrite_as_views(graph, ties, readers)
    return ties


def _top_level_readers(graph: onnx.GraphProto) -> dict[str, list[tuple[int, int, str]]]:
    """Per tensor name: (node index, input slot, op type) of every top-level node reading it."""
    readers: dict[str, list[tuple[int, int, str]]] = {}
    for index, node in enumerate(graph.node):
        for slot, name in enumerate(node.input):
            if name:
                readers.setdefault(name, []).append((index, slot, node.op_type))
    return readers


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read anywhere inside the graph's subgraphs (If / Loop / Scan bodies): a constant they
    read from the outer scope is left alone."""
    names: set[str] = set()
    stack = [a.g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    stack += [g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
    while stack:
        sub = stack.pop()
        for node in sub.node:
            names.update(node.input)
            stack += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            stack += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
    return names


def _tie_candidates(graph: onnx.GraphProto, readers: dict) -> list[TensorProto]:
    """2-D float initializers (both dims > 1) read by top-level nodes only, whose dtype and shape
    or transposed shape another such initializer has, in file order."""
    inner = _subgraph_reads(graph)
    matrices = [t for t in graph.initializer
                if t.data_type in _TIE_TYPES and len(t.dims) == 2 and min(t.dims) > 1
                and t.name in readers and t.name not in inner]
    count: dict[tuple, int] = {}
    for tensor in matrices:
        key = (tensor.data_type, tuple(sorted(tensor.dims)))
        count[key] = count.get(key, 0) + 1
    return [t for t in matrices if count[(t.data_type, tuple(sorted(t.dims)))] > 1]


def _sample_rows(size: int) -> np.ndarray:
    """TIE_SAMPLE indices spread over a dim of ``size``; a function of the size alone, so a
    tensor's block and its transpose's block hold the same elements."""
    return np.unique((np.arange(TIE_SAMPLE) * _GOLDEN % 1.0 * size).astype(np.int64))


def _block(values: np.ndarray) -> np.ndarray:
    return values[np.ix_(_sample_rows(values.shape[0]), _sample_rows(values.shape[1]))]


def _verified_ties(candidates: list[TensorProto], source: _TensorBits, readers: dict) -> tuple[Tie, ...]:
    """Candidates whose sampled blocks agree and whose full data then agrees, as ties to the one
    original of each group (``_original_of``)."""
    seen: dict[tuple, list[str]] = {}
    arrays: dict[str, np.ndarray] = {}
    groups = _ParityGroups()
    for tensor in candidates:
        values = source.array(tensor)
        if values is None:
            continue
        block = _block(values)
        if np.all(block == block.flat[0]):
            continue                                # zeros or a fill value: no evidence of one tensor
        arrays[tensor.name] = values
        shape = tuple(values.shape)
        copy_key = (tensor.data_type, shape, block.tobytes())
        transpose_key = (tensor.data_type, shape[::-1], np.ascontiguousarray(block.T).tobytes())
        for key, transposed in ((copy_key, False), (transpose_key, True)):
            for other in seen.get(key, ()):
                if not groups.joined(other, tensor.name) and _same_bits(arrays[other], values, transposed):
                    groups.join(other, tensor.name, transposed)
        seen.setdefault(copy_key, []).append(tensor.name)
    order = {t.name: i for i, t in enumerate(candidates)}
    ties = []
    for members in groups.groups():
        original = _original_of(members, readers, order)
        for member in members:
            if member != original:
                ties.append(Tie(member, original, groups.parity(member) != groups.parity(original)))
    return tuple(sorted(ties, key=lambda t: order[t.copy]))


def _same_bits(a: np.ndarray, b: np.ndarray, transposed: bool) -> bool:
    """Is ``b`` exactly ``a`` (or ``a``'s transpose)? Compared in slices of rows of ``a``."""
    if b.shape != (a.shape[::-1] if transposed else a.shape):
        return False
    step = max(1, TIE_CHUNK_BYTES // max(1, a.shape[1] * a.itemsize))
    for start in range(0, a.shape[0], step):
        right = b[:, start:start + step].T if transposed else b[start:start + step]
        if not np.array_equal(a[start:start + step], right):
            return False
    return True


def _original_of(members: list[str], readers: dict, order: dict) -> str:
    """The name a group of equal tensors keeps: the token table an embedding lookup (Gather) reads,
    else a name the exporter gave (not ``onnx::...``), else the first in the file."""
    def rank(name: str) -> tuple:
        return (not _is_table(name, readers), name.startswith("onnx::"), order[name])
    return min(members, key=rank)


def _is_table(name: str, readers: dict) -> bool:
    """Is ``name`` read as the table of an embedding lookup (Gather's data input)?"""
    return any(op == "Gather" and slot == 0 for _, slot, op in readers.get(name, ()))


class _ParityGroups:
    """Union-find over tensor names where each member knows whether it is its root's transpose."""

    def __init__(self):
        self._parent: dict[str, str] = {}
        self._flip: dict[str, bool] = {}

    def _find(self, name: str) -> tuple[str, bool]:
        flip = False
        while self._parent.get(name, name) != name:
            flip ^= self._flip[name]
            name = self._parent[name]
        return name, flip

    def joined(self, a: str, b: str) -> bool:
        """Are ``a`` and ``b`` already one tensor?"""
        return a in self._parent and b in self._parent and self._find(a)[0] == self._find(b)[0]

    def join(self, a: str, b: str, transposed: bool) -> None:
        """Record that ``b`` is ``a`` (its transpose when ``transposed``)."""
        for name in (a, b):
            self._parent.setdefault(name, name)
            self._flip.setdefault(name, False)
        (root_a, flip_a), (root_b, flip_b) = self._find(a), self._find(b)
        if root_a != root_b:
            self._parent[root_b], self._flip[root_b] = root_a, flip_a ^ flip_b ^ transposed

    def parity(self, name: str) -> bool:
        """Is ``name`` the transpose of its group's root?"""
        return self._find(name)[1]

    def groups(self) -> list[list[str]]:
        """Members of each group of two or more, in the order they were first joined."""
        found: dict[str, list[str]] = {}
        for name in self._parent:
            found.setdefault(self._find(name)[0], []).append(name)
        return [members for members in found.values() if len(members) > 1]


def _rewrite_as_views(graph: onnx.GraphProto, ties: tuple[Tie, ...], readers: dict) -> None:
    """Each copy stops being an initializer: a Transpose (perm [1, 0]) or Identity of its original,
    inserted just before the copy's first reader, produces a tensor of the copy's name, as the
    dynamo exporter writes a tied head (``Transpose(embed_tokens.weight)`` into the head's MatMul)."""
    if not ties:
        return
    copies = {t.copy for t in ties}
    kept = [t for t in graph.initializer if t.name not in copies]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [v for v in graph.input if v.name not in copies]      # IR < 4 lists initializers as inputs
    del graph.input[:]
    graph.input.extend(inputs)
    views = sorted(((min(i for i, _, _ in readers[t.copy]), t) for t in ties), key=lambda p: p[0], reverse=True)
    for position, tie in views:                     # from the back: earlier positions stay valid
        if tie.transposed:
            view = onnx.helper.make_node("Transpose", [tie.original], [tie.copy], name=TIE_NODE_PREFIX + tie.copy,
                                         perm=[1, 0])
        else:
            view = onnx.helper.make_node("Identity", [tie.original], [tie.copy], name=TIE_NODE_PREFIX + tie.copy)
        graph.node.insert(position, view)


_ID_VIEWS = frozenset({"Reshape", "Cast", "Unsqueeze", "Squeeze", "Flatten", "Identity"})


def _note_unseen_ties(graph: onnx.GraphProto, readers: dict, source: _TensorBits, ties, warnings: list) -> None:
    """A token table [V, H] and a head that cannot be compared with it (the file holds no data for
    one of them) is the TorchScript exporter's tied head or a separate head: which one, only the
    values can tell. Both are counted; the note says so (``_is_unseen_head``: that exporter's
    pattern only; the table is what a Gather of the token ids, a graph input, reads)."""
    merged = {t.copy for t in ties} | {t.original for t in ties}
    by_name = {t.name: t for t in graph.initializer if t.data_type in _TIE_TYPES and len(t.dims) == 2}
    producers = {out: node for node in graph.node for out in node.output if out}
    tables = [t for name, t in by_name.items() if name not in merged and _is_token_table(name, graph, readers, producers)]
    for table in tables:
        for name, head in by_name.items():
            if name == table.name or name in merged or not _is_unseen_head(head, table, graph, readers):
                continue
            if source.array(table) is not None and source.array(head) is not None:
                continue                            # compared, and different: two tensors
            warnings.append(f"the head's weight {_short(name)!r} {list(head.dims)} matches the shape of the token "
                            f"table {_short(table.name)!r} {list(table.dims)} and the file holds no weights to "
                            f"compare them: a tied head written as a copy (as torch.onnx's TorchScript exporter "
                            f"does) cannot be seen, so both are counted ({_n_elements(head):,} parameters too many "
                            f"if they are one tensor)")


def _is_token_table(name: str, graph: onnx.GraphProto, readers: dict, producers: dict) -> bool:
    """Does a Gather read ``name`` as its table with indices that are a graph input (through
    reshapes and casts): the token ids, not positions?"""
    graph_inputs = {v.name for v in graph.input}
    for index, slot, op in readers.get(name, ()):
        if op != "Gather" or slot != 0 or len(graph.node[index].input) < 2:
            continue
        tensor = graph.node[index].input[1]
        for _ in range(4):
            if tensor in graph_inputs:
                return True
            node = producers.get(tensor)
            if node is None or node.op_type not in _ID_VIEWS or not node.input:
                break
            tensor = node.input[0]
    return False


# between the head's product and the logits: views, a bias, a final softcap (tanh(x / c) * c)
_TO_LOGITS = frozenset({"Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Add", "Div", "Mul", "Tanh"})


def _is_unseen_head(head: TensorProto, table: TensorProto, graph: onnx.GraphProto, readers: dict) -> bool:
    """Is ``head`` the TorchScript exporter's head weight for this table: a folded constant
    (``onnx::...``), as a MatMul weight [H, V] or a Gemm weight [H, V] or [V, H] (transB), whose
    product becomes a graph output through views, a bias or a softcap?"""
    dims, table_dims = tuple(head.dims), tuple(table.dims)
    if not head.name.startswith("onnx::"):
        return False                # a named head beside the table: the exporter kept two tensors
    outputs = {v.name for v in graph.output}
    for index, slot, op in readers.get(head.name, ()):
        shaped = dims == table_dims[::-1] or (op == "Gemm" and dims == table_dims)
        if op in ("MatMul", "Gemm") and slot == 1 and shaped and _reaches_output(graph, index, readers, outputs):
            return True
    return False


def _reaches_output(graph: onnx.GraphProto, index: int, readers: dict, outputs: set, depth: int = 4) -> bool:
    frontier = [(out, 0) for out in graph.node[index].output]
    while frontier:
        tensor, level = frontier.pop()
        if tensor in outputs:
            return True
        if level < depth:
            frontier += [(out, level + 1) for i, _, op in readers.get(tensor, ()) if op in _TO_LOGITS
                         for out in graph.node[i].output]
    return False


def _n_elements(tensor: TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count


# --------------------------------------------------------------------------- entry

def load_onnx(path: str | os.PathLike) -> Graph:
    """Read an ONNX file into the graph IR (no weight bytes are read, but for the sampled blocks,
    and the full data of a matching pair, that ``merge_tied_copies`` compares)."""
    model = read_model(path)
    model_dir = Path(path).resolve().parent
    warnings: list[str] = []
    from costlens.frontends.static_shapes import symbolize   # issue 16 item 0: static exports re-bound
    model = symbolize(model, warnings)
    merge_tied_copies(model, model_dir, warnings)    # issue 9: a tie the exporter wrote twice is one tensor
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
