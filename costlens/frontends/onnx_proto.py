"""ONNX protobufs as read, before the IR: parsing a file without its weights, its text fields
checked, and symbolic shape inference in ``batch`` and ``seq`` (onnxruntime's pass, ONNX's as the
fallback). Shared by the ONNX front end (onnx.py) and the static-shape re-binding
(static_shapes.py, static_rebind.py), so neither imports the other's module."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from onnx import TensorProto

from costlens.errors import ModelFormatError


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse the protobuf without external data; every failure becomes a ModelFormatError."""
    path = Path(path)
    if path.is_dir():
        raise ModelFormatError(f"{path}: is a directory, not an ONNX file")
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ModelFormatError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError, TypeError) as e:
        raise ModelFormatError(f"{path}: not a readable ONNX model (truncated or corrupted?): {e}") from e
    if model.ir_version <= 0 or not model.opset_import:
        raise ModelFormatError(f"{path}: not an ONNX model (no IR version or opset)")
    if len(model.graph.node) == 0:
        raise ModelFormatError(f"{path}: the ONNX graph is empty (no nodes)")
    if len(model.graph.output) == 0:
        raise ModelFormatError(f"{path}: the ONNX graph has no outputs (nothing is computed)")
    _check_text(model, path)
    return model


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape_unprintable(text: str) -> str:
    return _UNPRINTABLE.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


def _check_text(model: onnx.ModelProto, path: Path) -> None:
    """Every string field (names, op types, domains, external-data locations) is text, and
    names hold no control characters.

    The upb protobuf runtime hands a string field holding invalid UTF-8 back as ``bytes``
    (a bit-flipped file); everything downstream expects ``str``. Names with newlines, ANSI
    escapes or bidi overrides would reach the terminal and the reports: they are rewritten
    with visible escapes (``\\x1b``), consistently, so the graph stays connected.
    External-data locations are kept exactly (they are file names). Walked with a stack,
    not recursion: subgraphs nest."""
    stack = [model]
    while stack:
        message = stack.pop()
        for field, value in message.ListFields():
            if field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
                continue
            repeated = not (isinstance(value, (str, bytes)) or hasattr(value, "DESCRIPTOR"))
            values = value if repeated else (value,)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if field.name != "external_data":
                    stack.extend(values)
                continue
            for i, text in enumerate(values):
                if not isinstance(text, str):
                    raise ModelFormatError(f"{path}: corrupted ONNX model: the {field.name} of a "
                                           f"{message.DESCRIPTOR.name} is not UTF-8 text ({bytes(text[:40])!r})")
                if _UNPRINTABLE.search(text):
                    if repeated:
                        value[i] = _escape_unprintable(text)
                    else:
                        setattr(message, field.name, _escape_unprintable(text))


def external_location(tensor: TensorProto) -> str | None:
    """The external-data ``location`` an initializer names ("" when the entry is missing), or
    None when its bytes are stored in the file itself. Never opened here."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    entries = {e.key: e.value for e in tensor.external_data}
    return entries.get("location", "")


# --------------------------------------------------------------------------- shapes

def graph_for_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose external initializers are typed graph inputs, so inference never opens
    weight files (STYLE pitfall 6)."""
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    graph = prepared.graph
    keep = []
    for tensor in graph.initializer:
        if external_location(tensor) is None:
            keep.append(tensor)
            continue
        graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]
    return prepared


def symbolic_shape_inference():
    """onnxruntime's SymbolicShapeInference, loaded from its file.

    ``import onnxruntime.tools`` runs a package __init__ that imports torch when torch is
    installed (0.8 s); the inference module itself needs only onnx, numpy and sympy."""
    global _SSI
    if _SSI is None:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("onnxruntime is not installed")
        path = Path(spec.submodule_search_locations[0]) / "tools" / "symbolic_shape_infer.py"
        module_spec = importlib.util.spec_from_file_location("costlens._ort_symbolic_shape_infer", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _SSI = module.SymbolicShapeInference
    return _SSI


_SSI = None


def _run_symbolic(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``SymbolicShapeInference.infer_shapes`` (auto_merge, guess_output_rank) without its
    side effect: when shapes stay incomplete, onnxruntime's version saves the model as
    ``sym_shape_infer_temp.onnx`` plus an external-data file into the current directory.
    Here an incomplete result is None (the caller falls back)."""
    inference_class = symbolic_shape_inference()
    opsets = [o.version for o in model.opset_import if o.domain in ("", "onnx", "ai.onnx")]
    if not opsets or opsets[0] < 7:
        return None
    inference = inference_class(2**31 - 1, True, True, 0)
    # onnxruntime's pass knows ReduceSum's and ReduceMean's axes input but not ReduceMax's
    # (opset 18 moved every reduction's axes to an input): gpt-oss's sink softmax subtracts a
    # row max, and an unknown rank there stops the whole pass.
    for op in ("ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "ReduceL1"):
        inference.dispatcher_.setdefault(op, inference._infer_ReduceSum)
    # The TorchScript exporter spells an MoE's ``x.repeat(1, k, 1)`` as Tile(x, OneHot(..., [1, k]))
    # and the routed slots as Flatten(tile): without these two, tokens*k becomes a fresh symbol per
    # layer and the expert matmuls downstream cannot be priced (issue 9).
    inference.dispatcher_["OneHot"] = lambda node: _infer_one_hot(inference, node)
    inference.dispatcher_["Flatten"] = lambda node: _infer_flatten(inference, node)
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_ if complete else None


def _known_int(value) -> int | None:
    """A shape computation's value as a Python int, if it is one number known now."""
    if value is None:
        return None
    value = _flat(value)
    try:
        return int(value[0]) if len(value) == 1 else None
    except TypeError:                                               # a sympy expression
        return None


def _flat(value) -> list:
    """A known value (list, numpy array or scalar) as the flat list of its elements."""
    if isinstance(value, list):
        return value
    if hasattr(value, "reshape"):
        return list(value.reshape(-1))
    return [value]


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == name), default)


def _set_shape(inference, node, shape: list, elem_type: int) -> None:
    """Record ``shape`` (ints and sympy expressions) as the node's first output's shape."""
    inference._update_computed_dims(shape)
    dims = [int(d) if getattr(d, "is_number", False) or isinstance(d, int) else str(d) for d in shape]
    inference.known_vi_[node.output[0]].CopyFrom(
        onnx.helper.make_tensor_value_info(node.output[0], elem_type, dims))


def _infer_one_hot(inference, node) -> None:
    """OneHot's shape with a literal depth, and its value when indices, depth and values are
    known and the result is one row (a shape computation, like TorchScript's repeats
    ``[1, k, 1]``). onnxruntime's own rule takes a 0-d depth for a symbol and drops the value."""
    depth = _known_int(inference._try_get_value(node, 1))
    indices_shape = inference._get_sympy_shape(node, 0)
    axis = _int_attr(node, "axis", -1)
    axis = axis if axis >= 0 else len(indices_shape) + 1 + axis
    if depth is None:
        inference._infer_OneHot(node)
        return
    shape = [*indices_shape[:axis], depth, *indices_shape[axis:]]
    _set_shape(inference, node, shape, inference.known_vi_[node.input[2]].type.tensor_type.elem_type)
    indices, values = inference._try_get_value(node, 0), inference._try_get_value(node, 2)
    if indices is None or values is None:
        return
    index, values = _known_int(indices), _flat(values)
    if index is None or len(values) != 2:
        return
    index = index + depth if index < 0 else index
    off, on = values
    # one row of ``depth`` entries: onnxruntime keeps values of rank <= 1 as flat lists
    inference.sympy_data_[node.output[0]] = [on if j == index else off for j in range(depth)]


def _infer_flatten(inference, node) -> None:
    """Flatten(x, axis) = [prod(shape[:axis]), prod(shape[axis:])], symbolic products kept
    (onnxruntime has no rule of its own and invents two fresh symbols)."""
    known = inference._try_get_shape(node, 0)
    elem_type = inference.known_vi_[node.input[0]].type.tensor_type.elem_type
    if known is None or any(d is None for d in known):     # an unknown dim: fresh symbols, as before
        _set_shape(inference, node, inference._new_symbolic_shape(2, node), elem_type)
        return
    shape = inference._get_sympy_shape(node, 0)
    axis = _int_attr(node, "axis", 1)
    axis = axis if axis >= 0 else len(shape) + axis
    outer, inner = 1, 1
    for d in shape[:axis]:
        outer = outer * d
    for d in shape[axis:]:
        inner = inner * d
    _set_shape(inference, node, [outer, inner], elem_type)
    if node.input[0] in inference.sympy_data_:      # flat values are unchanged by flattening
        inference.sympy_data_[node.output[0]] = inference.sympy_data_[node.input[0]]


def infer_shapes(model: onnx.ModelProto, warnings: list) -> onnx.ModelProto:
    """A copy of ``model`` with shapes inferred symbolically (onnxruntime's pass; ONNX's own
    when that gives up or fails, said in ``warnings``). Weight files are never opened."""
    prepared = graph_for_inference(model)
    try:
        inferred = _run_symbolic(prepared)
        if inferred is not None:
            return inferred
        warnings.append("symbolic shape inference gave up; fell back to ONNX shape inference")
    except Exception as e:  # noqa: BLE001 - any failure of the optional pass falls back
        warnings.append(f"symbolic shape inference failed ({type(e).__name__}); fell back to ONNX shape inference")
    try:
        return onnx.shape_inference.infer_shapes(prepared, strict_mode=False, data_prop=True)
    except Exception as e:  # noqa: BLE001
        warnings.append(f"ONNX shape inference failed too ({type(e).__name__}); shapes are partial")
        return prepared


def constant_node_value(proto) -> TensorProto | None:
    """The tensor a Constant node holds, whichever attribute form it uses."""
    for attribute in proto.attribute:
        if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
            return attribute.t
        value = onnx.helper.get_attribute_value(attribute)
        if attribute.name == "value_int":
            return onnx.helper.make_tensor("", TensorProto.INT64, [], [value])
        if attribute.name == "value_ints":
            return onnx.helper.make_tensor("", TensorProto.INT64, [len(value)], list(value))
        if attribute.name == "value_float":
            return onnx.helper.make_tensor("", TensorProto.FLOAT, [], [value])
        if attribute.name == "value_floats":
            return onnx.helper.make_tensor("", TensorProto.FLOAT, [len(value)], list(value))
    return None
