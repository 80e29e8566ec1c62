"""The ONNX front end: graph only, weights never read, symbolic shapes, constants, order.

``load_onnx`` must work on a model whose external weight file is gone, must never follow an
external-data location out of the model's folder (it only warns: static analysis reads no
weights), and ``resolve_external_path`` is the gate every later stage that reads weights
goes through. Models are built in ``tmp_path``; ``fixtures/llama.onnx`` is the only input read.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from onnx.external_data_helper import set_external_data, uses_external_data

from conftest import external_initializer
from costlens.errors import ModelFormatError, UnsafePathError
from costlens.frontends.onnx import load_onnx, read_model, resolve_external_path
from costlens.ir import Graph

FIXTURES = Path(__file__).parent.parent / "fixtures"
LLAMA = FIXTURES / "llama.onnx"

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


@pytest.fixture(scope="module")
def llama() -> Graph:
    return load_onnx(LLAMA)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _assert_topological(graph: Graph) -> None:
    seen = set(graph.inputs) | set(graph.constants)
    for node in graph.nodes:
        missing = [name for name in node.inputs if name and name not in seen]
        assert not missing, f"{node.name} reads {missing} before they are produced"
        seen.update(node.outputs)


# --------------------------------------------------------------------------- external data

def _save_llama_external(directory: Path, floats_only: bool) -> Path:
    """llama.onnx with its float initializers (or all of them) moved to ``w.bin``."""
    model = onnx.load_model(str(LLAMA))
    for tensor in model.graph.initializer:
        if tensor.data_type in FLOAT_TYPES or not floats_only:
            assert tensor.HasField("raw_data"), tensor.name
            set_external_data(tensor, location="w.bin")
    path = directory / "model.onnx"
    # the tensors are already marked; the huge threshold stops save_model from marking more
    onnx.save_model(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=2**62)
    return path


@pytest.mark.parametrize("floats_only", [True, False], ids=["float-initializers", "all-initializers"])
def test_external_data_is_never_read(tmp_path, llama, floats_only):
    path = _save_llama_external(tmp_path, floats_only)
    stored = onnx.load_model(str(path), load_external_data=False)
    n_external = sum(uses_external_data(t) for t in stored.graph.initializer)
    assert n_external == sum(c.is_float or not floats_only for c in llama.constants.values())
    assert n_external > 0
    assert (tmp_path / "w.bin").stat().st_size > 0
    (tmp_path / "w.bin").unlink()                 # any read of weight bytes would now fail

    graph = load_onnx(path)
    assert {n: c.shape for n, c in graph.constants.items()} == {n: c.shape for n, c in llama.constants.items()}
    assert {n: c.dtype for n, c in graph.constants.items()} == {n: c.dtype for n, c in llama.constants.items()}
    for name, const in graph.constants.items():
        expected = "w.bin" if (const.is_float or not floats_only) else None
        assert const.external == expected, name
    # no small integer value can come from a file that is never read
    assert all(graph.constants[name].external is None for name in graph.small_values)
    if floats_only:
        assert dict(graph.small_values) == dict(llama.small_values)
    # the graph itself is untouched, and shape inference never needed the weights
    assert [(n.op, n.inputs, n.outputs) for n in graph.nodes] == [(n.op, n.inputs, n.outputs) for n in llama.nodes]
    assert graph.tensors["logits"].shape == ("batch", "seq", 512)
    assert not any("leaves the model's folder" in w for w in graph.warnings)


def test_read_model_leaves_external_bytes_alone(tmp_path):
    path = _save_llama_external(tmp_path, floats_only=True)
    (tmp_path / "w.bin").unlink()
    model = read_model(path)
    externals = [t for t in model.graph.initializer if uses_external_data(t)]
    assert externals and not any(t.raw_data for t in externals)


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd"])
def test_escaping_external_location_only_warns(tmp_path, location):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    weight = external_initializer("w", [4, 4], location)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [weight])
    graph = load_onnx(_save(model, model_dir / "model.onnx"))
    assert graph.constants["w"].shape == (4, 4)
    assert graph.constants["w"].external == location
    matching = [w for w in graph.warnings if "leaves the model's folder" in w]
    assert len(matching) == 1, graph.warnings
    assert "'w'" in matching[0]


@pytest.mark.parametrize("location", ["../x.bin", "/etc/passwd", "sub/../../x.bin", "..", "a/../../b/w.bin"])
def test_resolve_external_path_refuses_escapes(tmp_path, location):
    with pytest.raises(UnsafePathError, match="leaves the model's folder"):
        resolve_external_path(tmp_path, location)


def test_resolve_external_path_refuses_absolute_path_inside_folder(tmp_path):
    # an absolute location is refused even when it happens to point inside the folder
    with pytest.raises(UnsafePathError):
        resolve_external_path(tmp_path, str(tmp_path / "w.bin"))


def test_resolve_external_path_refuses_symlink_out(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    os.symlink(tmp_path / "secret.bin", model_dir / "w.bin")
    with pytest.raises(UnsafePathError):
        resolve_external_path(model_dir, "w.bin")


@pytest.mark.parametrize("location", ["w.bin", "sub/w.bin", "sub/../w.bin", "./w.bin"])
def test_resolve_external_path_accepts_inside(tmp_path, location):
    target = resolve_external_path(tmp_path, location)
    base = tmp_path.resolve()
    assert base in target.parents
    assert target == (base / location).resolve()
    assert target.name == "w.bin"


# --------------------------------------------------------------------------- symbolic shapes

def test_llama_shapes_are_symbolic_in_batch_and_seq(llama):
    assert llama.outputs == ("logits",)
    assert llama.tensors["logits"].shape == ("batch", "seq", 512)
    assert llama.inputs
    for name in llama.inputs:
        shape = llama.tensors[name].shape
        assert shape, name
        assert all(dim in ("batch", "seq") for dim in shape), (name, shape)
    assert llama.warnings == ()


def test_llama_keeps_file_order_when_valid(llama):
    _assert_topological(llama)
    proto = onnx.load_model(str(LLAMA), load_external_data=False)
    file_ops = [n.op_type for n in proto.graph.node if n.op_type != "Constant"]
    assert [n.op for n in llama.nodes] == file_ops


# --------------------------------------------------------------------------- constants

def _reshape_with_constant_node(constant_first: bool) -> onnx.ModelProto:
    # x[2,4] -> Reshape(x, target=[4,2]) -> y[4,2]; the target comes from a Constant node
    target = helper.make_tensor("target_value", TensorProto.INT64, [2], [4, 2])
    constant = helper.make_node("Constant", [], ["target"], name="const", value=target)
    reshape = helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape")
    nodes = [constant, reshape] if constant_first else [reshape, constant]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])])


@pytest.mark.parametrize("constant_first", [True, False], ids=["in-order", "constant-last"])
def test_constant_node_becomes_a_constant(tmp_path, constant_first):
    model = _reshape_with_constant_node(constant_first)
    if constant_first:
        onnx.checker.check_model(model)
    graph = load_onnx(_save(model, tmp_path / "reshape.onnx"))
    assert "target" in graph.constants
    assert graph.constants["target"].shape == (2,)
    assert graph.constants["target"].dtype == "int64"
    assert graph.constants["target"].external is None
    assert graph.small_values["target"] == (4, 2)
    assert [n.op for n in graph.nodes] == ["Reshape"]
    assert graph.shape("target") == (2,)
    assert graph.tensors["y"].shape == (4, 2)


# --------------------------------------------------------------------------- order

def test_out_of_order_nodes_are_sorted(tmp_path):
    # x -> A:Relu -> a -> B:Neg -> b -> C:Add(b, a) -> y, listed in the file as C, A, B
    a = helper.make_node("Relu", ["x"], ["a"], name="A")
    b = helper.make_node("Neg", ["a"], ["b"], name="B")
    c = helper.make_node("Add", ["b", "a"], ["y"], name="C")
    model = _model([c, a, b], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    graph = load_onnx(_save(model, tmp_path / "shuffled.onnx"))
    assert [n.name for n in graph.nodes] == ["A", "B", "C"]
    _assert_topological(graph)
    assert graph.tensors["y"].shape == ("batch", 4)


def test_cycle_is_a_format_error(tmp_path):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["b"], name="relu")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])])
    with pytest.raises(ModelFormatError, match="cycle"):
        load_onnx(_save(model, tmp_path / "cycle.onnx"))


def test_dangling_input_is_a_format_error(tmp_path):
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(ModelFormatError, match="ghost"):
        load_onnx(_save(model, tmp_path / "dangling.onnx"))


def test_constant_node_with_value_ints_becomes_a_constant(tmp_path):
    const = helper.make_node("Constant", [], ["target"], value_ints=[4, 2])
    reshape = helper.make_node("Reshape", ["x", "target"], ["y"])
    model = _model([const, reshape], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    graph = load_onnx(_save(model, tmp_path / "ints.onnx"))
    assert graph.small_values["target"] == (4, 2)
    assert [n.op for n in graph.nodes] == ["Reshape"]
    assert "target" not in graph.tensors   # constants are never activations
