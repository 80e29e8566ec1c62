"""`costlens inspect` on hostile and broken inputs: one line on stderr, exit 2, never a traceback.

The contract: not an ONNX file, truncated or corrupted file, empty graph, a cyclic graph,
absurd dimensions, a model with no attention found -> one clear line on stderr
(``costlens: error: <message>``) and exit code 2. Ops costlens does not know are listed
by name and count and mark the result incomplete (exit 0). Every bad input is built in
``tmp_path``; the only file read from the repository is ``fixtures/llama.onnx``.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import external_initializer
from costlens.cli import main

FIXTURES = Path(__file__).parent.parent / "fixtures"
LLAMA = FIXTURES / "llama.onnx"

EXIT_BAD_INPUT = 2


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _assert_one_line_error(result, *causes: str) -> str:
    """Exit 2, nothing on stdout, exactly one `costlens: error:` line naming one of ``causes``."""
    assert result.exit_code == EXIT_BAD_INPUT, (result.exit_code, result.output, result.exception)
    # Only the CLI's own sys.exit may end the command: a library exception escaping is a crash.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("costlens: error:"), line
    assert line[len("costlens: error:"):].strip(), "the message after the prefix is empty"
    assert any(cause.lower() in line.lower() for cause in causes), f"{line!r} names none of {causes}"
    assert "Traceback" not in result.output
    assert "Traceback" not in result.stderr
    return line


def _save(model: onnx.ModelProto, path: Path) -> Path:
    # Never onnx.checker: several of these models are invalid on purpose.
    path.write_bytes(model.SerializeToString())
    return path


def _model(nodes, inputs, outputs, initializers=(), name="g") -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _float_input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# --------------------------------------------------------------------------- happy path

def test_inspect_llama_text():
    result = _run("inspect", str(LLAMA))
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Parameters" in result.stdout
    assert "INCOMPLETE" not in result.stdout
    assert result.stderr == ""


def test_inspect_llama_json_roles_partition_params():
    result = _run("inspect", str(LLAMA), "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    document = json.loads(result.stdout)
    assert document["schema"] == "costlens.inspect/1"
    assert document["model"]["incomplete"] is False
    assert document["model"]["unknown_ops"] == {}
    # every parameter gets exactly one role: the roles partition the total
    assert sum(document["params_by_role"].values()) == document["params_total"]
    assert document["params_total"] > 0
    # and the layers plus what is outside them partition it too
    per_layer = sum(layer["params_total"] for layer in document["layers"])
    assert per_layer + document["outside_layers"]["params_total"] == document["params_total"]


# --------------------------------------------------------------------------- not ONNX / unreadable

def test_text_file_named_onnx(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_text("this is not a model, just some text\nwith two lines\n")
    _assert_one_line_error(_run("inspect", str(path)), "not a readable ONNX", "not an ONNX")


@pytest.mark.parametrize("n_bytes", [300_000, 50])
def test_truncated_llama(tmp_path, n_bytes):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(LLAMA.read_bytes()[:n_bytes])
    _assert_one_line_error(_run("inspect", str(path)), "not a readable ONNX", "truncated", "not an ONNX")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "zero.onnx"
    path.write_bytes(b"")
    _assert_one_line_error(_run("inspect", str(path)), "empty")


@pytest.mark.parametrize("name", ["missing.onnx", "missing"])
def test_missing_path(tmp_path, name):
    _assert_one_line_error(_run("inspect", str(tmp_path / name)), "no such")


def test_empty_graph(tmp_path):
    path = _save(_model([], [], []), tmp_path / "empty_graph.onnx")
    _assert_one_line_error(_run("inspect", str(path)), "empty")


def test_cyclic_graph(tmp_path):
    # a = Add(x, b); b = Relu(a): the two nodes feed each other
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["b"], name="relu")]
    path = _save(_model(nodes, [_float_input("x", [2, 4])], [_float_input("a", [2, 4])]), tmp_path / "cycle.onnx")
    _assert_one_line_error(_run("inspect", str(path)), "cycle")


# --------------------------------------------------------------------------- absurd dimensions

@pytest.mark.parametrize("dims", [[2**50, 4], [2**30, 2**30]], ids=["huge-dim", "huge-product"])
def test_absurd_initializer_dims(tmp_path, dims):
    # declared external so no bytes are needed; w.bin is never written (and must never be read)
    weight = external_initializer("w", dims)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = _model(nodes, [_float_input("x", [2, dims[0]])], [_float_input("y", [2, dims[1]])], [weight])
    path = _save(model, tmp_path / "absurd.onnx")
    _assert_one_line_error(_run("inspect", str(path)), "absurd")


@pytest.mark.parametrize("dim", [-3, 2**50])
def test_absurd_graph_input_dim(tmp_path, dim):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    model = _model(nodes, [_float_input("x", [dim, 4])], [_float_input("y", [dim, 4])])
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == dim
    path = _save(model, tmp_path / "bad_input_dim.onnx")
    _assert_one_line_error(_run("inspect", str(path)), "absurd")


# --------------------------------------------------------------------------- no attention

def test_mlp_has_no_attention(tmp_path):
    # x[batch,8] @ w1[8,16] -> Relu -> @ w2[16,4]: a valid model, but no transformer
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [8, 16], [0.0] * 128)
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [16, 4], [0.0] * 64)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    model = _model(nodes, [_float_input("x", ["batch", 8])], [_float_input("y", ["batch", 4])], [w1, w2])
    onnx.checker.check_model(model)          # valid: the only problem is the missing attention
    path = _save(model, tmp_path / "mlp.onnx")
    _assert_one_line_error(_run("inspect", str(path)), "no attention")


# --------------------------------------------------------------------------- unknown ops

@pytest.fixture
def llama_with_unknown_op(tmp_path) -> Path:
    """llama.onnx plus one custom.ops.Frobnicate node reading input_ids into an unused output."""
    model = onnx.load_model(str(LLAMA), load_external_data=False)
    token_input = model.graph.input[0].name
    model.graph.node.append(helper.make_node(
        "Frobnicate", [token_input], ["frobnicated_unused"], name="frobnicate", domain="custom.ops"))
    model.opset_import.append(helper.make_opsetid("custom.ops", 1))
    return _save(model, tmp_path / "llama_frob.onnx")


def test_unknown_op_json_marks_incomplete(llama_with_unknown_op):
    result = _run("inspect", str(llama_with_unknown_op), "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    document = json.loads(result.stdout)
    assert document["model"]["incomplete"] is True
    assert document["model"]["unknown_ops"] == {"custom.ops.Frobnicate": 1}
    # the harmless extra node changes nothing else
    baseline = json.loads(_run("inspect", str(LLAMA), "--json").stdout)
    assert document["params_total"] == baseline["params_total"]
    assert document["params_by_role"] == baseline["params_by_role"]


def test_unknown_op_text_says_incomplete(llama_with_unknown_op):
    result = _run("inspect", str(llama_with_unknown_op))
    assert result.exit_code == 0, (result.output, result.exception)
    assert "INCOMPLETE" in result.stdout
    assert "Frobnicate" in result.stdout
    assert "Traceback" not in result.output


def test_directory_is_one_line_error(tmp_path):
    result = _run("inspect", str(tmp_path))
    _assert_one_line_error(result, "directory")


def test_json_help_names_each_commands_schema():
    """cli.py writes the validate and fit schema names out (their renderers import torch or the
    fit search); they must be the names those renderers put in their documents."""
    from click.testing import CliRunner

    from costlens.cli import main
    from costlens.render.fit import FIT_SCHEMA
    from costlens.render.validate import VALIDATE_SCHEMA
    for command, schema in (("validate", VALIDATE_SCHEMA), ("fit", FIT_SCHEMA), ("plan", "costlens.plan/1"),
                            ("compare", "costlens.plan/1")):
        text = " ".join(CliRunner().invoke(main, [command, "--help"]).stdout.split())
        assert f"Print the {schema} JSON document." in text, command
