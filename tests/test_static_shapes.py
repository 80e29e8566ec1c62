"""ONNX files exported with static shapes (issue 16 item 0): re-bound, or refused, never priced
quietly at the exported shape.

Truth for a re-bound graph: the *dynamic* export of the same module (fixtures/hf/llama.dynamo.onnx,
built by fixtures/hf/build.py from the same tiny config and seed) priced at the requested shape.
The static files are exported here, at test time, with the code users run: ``torch.onnx.export``
without ``dynamic_shapes`` / ``dynamic_axes`` (both exporters); those tests skip without torch.
The exported sizes are chosen to collide with model sizes: at [2, 32] batch 2 = kv heads = the GQA
repeat and seq 32 = the k/v projections' width; at [4, 64] batch 4 = heads and seq 64 = hidden.
"""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import FIXTURES
from costlens.cli import main
from costlens.frontends.static_shapes import rebindability, token_input_static_shape

HF = FIXTURES / "hf"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------- real exports

def _export(path, exporter: str, batch: int, seq: int) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    sys.path.insert(0, str(HF))
    import build                           # fixtures/hf/build.py: the corpus's module and wrapper
    wrapper = build._wrap(build.build_model("llama"), ones_mask=exporter == "torchscript")
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    with build._quiet(), torch.no_grad():       # no dynamic_shapes / dynamic_axes: the static default
        if exporter == "dynamo":
            torch.onnx.export(wrapper, (ids,), dynamo=True, input_names=["input_ids"],
                              output_names=["logits"]).save(str(path), external_data=False)
        else:
            torch.onnx.export(wrapper, (ids,), str(path), dynamo=False, input_names=["input_ids"],
                              output_names=["logits"])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("static")
    made = {}

    def get(exporter: str, batch: int, seq: int):
        key = (exporter, batch, seq)
        if key not in made:
            path = folder / f"llama.{exporter}.{batch}x{seq}.onnx"
            _export(path, exporter, batch, seq)
            made[key] = path
        return made[key]
    return get


def _plan(source, *extra):
    result = run("plan", source, "--lora", "attn", "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _figures(document):
    (plan,) = document["plans"]
    return plan["params"], plan["memory_bytes"], plan["flops"]


@pytest.mark.parametrize("exported", [(2, 32), (4, 64)])
@pytest.mark.parametrize("asked", [(8, 128), (3, 50)])
def test_dynamo_static_export_is_rebound_to_the_dynamic_exports_numbers(exports, exported, asked):
    static = exports("dynamo", *exported)
    assert rebindability(static) == (rebindability(static)[0], None)
    shape = ["--batch", asked[0], "--seq", asked[1]]
    for extra in ([], ["--train", "all"]):
        got, truth = _plan(static, *shape, *extra), _plan(HF / "llama.dynamo.onnx", *shape, *extra)
        assert (got["setup"]["batch"], got["setup"]["seq"]) == asked
        assert _figures(got) == _figures(truth)


def test_static_export_defaults_to_its_own_shape_and_says_so(exports):
    static = exports("dynamo", 2, 32)
    document = _plan(static)
    assert (document["setup"]["batch"], document["setup"]["seq"]) == (2, 32)
    assert "static input shape (input_ids [2, 32]" in document["setup"]["derived"]["seq"]
    assert "static input shape" in document["setup"]["derived"]["batch"]
    truth = _plan(HF / "llama.dynamo.onnx", "--batch", 2, "--seq", 32)
    assert _figures(document) == _figures(truth)
    text = run("plan", static, "--lora", "attn").stdout
    assert "batch 2, seq 32," in text and "derived defaults: batch 2, the ONNX file's static input shape" in text


def test_torchscript_static_export_is_refused_at_another_shape(exports):
    """TorchScript folds the shape into int tables and Where/Equal-built expand targets: refused."""
    static = exports("torchscript", 2, 32)
    shape, reason = rebindability(static)
    assert (shape.batch, shape.seq) == (2, 32) and reason
    result = run("plan", static, "--lora", "attn", "--batch", 8, "--seq", 128)
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "static shapes (input_ids [2, 32])" in line and "not batch 8, seq 128" in line
    assert "dynamic_shapes=" in line and "dynamic_axes=" in line
    # at its own shape it is priced as given (the default is that shape); the file itself differs
    # from the dynamic TorchScript export (its mask is folded to constants), so no cross-check here
    own = _plan(static)
    assert (own["setup"]["batch"], own["setup"]["seq"]) == (2, 32)
    assert _figures(own) == _figures(_plan(static, "--batch", 2, "--seq", 32))


# --------------------------------------------------------------------------- hand-built graphs

VOCAB, HIDDEN = 256, 64


def _graph(path, dims, hidden_op: str | None = None, reshape_to=None) -> None:
    """input_ids [dims] -> embedding Gather -> (an op) -> MatMul to the vocabulary -> logits;
    ``reshape_to``: a Reshape of the embeddings to this constant target, then back."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, list(dims))
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    table = helper.make_tensor("table", TensorProto.FLOAT, [VOCAB, HIDDEN], [0.0] * (VOCAB * HIDDEN))
    head = helper.make_tensor("head", TensorProto.FLOAT, [HIDDEN, VOCAB], [0.0] * (VOCAB * HIDDEN))
    nodes, inits, current = [helper.make_node("Gather", ["table", "input_ids"], ["h0"])], [table, head], "h0"
    if hidden_op:
        domain, op = hidden_op.rsplit(".", 1) if "." in hidden_op else ("", hidden_op)
        nodes.append(helper.make_node(op, [current], ["h1"], domain=domain))
        current = "h1"
    if reshape_to is not None:
        inits += [numpy_helper.from_array(__import__("numpy").array(reshape_to, dtype="int64"), "to"),
                  numpy_helper.from_array(__import__("numpy").array([*dims, HIDDEN], dtype="int64"), "back")]
        nodes += [helper.make_node("Reshape", [current, "to"], ["r0"]), helper.make_node("Reshape", ["r0", "back"], ["r1"])]
        current = "r1"
    for w in ("wq", "wk", "wv", "wo"):         # one single-head attention block with its residual
        inits.append(helper.make_tensor(w, TensorProto.FLOAT, [HIDDEN, HIDDEN], [0.0] * HIDDEN * HIDDEN))
    nodes += [helper.make_node("MatMul", [current, w], [f"{w}_out"]) for w in ("wq", "wk", "wv")]
    nodes += [helper.make_node("Transpose", ["wk_out"], ["kt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["wq_out", "kt"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "wv_out"], ["context"]),
              helper.make_node("MatMul", ["context", "wo"], ["attn"]),
              helper.make_node("Add", [current, "attn"], ["resid"]),
              helper.make_node("MatMul", ["resid", "head"], ["logits"])]
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.example", 1)] if hidden_op and "." in hidden_op else [])
    model = helper.make_model(helper.make_graph(nodes, "g", [ids], [logits], inits), opset_imports=opsets)
    path.write_bytes(model.SerializeToString())


def _memory(source, batch, seq):
    return _figures(_plan(source, "--train", "all", "--batch", batch, "--seq", seq))


def test_hand_built_static_graph_is_rebound(tmp_path):
    """Gather -> MatMul: the static [2, 32] file prices (8, 48) as the same graph with dynamic dims."""
    _graph(tmp_path / "static.onnx", [2, 32])
    _graph(tmp_path / "dynamic.onnx", ["batch", "seq"])
    assert _memory(tmp_path / "static.onnx", 8, 48) == _memory(tmp_path / "dynamic.onnx", 8, 48)
    assert _memory(tmp_path / "static.onnx", 8, 48) != _memory(tmp_path / "static.onnx", 2, 32)


def test_reshape_through_a_merged_batch_seq_axis_is_rebound(tmp_path):
    """[2, 32, 64] -> [64, 64] -> [2, 32, 64]: the merged axis is batch x seq (2 x 32 = 64 = hidden)."""
    _graph(tmp_path / "static.onnx", [2, 32], reshape_to=[64, HIDDEN])
    _graph(tmp_path / "dynamic.onnx", ["batch", "seq"])
    assert _memory(tmp_path / "static.onnx", 3, 40) == _memory(tmp_path / "dynamic.onnx", 3, 40)


def test_op_without_a_rule_refuses_the_rebinding(tmp_path):
    _graph(tmp_path / "custom.onnx", [2, 32], hidden_op="com.example.Mystery")
    shape, reason = rebindability(tmp_path / "custom.onnx")
    assert (shape.batch, shape.seq) == (2, 32) and "com.example.Mystery" in reason
    result = run("plan", tmp_path / "custom.onnx", "--seq", 64)
    assert result.exit_code == 2 and "cannot be re-bound" in result.stderr and "com.example.Mystery" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_batch_exported_at_one_is_not_rebound(tmp_path):
    """A dim of 1 looks like a broadcast axis everywhere: the file prices batch 1, seq 32 only."""
    _graph(tmp_path / "one.onnx", [1, 32])
    assert "size 1" in rebindability(tmp_path / "one.onnx")[1]
    assert run("plan", tmp_path / "one.onnx", "--batch", 1, "--seq", 32).exit_code == 0
    result = run("plan", tmp_path / "one.onnx", "--batch", 4)
    assert result.exit_code == 2 and "not batch 4" in result.stderr


def test_partly_static_input_binds_only_its_static_dim(tmp_path):
    """input_ids [batch, 32]: any batch, seq 32 only (the dynamic batch leaves seq unbindable here)."""
    _graph(tmp_path / "seq32.onnx", ["batch", 32])
    assert token_input_static_shape(__import__("onnx").load(str(tmp_path / "seq32.onnx"))).batch is None
    document = _plan(tmp_path / "seq32.onnx", "--batch", 4)
    assert (document["setup"]["batch"], document["setup"]["seq"]) == (4, 32)
    assert run("plan", tmp_path / "seq32.onnx", "--seq", 64).exit_code == 2


def test_dynamic_files_are_untouched():
    assert token_input_static_shape(__import__("onnx").load(str(FIXTURES / "llama.onnx"),
                                                            load_external_data=False)) is None
    assert rebindability(FIXTURES / "llama.onnx") == (None, None)


def test_a_missed_constant_is_caught_by_the_check(exports):
    """The safety net behind the tags: drop one rewrite the tagger found (a RoPE table, a reshape
    target) and the strict shape inference of the result refuses it."""
    import onnx

    from costlens.frontends import static_rebind as ss
    model = onnx.load(str(exports("dynamo", 2, 32)), load_external_data=False)
    static = token_input_static_shape(model)
    shapes, values = ss.static_facts(model)
    for drop in ("table", "target"):
        tagger = ss.Tagger(model, static, shapes, values)
        tagger.run()
        if drop == "table":
            tagger.rewrites.pop(sorted(tagger.rewrites)[0])
        else:
            name = sorted(tagger.entries)[0]
            tagger.entries.pop(name), tagger.uses.pop(name)
        with pytest.raises(ss.NotRebindable, match="do not agree"):
            ss.check(ss.rewrite(model, static, tagger), static, shapes)


def test_fit_refuses_to_search_a_dim_it_cannot_rebind(tmp_path):
    """fit varies batch (or seq): on a graph that prices one shape it would find any size fits."""
    _graph(tmp_path / "one.onnx", [1, 32])
    for search in ("batch", "seq"):
        result = run("fit", tmp_path / "one.onnx", "--memory", "1GiB", "--search", search)
        assert result.exit_code == 2 and f"fit --search {search} varies {search}" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    _graph(tmp_path / "static.onnx", [2, 32])          # re-bindable: searched like a dynamic graph
    _graph(tmp_path / "dynamic.onnx", ["batch", "seq"])
    got = json.loads(run("fit", tmp_path / "static.onnx", "--memory", "64MiB", "--seq", 32, "--json").stdout)
    truth = json.loads(run("fit", tmp_path / "dynamic.onnx", "--memory", "64MiB", "--seq", 32, "--json").stdout)
    assert got["answer"] == truth["answer"] and got["answer"]["batch"] > 2      # searched beyond the export


# --------------------------------------------------------------------------- the Python API (issue 16 leftovers, item 2)

def test_api_estimate_refuses_a_shape_a_static_export_cannot_price(tmp_path):
    """costlens.api.estimate refuses as the CLI does (PlanError with the reason), rather than
    returning the export's numbers labelled with another batch; its own shape is priced."""
    import costlens
    from costlens import api
    from costlens.errors import PlanError
    _graph(tmp_path / "one.onnx", [1, 32])                     # a dim of 1: never re-bound
    _graph(tmp_path / "custom.onnx", [2, 32], hidden_op="com.example.Mystery")   # no rule: not re-bound
    one, custom = api.load(tmp_path / "one.onnx"), api.load(tmp_path / "custom.onnx")
    plan = costlens.Plan(train=("all",))
    with pytest.raises(PlanError, match=r"static shapes \(input_ids \[1, 32\]\).*not batch 4"):
        api.estimate(one, plan, costlens.Setup(batch=4, seq=32))
    with pytest.raises(PlanError, match=r"cannot be re-bound \(.*com\.example\.Mystery.*not seq 64"):
        api.estimate(custom, plan, costlens.Setup(batch=2, seq=64))
    # the unchosen seq is the export's (not the 2048 default the graph cannot price), equal to the CLI's
    own = api.estimate(one, plan, costlens.Setup())
    assert (own.batch, own.seq) == (1, 32)


def test_api_estimate_leaves_rebound_and_dynamic_graphs_alone(tmp_path):
    """A re-bound static graph prices any shape as the same graph written with dynamic dims."""
    import costlens
    from costlens import api
    _graph(tmp_path / "static.onnx", [2, 32])
    _graph(tmp_path / "dynamic.onnx", ["batch", "seq"])
    setup, plan = costlens.Setup(batch=8, seq=48), costlens.Plan(train=("all",))
    got = api.estimate(api.load(tmp_path / "static.onnx"), plan, setup)
    truth = api.estimate(api.load(tmp_path / "dynamic.onnx"), plan, setup)
    assert (got.batch, got.seq) == (8, 48) and got.memory == truth.memory and got.flops.step == truth.flops.step


def test_setup_for_gives_a_static_exports_shape_as_the_cli_does(tmp_path):
    from costlens.api import setup_for
    _graph(tmp_path / "one.onnx", [1, 32])
    assert (setup_for(tmp_path / "one.onnx").batch, setup_for(tmp_path / "one.onnx").seq) == (1, 32)
    with pytest.raises(Exception, match="not batch 4"):
        setup_for(tmp_path / "one.onnx", batch=4)
