"""costlens on graphs written by the REAL onnxruntime-genai model builder (fixtures/genai).

The corpus comes from ``fixtures/genai/build.py``: tiny random-weight transformers models saved with
``save_pretrained`` and converted by ``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``
(contrib ops, fused add+norm, packed qkv, KV-cache inputs/outputs, MoE). The truth files come from
the torch module's own ``named_parameters()`` (HF name rules of fixtures/hf/build.py), never from
costlens. Where the builder writes something the graph cannot tell apart from another model (a
tied head written as a second copy), ``index.json`` says so (``graph_shows``) and the counts are
checked against what the builder wrote instead (``graph_view``: its initializers by their builder
names).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

import costlens
from costlens.estimate import estimate
from costlens.plans import Setup, parse_plan_spec

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "genai"
INDEX_PATH = CORPUS / "index.json"
assert INDEX_PATH.is_file(), f"missing {INDEX_PATH}: run fixtures/genai/build.py (a missing golden fails)"
INDEX = json.loads(INDEX_PATH.read_text())
BUILT = sorted(n for n, e in INDEX["models"].items() if e.get("outcome") == "ok")
SETUP = Setup(batch=2, seq=16)
ARCH_FIELDS = ("layers", "hidden", "heads", "kv_heads", "vocab", "experts")
POSITIONS = {"learned": "learned", "computed": "rotary", "none": "none"}   # truth kind -> costlens name


@functools.lru_cache(maxsize=None)
def _load(name: str):
    return costlens.load(CORPUS / f"{name}.onnx")


def _truth(name: str) -> dict:
    path = CORPUS / f"{name}.truth.json"
    assert path.is_file(), f"missing truth file {path}"
    return json.loads(path.read_text())


def _nonzero_rows(rows: dict) -> dict:
    return {k: {r: v for r, v in row.items() if v} for k, row in rows.items() if any(row.values())}


def _layer_counts(model) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for use in model.roles.params:
        if use.n_params:
            row = counts.setdefault("none" if use.layer is None else str(use.layer), {})
            row[use.role.value] = row.get(use.role.value, 0) + use.n_params
    return counts


def _expected(name: str, key: str) -> dict:
    """The truth where the graph can show it, else what the builder wrote (index graph_view)."""
    entry = INDEX["models"][name]
    return _truth(name)[key] if entry["graph_shows"][key] else entry["graph_view"][key]


def _plans(name: str) -> list[tuple[str, str]]:
    """(name, spec) per default plan; collected at import, so a model that fails to load yields
    one case that fails at run time instead of breaking the collection of the whole file."""
    try:
        return [(name, spec) for spec in costlens.default_plans(_load(name))]
    except Exception as e:  # noqa: BLE001 - reported by the test
        return [(name, f"LOAD-FAILED {type(e).__name__}: {e}")]


# ------------------------------------------------------------------------------- the corpus
def test_corpus_covers_the_builder_archs():
    required = {"llama", "qwen2", "phi3", "mistral", "qwen3", "gpt_oss"}
    assert required <= set(BUILT), f"not built: {sorted(required - set(BUILT))}"
    assert {"gemma", "gemma2"} & set(BUILT)


def test_every_model_has_a_recorded_outcome():
    for name, entry in INDEX["models"].items():
        assert entry.get("outcome"), name
        if entry["outcome"] == "ok":
            assert entry["command"].startswith("python -m onnxruntime_genai.models.builder"), name
            assert (CORPUS / entry["file"]).is_file(), name
    assert INDEX["builder"]["version"]


def test_folder_is_small_and_graph_only():
    import onnx
    from onnx import TensorProto
    total = sum(p.stat().st_size for p in CORPUS.iterdir() if p.is_file())
    assert total < 5_000_000, total
    for name in BUILT:
        model = onnx.load(str(CORPUS / f"{name}.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            numel = 1
            for d in t.dims:
                numel *= d
            if t.data_type == TensorProto.FLOAT and numel > 16:
                assert t.data_location == TensorProto.EXTERNAL and not t.raw_data, t.name
            if t.data_location == TensorProto.EXTERNAL:
                location = {e.key: e.value for e in t.external_data}["location"]
                assert not (CORPUS / location).exists(), location
        names = {i.name for i in model.graph.input}
        assert "input_ids" in names and any(n.startswith("past_key_values") for n in names), name


# ---------------------------------------------------------------------------------- roles
@pytest.mark.parametrize("name", BUILT)
def test_params_by_role_equal_truth(name):
    found = {k: v for k, v in _load(name).roles.params_by_role().items() if v}
    assert found == {k: v for k, v in _expected(name, "params_by_role").items() if v}


@pytest.mark.parametrize("name", BUILT)
def test_params_total_equal_truth(name):
    entry = INDEX["models"][name]
    expected = _truth(name)["params_total"] if entry["graph_shows"]["params_by_role"] \
        else entry["graph_view"]["params_total"]
    assert _load(name).roles.params_total == expected


@pytest.mark.parametrize("name", BUILT)
def test_params_by_layer_equal_truth(name):
    assert _layer_counts(_load(name)) == _nonzero_rows(_expected(name, "params_by_layer"))


@pytest.mark.parametrize("name", BUILT)
def test_architecture_line(name):
    arch, truth = _load(name).roles.architecture, _truth(name)["architecture"]
    found = {f: getattr(arch, f) for f in ARCH_FIELDS} | {"top_k": arch.top_k or 0, "ffn": arch.ffn}
    assert found == {f: truth[f] for f in (*ARCH_FIELDS, "top_k", "ffn")}


@pytest.mark.parametrize("name", BUILT)
def test_architecture_details(name):
    arch, truth = _load(name).roles.architecture, _truth(name)
    found = {"tied_embedding": arch.tied_embedding, "positions": arch.positions, "norm": arch.norm,
             "gated_ffn": arch.gated_ffn, "head_dim": arch.head_dim}
    assert found == {"tied_embedding": truth["tied_embedding"], "positions": POSITIONS[truth["architecture"]["positions"]],
                     "norm": truth["architecture"]["norm"], "gated_ffn": truth["architecture"]["gated_ffn"],
                     "head_dim": INDEX["models"][name]["structure"]["head_dim"]}


@pytest.mark.parametrize("name", BUILT)
def test_rotary_caches_are_buffers(name):
    roles = _load(name).roles
    assert set(INDEX["models"][name]["buffers"]) <= set(roles.buffers)
    assert roles.unmatched == ()


# ---------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("name,spec", [p for n in BUILT for p in _plans(n)])
def test_default_plan_prices(name, spec):
    assert not spec.startswith("LOAD-FAILED"), spec
    result = estimate(_load(name), parse_plan_spec(spec), SETUP)
    assert result.params.trainable > 0


@pytest.mark.parametrize("name", BUILT)
def test_full_plan_is_complete(name):
    """Every op of the builder's graph has a cost rule (no silent zero)."""
    assert dict(estimate(_load(name), parse_plan_spec("full"), SETUP).unsupported_ops) == {}


@pytest.mark.parametrize("name", BUILT)
def test_lora_attn_rank8_trains_only_adapters(name):
    """``costlens plan NAME.onnx --lora attn --rank 8`` (the gpt-oss crash of a previous session)."""
    result = estimate(_load(name), parse_plan_spec("lora=attn;rank=8"), SETUP)
    assert result.params.trainable == result.params.adapter > 0


def _attn_adapter_params(name: str, rank: int) -> int:
    """LoRA on every attention projection weight the graph shows (biases and sinks take none).
    Packed: qkv [D, (H + 2 KV) hd] and o [H hd, D]; unpacked: q [D, H hd], k, v [D, KV hd], o."""
    arch, structure = _truth(name)["architecture"], INDEX["models"][name]["structure"]
    d, hd, h, kv = arch["hidden"], structure["head_dim"], arch["heads"], arch["kv_heads"]
    o = rank * (h * hd + d)
    if structure["qkv_packed"]:
        per_layer = rank * (d + (h + 2 * kv) * hd) + o
    else:
        per_layer = rank * (d + h * hd) + 2 * rank * (d + kv * hd) + o
    return arch["layers"] * per_layer


@pytest.mark.parametrize("name", BUILT)
def test_lora_attn_adapter_count(name):
    # llama packed, r = 8: per layer 8·(64 + 128) + 8·(64 + 64) = 1536 + 1024 = 2560; × 2 layers = 5120
    result = estimate(_load(name), parse_plan_spec("lora=attn;rank=8"), SETUP)
    assert result.params.adapter == _attn_adapter_params(name, 8)


def test_gpt_oss_lora_experts_adapter_count():
    # experts fc1 [E, 2F, D] = [4, 128, 64] and fc2 [E, D, F] = [4, 64, 64], rank 4, one adapter pair
    # per expert and per weight: 4·4·(64 + 128) + 4·4·(64 + 64) = 3072 + 2048 = 5120 per layer;
    # × 2 layers = 10240. The expert BIASES [4, 128] / [4, 64] take no adapter.
    result = estimate(_load("gpt_oss"), parse_plan_spec("lora=experts;rank=4"), SETUP)
    assert result.params.adapter == 10240


def test_gpt_oss_router_and_sinks_are_found():
    roles = _load("gpt_oss").roles
    assert [(r.layer, r.n_experts, r.top_k) for r in roles.routers] == [(0, 4, 2), (1, 4, 2)]
    sinks = [p for p in roles.params if p.constant.endswith(".attn.sinks")]
    assert [(p.role.value, p.layer, p.n_params) for p in sinks] == [("attention", 0, 4), ("attention", 1, 4)]
    assert all(p.kind not in ("q", "k", "v", "o", "qkv") for p in sinks), [p.kind for p in sinks]


@pytest.mark.parametrize("name", BUILT)
def test_lora_q_v_adapts_each_tensor_once(name):
    """peft's default targets (q_proj, v_proj). A packed qkv weight answers to both q and v, but it
    is one tensor: it may take at most one adapter, so q,v can never cost more than all of attn."""
    model = _load(name)
    q_v = estimate(model, parse_plan_spec("lora=q,v;rank=8"), SETUP).params.adapter
    attn = estimate(model, parse_plan_spec("lora=attn;rank=8"), SETUP).params.adapter
    assert 0 < q_v <= attn


def test_lora_q_v_unfused_matches_peft():
    # llama_unfused, r = 8: q [64, 64] 8·(64 + 64) = 1024, v [64, 32] 8·(64 + 32) = 768; × 2 layers = 3584
    result = estimate(_load("llama_unfused"), parse_plan_spec("lora=q,v;rank=8"), SETUP)
    assert result.params.adapter == 3584


@pytest.mark.parametrize("name", BUILT)
def test_norm_placement_is_pre(name):
    """Every model here keeps an un-normalized residual stream (Gemma-2 adds post-sublayer norms,
    "sandwich", but the stream itself is never normalized): the torch.onnx exports of the same
    architectures read "pre"."""
    assert _load(name).roles.architecture.norm_placement == "pre"
