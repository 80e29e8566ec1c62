"""Hub ids (org/name): config.json from a pre-populated cache, never the network.

The cache is built here in the hub's layout (models--org--name/refs/main holding a commit,
snapshots/<commit>/config.json); HF_HUB_OFFLINE=1 and HF_HUB_CACHE point at it in every test.
Parameter counts are hand arithmetic for the tiny LLaMA config below.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

from costlens.cli import main  # noqa: E402
from costlens.frontends.hub import is_hub_id  # noqa: E402

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256,
        "max_position_embeddings": 256, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
MAIN, OTHER = "a" * 40, "b" * 40


def tiny_params(layers: int) -> int:
    # D=64, head_dim 16, kv width 2*16=32, F=128, V=256
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64   # q k v o, gate up down, 2 norms = 36,992
    return 256 * 64 + layers * per_layer + 64 + 256 * 64                       # embed, blocks, final norm, head


def _snapshot(cache, repo: str, commit: str, config: dict, ref: str | None = "main") -> None:
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / commit / "config.json").write_text(json.dumps(config))
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was called over the network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    _snapshot(root, "org/tiny-llama", MAIN, TINY)
    _snapshot(root, "org/tiny-llama", OTHER, {**TINY, "num_hidden_layers": 3}, ref="v2")
    return root


def _run(*args):
    return CliRunner().invoke(main, list(args))


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("costlens: error:"), result.stderr
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.mark.parametrize("text, expected", [
    ("meta-llama/Llama-3.1-8B", True), ("org/tiny-llama", True), ("Qwen/Qwen1.5-MoE-A2.7B", True),
    ("models:llama_like", False), ("fixtures/llama.onnx", False), ("benchmarks/configs/llama3-8b.json", False),
    ("gpt2", False), ("a/b/c", False), ("/abs/path", False), ("org/bad--name", False), ("org/..", False),
])
def test_hub_id_rule(text, expected):
    assert is_hub_id(text) is expected


def test_hub_id_priced_as_its_config_json(cache, tmp_path):
    local = tmp_path / "config.json"
    local.write_text(json.dumps(TINY))
    from_hub = _run("plan", "org/tiny-llama", "--lora", "attn", "--seq", "32", "--json")
    from_file = _run("plan", str(local), "--lora", "attn", "--seq", "32", "--json")
    assert from_hub.exit_code == 0, from_hub.output
    hub_doc, file_doc = json.loads(from_hub.stdout), json.loads(from_file.stdout)
    assert hub_doc["model"]["source"] == "org/tiny-llama"
    assert hub_doc["model"]["params_total"] == tiny_params(2) == 106_816
    assert hub_doc["plans"] == file_doc["plans"]


def test_revision_selects_the_snapshot(cache):
    for revision in (OTHER, "v2"):
        result = _run("inspect", "org/tiny-llama", "--revision", revision, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["params_total"] == tiny_params(3) == 143_808


def test_missing_id_offline_is_one_line(cache):
    _one_line_error(_run("inspect", "org/not-cached"), "org/not-cached", "HF_HUB_OFFLINE")
    _one_line_error(_run("inspect", "org/tiny-llama", "--revision", "c" * 40), "org/tiny-llama@" + "c" * 40)


@pytest.mark.parametrize("config, needle", [
    ({**TINY, "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}, "auto_map"),
    ({**TINY, "model_type": "surely-not-a-transformers-model"}, "surely-not-a-transformers-model"),
])
def test_remote_code_is_refused(cache, config, needle):
    _snapshot(cache, "org/custom", MAIN, config)
    _one_line_error(_run("plan", "org/custom"), "trust_remote_code models are not supported", needle)


def test_local_path_wins_over_hub_id(cache, tmp_path, monkeypatch):
    folder = tmp_path / "work" / "org" / "tiny-llama"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**TINY, "num_hidden_layers": 3}))
    monkeypatch.chdir(tmp_path / "work")
    result = _run("inspect", "org/tiny-llama", "--json")
    assert json.loads(result.stdout)["params_total"] == tiny_params(3)        # the folder, not the cache's 2 layers
    _one_line_error(_run("inspect", "org/tiny-llama", "--revision", "v2"), "--revision applies to")


def test_python_api(cache):
    import costlens
    assert costlens.load("org/tiny-llama").roles.params_total == tiny_params(2)
    assert costlens.load("org/tiny-llama", revision="v2").roles.params_total == tiny_params(3)
    with pytest.raises(costlens.CostlensError, match="revision applies"):
        costlens.load("fixtures/llama.onnx", revision="main")


def test_online_asks_for_config_json_only_with_the_token(cache, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants
    calls = []

    def fake_download(repo_id, filename, **kwargs):           # stands in for the network: records the request
        calls.append((repo_id, filename, kwargs))
        return str(cache / "models--org--tiny-llama" / "snapshots" / OTHER / "config.json")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    result = _run("inspect", "org/tiny-llama", "--revision", "v2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["params_total"] == tiny_params(3)
    assert [(repo, name) for repo, name, _ in calls] == [("org/tiny-llama", "config.json")]
    assert calls[0][2]["revision"] == "v2" and calls[0][2]["token"] == "hf_test_token"
    assert calls[0][2]["cache_dir"] == cache


def test_fit_and_compare_take_hub_ids(cache):
    fitted = _run("fit", "org/tiny-llama", "--memory", "64MiB", "--lora", "attn", "--seq", "32", "--json")
    assert fitted.exit_code == 0, fitted.output
    assert json.loads(fitted.stdout)["model"]["params_total"] == tiny_params(2)
    compared = _run("compare", "org/tiny-llama", "--revision", "v2", "--seq", "32", "--json")
    assert compared.exit_code == 0 and json.loads(compared.stdout)["model"]["params_total"] == tiny_params(3)
