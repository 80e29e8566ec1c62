"""Role locator on onnxruntime-genai model-builder graphs (STYLE pitfall 7).

The fixtures come from ``fixtures/build_contrib.py``: contrib ops written directly with
onnx.helper (GroupQueryAttention with RoPE inside, SkipSimplifiedLayerNormalization carrying
the residual, MoE with 3-D expert weights). Their truth files hold each weight's role and
layer as the builder declared it when creating the weight, never anything from costlens.
"""
from __future__ import annotations

import pytest

from costlens.roles import Role
from conftest import FIXTURES, nonzero, per_layer, truth

GENAI_FIXTURES = ["genai_dense", "genai_moe"]


@pytest.mark.parametrize("name", GENAI_FIXTURES)
def test_role_counts_equal_truth(loaded, name):
    roles, expected = loaded(name).roles, truth(name)
    assert nonzero(roles.params_by_role()) == expected["params_by_role"]
    assert roles.params_total == expected["params_total"]


@pytest.mark.parametrize("name", GENAI_FIXTURES)
def test_per_layer_counts_equal_truth(loaded, name):
    assert per_layer(loaded(name).roles) == truth(name)["params_by_layer"]


@pytest.mark.parametrize("name", GENAI_FIXTURES)
def test_architecture_matches_builder_spec(loaded, name):
    arch, expected = loaded(name).roles.architecture, truth(name)["architecture"]
    for field in ("layers", "hidden", "heads", "kv_heads", "vocab", "experts"):
        assert getattr(arch, field) == expected[field], field
    assert arch.top_k == (expected["top_k"] or None)     # a dense model has no top-k


@pytest.mark.parametrize("name", GENAI_FIXTURES)
def test_each_weight_has_its_declared_role_and_layer(loaded, name):
    # per-layer totals cannot see a norm weight moved to the neighbouring layer (every
    # layer has two norms of 64); this compares weight by weight
    declared = truth(name)["params"]
    found = {p.constant: (p.role.value, p.layer) for p in loaded(name).roles.params if p.n_params}
    assert found == {w: (d["role"], d["layer"]) for w, d in declared.items()}


@pytest.mark.parametrize("name", GENAI_FIXTURES)
def test_rotary_caches_are_buffers_and_nothing_is_unmatched(loaded, name):
    roles = loaded(name).roles
    # cos_cache / sin_cache [64, 8] feed GroupQueryAttention directly (do_rotary=1)
    assert set(truth(name)["buffers"]) <= set(roles.buffers)
    assert roles.unmatched == ()
    assert all(p.role is not Role.OTHER for p in roles.params)


@pytest.mark.parametrize("name", GENAI_FIXTURES)
def test_pre_norm_rotary_and_ffn_width(loaded, name):
    arch = loaded(name).roles.architecture
    assert arch.norm == "rmsnorm"
    assert arch.norm_placement == "pre"     # each sublayer reads a norm; the skip carries the sum
    assert arch.positions == "rotary"       # inside GroupQueryAttention, no Cos/Sin nodes
    assert arch.ffn == truth(name)["architecture"]["ffn"]
    assert arch.head_dim == 64 // 4


def test_fused_attention_and_moe_are_found(loaded):
    dense, moe = loaded("genai_dense").roles, loaded("genai_moe").roles
    for roles in (dense, moe):
        assert [(a.layer, a.kind, a.heads, a.kv_heads) for a in roles.attentions] == [
            (0, "GroupQueryAttention", 4, 2), (1, "GroupQueryAttention", 4, 2)]
        assert all(a.softmax_node is None for a in roles.attentions)
    for attention in dense.attentions:     # separate q, k, v MatMuls
        assert len({attention.q_sites, attention.k_sites, attention.v_sites}) == 3
    for attention in moe.attentions:       # one packed qkv MatMul [64, 64 + 2·32]
        assert attention.q_sites == attention.k_sites == attention.v_sites
    assert [(r.layer, r.n_experts, r.top_k) for r in moe.routers] == [(0, 4, 2), (1, 4, 2)]
    experts = [p for p in moe.params if p.role is Role.EXPERTS]
    # fc1 [4, 2·96, 64] (gate/up interleaved) and fc2 [4, 64, 96] per layer
    assert len(experts) == 2 * 2 and all(p.n_experts == 4 for p in experts)
    assert sum(p.n_params for p in experts) == 2 * 4 * 3 * 64 * 96


@pytest.mark.parametrize("name", GENAI_FIXTURES)
def test_fixture_runs_in_onnxruntime_cpu(name):
    """The fixture is a real graph, not just a valid-looking one: the CPU kernels run it."""
    from build_contrib import check_runs

    assert check_runs(FIXTURES / f"{name}.onnx", batch=1, seq=8) == (1, 8, 512)
