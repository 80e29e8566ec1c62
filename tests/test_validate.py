"""`costlens validate` and the graph executor (needs the torch extra)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")

from click.testing import CliRunner  # noqa: E402

import costlens  # noqa: E402
from conftest import FIXTURES, TORCH_FIXTURES  # noqa: E402
from costlens.cli import main  # noqa: E402
from costlens.gradients import analyze  # noqa: E402
from costlens.measure.executor import GraphExecutor, initializer_values  # noqa: E402
from costlens.plans import parse_plan_spec  # noqa: E402


def run(*args):
    return CliRunner().invoke(main, list(args))


CONTRIB_FIXTURES = ["genai_dense", "genai_moe"]      # onnxruntime-genai dialect (fixtures/build_contrib.py)


@pytest.mark.parametrize("name", TORCH_FIXTURES + CONTRIB_FIXTURES)
def test_executor_reproduces_onnxruntime(name):
    """The graph run as a torch module computes what onnxruntime computes from the same file."""
    import onnxruntime as ort
    path = FIXTURES / f"{name}.onnx"
    model = costlens.load(path)
    plan = parse_plan_spec("full")
    module = GraphExecutor(model, initializer_values(path), analyze(model, plan, {"batch": 2, "seq": 16}), plan)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = module(ids).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    assert np.abs(ours - reference).max() < 1e-3
    # one parameter per structural use, as in the torch module (the tie counted once)
    assert sum(p.numel() for p in module.parameters()) == model.roles.params_total


def test_validate_within_tolerance_json():
    result = run("validate", str(FIXTURES / "llama.onnx"), "--lora", "attn", "--seq", "32", "--batch", "2", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema"] == "costlens.validate/1" and document["ok"]
    by_name = {c["quantity"]: c for c in document["comparisons"]}
    assert by_name["trainable params"]["estimated"] == by_name["trainable params"]["measured"] == 7168
    assert abs(by_name["peak bytes"]["error"]) < 0.05
    assert "measuring two training steps" in result.stderr       # progress goes to stderr


def test_validate_outside_tolerance_exits_1():
    # no estimate is exact to the byte (the measured step also keeps the input ids): zero tolerance fails
    result = run("validate", str(FIXTURES / "gpt2.onnx"), "--seq", "16", "--tolerance", "0")
    assert result.exit_code == 1
    assert "OUTSIDE" in result.stdout


@pytest.mark.parametrize("args, cause", [
    (["--precision", "bf16-mixed"], "fp32"),
    (["--attention", "fused"], "eager"),
    (["--optimizer", "adafactor"], "adamw, sgd or sgd-momentum"),
])
def test_validate_refuses_what_it_cannot_measure(args, cause):
    result = run("validate", str(FIXTURES / "llama.onnx"), "--seq", "16", *args)
    assert result.exit_code == 2 and cause in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_validate_says_which_op_it_cannot_run(monkeypatch):
    from costlens.measure import torch_ops
    monkeypatch.delitem(torch_ops.OPS, "com.microsoft.GroupQueryAttention")
    result = run("validate", str(FIXTURES / "genai_dense.onnx"), "--seq", "16")
    line = result.stderr.splitlines()[-1]
    assert result.exit_code == 2 and "no implementation of" in line and "GroupQueryAttention" in line


def _contrib_variant(tmp_path, name: str, scale: float, attrs: dict):
    """A copy of a genai fixture with its matrices scaled (so that attention and routing are far
    from uniform) and attributes of its contrib ops overridden: {op_type: {attribute: value}}."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(str(FIXTURES / f"{name}.onnx"))
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor)
        if value.dtype == np.float32 and value.ndim >= 2 and "cache" not in tensor.name:
            tensor.CopyFrom(numpy_helper.from_array(value * scale, tensor.name))
    for node in model.graph.node:
        overrides = attrs.get(node.op_type, {})
        kept = [a for a in node.attribute if a.name not in overrides]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute(k, v) for k, v in overrides.items()])
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("name, attrs", [
    ("genai_dense", {}),
    ("genai_dense", {"GroupQueryAttention": {"softcap": 2.0}}),
    ("genai_dense", {"GroupQueryAttention": {"local_window_size": 4}}),
    ("genai_dense", {"GroupQueryAttention": {"rotary_interleaved": 1}}),
    ("genai_moe", {}),
    ("genai_moe", {"MoE": {"normalize_routing_weights": 0}}),
    ("genai_moe", {"MoE": {"activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 0.5}}),
    ("genai_moe", {"MoE": {"k": 1}}),
])
def test_contrib_ops_match_onnxruntime_far_from_uniform(tmp_path, name, attrs):
    """GroupQueryAttention (RoPE, causal, local window, softcap), MoE (routing, SwiGLU variants) and
    the simplified norms as the executor runs them, against onnxruntime, with weights large
    enough that a wrong rotation, mask or gate/up order shows."""
    import onnxruntime as ort
    path = _contrib_variant(tmp_path, name, 8.0, attrs)
    model = costlens.load(path)
    plan = parse_plan_spec("full")
    module = GraphExecutor(model, initializer_values(path), analyze(model, plan, {"batch": 2, "seq": 24}), plan)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = module(ids).numpy()
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy()})[0]
    assert np.abs(reference).max() > 1.0
    assert np.abs(ours - reference).max() < 1e-3


@pytest.mark.parametrize("name, args", [
    ("genai_dense", []),
    ("genai_dense", ["--freeze", "attn"]),
    ("genai_dense", ["--lora", "attn", "--rank", "8"]),
    ("genai_moe", []),
    ("genai_moe", ["--freeze", "attn"]),
    ("genai_moe", ["--lora", "attn", "--rank", "8"]),
    ("genai_moe", ["--train", "router"]),
    ("genai_moe", ["--train", "experts", "--batch", "4", "--seq", "64"]),
])
def test_validate_contrib_graphs_within_tolerance(name, args):
    """Fused GroupQueryAttention / MoE / simplified norms: priced as the executor trains them."""
    result = run("validate", str(FIXTURES / f"{name}.onnx"), "--seq", "32", "--batch", "2", *args, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    by_name = {c["quantity"]: c for c in json.loads(result.stdout)["comparisons"]}
    assert by_name["trainable params"]["estimated"] == by_name["trainable params"]["measured"]
    assert abs(by_name["step FLOPs"]["error"]) < 0.01
    assert abs(by_name["activation bytes"]["error"]) < 0.02 and abs(by_name["peak bytes"]["error"]) < 0.02


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no CUDA device exists")
def test_validate_cuda_without_a_gpu():
    result = run("validate", str(FIXTURES / "llama.onnx"), "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device" in result.stderr


def test_validate_with_onnxruntime_inference_row():
    result = run("validate", str(FIXTURES / "llama.onnx"), "--seq", "32", "--inference", "--json")
    assert result.exit_code == 0, result.stderr
    row = next(c for c in json.loads(result.stdout)["comparisons"] if c["quantity"].startswith("inference"))
    # weights alone are 158,016 x 4 bytes; the session also holds activations and its arena
    assert row["measured"] > 158_016 * 4 and row["tolerance"] is None and row["ok"]


def test_compare_validate_attaches_measurements_to_the_report(tmp_path):
    html = tmp_path / "report.html"
    result = run("compare", str(FIXTURES / "llama.onnx"), "--plan", "lora:lora=attn", "--seq", "32", "--batch", "2",
                 "--validate", "cpu", "--html", str(html), "--json")
    assert result.exit_code == 0, result.stderr
    (plan,) = json.loads(result.stdout)["plans"]
    peak = plan["validation"]["peak bytes"]
    assert abs(peak["error"]) < 0.05 and peak["measured"] > 0
    assert "peak bytes" in html.read_text()
