"""The ONNX front end: graph only, weights never read, symbolic shapes, constants, order.

``load_onnx`` must work on a model whose external weight file is gone, must never follow an
external-data location out of the model's folder (it only warns: static analysis reads no
weights), and ``resolve_external_path`` is the gate every later stage that reads weights
goes through. Models are built in ``tmp_path``; ``fixtures/llama.onnx`` is the only input read.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
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


# --------------------------------------------------------------------------- ties (issue 9)
# A tiny LM built by hand: input_ids -> Gather(table [V, H]) -> Relu -> head -> logits [b, s, V].
# The TorchScript exporter writes a tied head as an anonymous transposed copy of the table
# (``onnx::MatMul_N`` [H, V]); the front end must see from the values that it is one tensor.
VOCAB, HIDDEN = 12, 6


def _tiny_lm(table, head, gemm: bool = False) -> onnx.ModelProto:
    """``head`` is the MatMul weight [H, V] (or, with ``gemm``, a Gemm weight [V, H] read with transB)."""
    from onnx import numpy_helper
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["h"], name="embed/Gather"),
             helper.make_node("Relu", ["h"], ["a"], name="act")]
    if gemm:
        shape = helper.make_tensor("flat", TensorProto.INT64, [2], [-1, HIDDEN])
        back = helper.make_tensor("back", TensorProto.INT64, [3], [0, 0, VOCAB])
        nodes += [helper.make_node("Constant", [], ["flat_shape"], value=shape),
                  helper.make_node("Reshape", ["a", "flat_shape"], ["a2"], name="flat"),
                  helper.make_node("Gemm", ["a2", "onnx::Gemm_7"], ["l2"], name="lm_head/Gemm", transB=1),
                  helper.make_node("Constant", [], ["back_shape"], value=back),
                  helper.make_node("Shape", ["h"], ["hs"], name="shape"),
                  helper.make_node("Reshape", ["l2", "back_shape"], ["logits"], name="unflat", allowzero=0)]
        names = ("embed.weight", "onnx::Gemm_7")
    else:
        nodes.append(helper.make_node("MatMul", ["a", "onnx::MatMul_7"], ["logits"], name="lm_head/MatMul"))
        names = ("embed.weight", "onnx::MatMul_7")
    inits = [numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32), n) for n, v in zip(names, (table, head))]
    return _model(nodes, [ids], [logits], inits)


def _table(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.02, (VOCAB, HIDDEN)).astype(np.float32)


def _roles(path: Path):
    """The graph and its roles (the tiny LM has no attention, which ``costlens.load`` requires)."""
    from types import SimpleNamespace
    from costlens.roles.locate import locate_roles
    graph = load_onnx(path)
    return SimpleNamespace(graph=graph, roles=locate_roles(graph, require_attention=False))


def test_transposed_copy_of_the_table_is_one_tensor(tmp_path):
    """By hand: one [12, 6] table used twice = 72 parameters, not 144; the head reads the table
    through a Transpose and is tied to it, so freezing either freezes both."""
    table = _table()
    model = _roles(_save(_tiny_lm(table, table.T), tmp_path / "tied.onnx"))
    assert "onnx::MatMul_7" not in model.graph.constants
    view = next(n for n in model.graph.nodes if "onnx::MatMul_7" in n.outputs)
    assert (view.op, view.inputs, view.attr("perm")) == ("Transpose", ("embed.weight",), (1, 0))
    assert model.roles.params_total == VOCAB * HIDDEN
    assert model.roles.architecture.tied_embedding
    head = next(u for u in model.roles.params if u.role.value == "lm_head")
    assert head.tied_to == "embed.weight" and head.n_params == 0
    assert any("is the transpose of 'embed.weight'" in w for w in model.graph.warnings)
    assert model.graph.tensors["logits"].shape == ("batch", "seq", VOCAB)


def test_same_shape_head_with_other_values_is_two_tensors(tmp_path):
    """A head of the tied head's shape but other values (one element differs) is a second tensor:
    2 x 72 parameters, no tie, and nothing to say (both were compared)."""
    table = _table()
    head = table.T.copy()
    head[3, 9] += 1e-3             # column 9 is outside the sampled block: the full compare decides
    model = _roles(_save(_tiny_lm(table, head), tmp_path / "untied.onnx"))
    assert "onnx::MatMul_7" in model.graph.constants
    assert model.roles.params_total == 2 * VOCAB * HIDDEN
    assert not model.roles.architecture.tied_embedding
    assert not [w for w in model.graph.warnings if "transpose" in w or "cannot be seen" in w]
    other = _roles(_save(_tiny_lm(table, _table(seed=1).T), tmp_path / "random.onnx"))
    assert other.roles.params_total == 2 * VOCAB * HIDDEN


def test_identical_copy_read_by_gemm_is_one_tensor(tmp_path):
    """A Gemm(transB=1) head holding an identical [V, H] copy: merged through an Identity."""
    table = _table()
    model = _roles(_save(_tiny_lm(table, table.copy(), gemm=True), tmp_path / "gemm.onnx"))
    view = next(n for n in model.graph.nodes if "onnx::Gemm_7" in n.outputs)
    assert (view.op, view.inputs) == ("Identity", ("embed.weight",))
    assert model.roles.params_total == VOCAB * HIDDEN


def test_constant_tables_are_no_evidence_of_a_tie(tmp_path):
    """Two all-zero matrices are equal but need not be one tensor (an untrained head): not merged."""
    zeros = np.zeros((VOCAB, HIDDEN), np.float32)
    graph = load_onnx(_save(_tiny_lm(zeros, zeros.T), tmp_path / "zeros.onnx"))
    assert "onnx::MatMul_7" in graph.constants
    assert not [n for n in graph.nodes if n.op == "Transpose"]


def _save_external(model: onnx.ModelProto, directory: Path) -> Path:
    for tensor in model.graph.initializer:
        set_external_data(tensor, location="w.bin")
    path = directory / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    return path


def test_tie_is_seen_in_external_data_and_a_note_says_when_it_cannot_be(tmp_path):
    """External weights inside the model's folder are compared (memory-mapped); with the weight
    file gone the count stays two tensors and the result says a tie cannot be seen."""
    table = _table()
    path = _save_external(_tiny_lm(table, table.T), tmp_path)
    assert all(uses_external_data(t) for t in onnx.load_model(str(path), load_external_data=False).graph.initializer)
    assert _roles(path).roles.params_total == VOCAB * HIDDEN
    (tmp_path / "w.bin").unlink()
    weight_free = _roles(path)
    assert weight_free.roles.params_total == 2 * VOCAB * HIDDEN
    notes = [w for w in weight_free.graph.warnings if "cannot be seen" in w]
    assert len(notes) == 1 and "'onnx::MatMul_7' [6, 12]" in notes[0] and f"{VOCAB * HIDDEN:,} parameters" in notes[0]


def test_external_data_outside_the_folder_is_never_compared(tmp_path):
    """A copy whose data lies outside the model's folder is not read for tie detection either."""
    inner = tmp_path / "model"
    inner.mkdir()
    table = _table()
    model = _tiny_lm(table, table.T)
    (tmp_path / "outside.bin").write_bytes(np.ascontiguousarray(table.T).tobytes())
    head = next(t for t in model.graph.initializer if t.name == "onnx::MatMul_7")
    set_external_data(head, location="../outside.bin", offset=0, length=table.nbytes)
    head.ClearField("raw_data")
    graph = load_onnx(_save(model, inner / "m.onnx"))
    assert "onnx::MatMul_7" in graph.constants
    assert any("leaves the model's folder" in w for w in graph.warnings)
    assert any("cannot be seen" in w for w in graph.warnings)
