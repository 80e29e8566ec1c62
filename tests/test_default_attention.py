"""The default attention is what the source runs (issue 16 item 3).

Truth: transformers itself. A tiny module built from each corpus config without an
``attn_implementation`` reports what transformers picked (``config._attn_implementation``);
costlens's default must be that, shown in the header and the JSON, and an explicit
``--attention`` must win. ``validate`` measures the real module with the same default.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from costlens.cli import main

HF = FIXTURES / "hf"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _transformers_pick(arch: str) -> str:
    """What transformers runs for the corpus config as a user builds it (no attn_implementation)."""
    transformers = pytest.importorskip("transformers")
    data = json.loads((HF / f"{arch}.config.json").read_text())
    config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.config._attn_implementation


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_oss", "mixtral"])
def test_default_is_what_transformers_builds(arch):
    """gemma2 and gpt_oss have no SDPA attention in transformers 5.24: eager; the others sdpa."""
    from costlens.frontends.attention_default import default_attention
    picked = _transformers_pick(arch)
    assert picked in ("sdpa", "eager")
    assert default_attention(str(HF / f"{arch}.config.json")).value == picked


@pytest.mark.parametrize("named, priced", [("eager", "eager"), ("sdpa", "sdpa"), ("flash_attention_2", "fused"),
                                           ("flex_attention", "fused")])
def test_config_attn_implementation_wins_over_the_class(tmp_path, named, priced):
    pytest.importorskip("transformers")
    from costlens.frontends.attention_default import default_attention
    data = json.loads((HF / "llama.config.json").read_text())
    data["attn_implementation"] = named
    (tmp_path / "config.json").write_text(json.dumps(data))
    chosen = default_attention(str(tmp_path))
    assert chosen.value == priced and repr(named) in chosen.why


def test_unknown_config_implementation_is_refused_in_one_line(tmp_path):
    pytest.importorskip("transformers")
    data = json.loads((HF / "llama.config.json").read_text())
    data["attn_implementation"] = "my_kernel"
    (tmp_path / "config.json").write_text(json.dumps(data))
    result = run("plan", tmp_path / "config.json", "--seq", 32)
    assert result.exit_code == 2 and "my_kernel" in result.stderr and "--attention" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # an explicit --attention never asks the config
    assert run("plan", tmp_path / "config.json", "--seq", 32, "--attention", "eager").exit_code == 0


def _plan(source, *extra):
    result = run("plan", source, "--lora", "attn", "--seq", 64, "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_hf_config_defaults_to_sdpa_and_says_why():
    pytest.importorskip("transformers")
    default = _plan(HF / "llama.config.json")
    assert default["setup"]["attention"] == "sdpa"
    assert default["setup"]["derived"]["attention"].startswith("sdpa, ") and "LlamaForCausalLM" in \
        default["setup"]["derived"]["attention"]
    explicit = _plan(HF / "llama.config.json", "--attention", "sdpa")
    assert "attention" not in explicit["setup"]["derived"]
    # the default is exactly the sdpa estimate, and eager keeps the seq x seq probabilities on top
    assert default["plans"][0]["memory_bytes"] == explicit["plans"][0]["memory_bytes"]
    eager = _plan(HF / "llama.config.json", "--attention", "eager")
    assert eager["setup"]["attention"] == "eager"
    assert eager["plans"][0]["memory_bytes"]["activations"] > default["plans"][0]["memory_bytes"]["activations"]
    text = run("plan", HF / "llama.config.json", "--lora", "attn", "--seq", 64).stdout
    assert "sdpa attention" in text and "derived defaults: attention sdpa" in text


def test_class_without_sdpa_defaults_to_eager():
    pytest.importorskip("transformers")
    document = _plan(HF / "gemma2.config.json")
    assert document["setup"]["attention"] == "eager"
    assert "Gemma2ForCausalLM" in document["setup"]["derived"]["attention"]


def test_onnx_keeps_the_attention_its_graph_computes():
    """An ONNX file computes the attention its graph shows: eager, as before (no derived note)."""
    from costlens.frontends.attention_default import default_attention
    document = _plan(FIXTURES / "llama.onnx")
    assert document["setup"]["attention"] == "eager" and "attention" not in document["setup"]["derived"]
    assert "MatMul/Softmax" in default_attention(str(FIXTURES / "llama.onnx")).why
    assert "GroupQueryAttention" in default_attention(str(FIXTURES / "genai_dense.onnx")).why


def test_api_model_carries_the_default():
    pytest.importorskip("transformers")
    import costlens
    model = costlens.load(str(HF / "llama.config.json"))
    assert model.default_attention == "sdpa" and "SDPA" in model.default_attention_why
    assert costlens.load(str(FIXTURES / "llama.onnx")).default_attention == "eager"


def test_validate_measures_the_module_with_the_default():
    """validate on a config: the estimate and the real module both run sdpa (the measured
    transformers module reports its implementation), and they agree within the tolerance."""
    pytest.importorskip("torch")
    result = run("validate", HF / "llama.config.json", "--lora", "attn", "--seq", 32, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["setup"]["attention"] == "sdpa"
