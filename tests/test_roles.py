"""Role locator against truth files derived from the torch modules' own parameter names."""
from __future__ import annotations

import onnx
import pytest

import costlens
from costlens.roles import Role
from conftest import FIXTURES, TORCH_FIXTURES, nonzero, per_layer, truth
from anonymize import anonymize


@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_role_counts_equal_truth(loaded, name):
    model, expected = loaded(name), truth(name)
    assert model.roles.params_total == expected["params_total"]
    assert nonzero(model.roles.params_by_role()) == expected["params_by_role"]


@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_per_layer_counts_equal_truth(loaded, name):
    assert per_layer(loaded(name).roles) == truth(name)["params_by_layer"]


@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_architecture_matches_module_config(loaded, name):
    arch, expected = loaded(name).roles.architecture, truth(name)["architecture"]
    for field in ("layers", "hidden", "heads", "kv_heads", "vocab", "experts"):
        assert getattr(arch, field) == expected[field], field
    assert arch.ffn == expected["ffn"]
    assert arch.top_k == (expected["top_k"] or None)
    assert arch.tied_embedding == truth(name)["tied_embedding"]


@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_roles_partition_the_total_and_nothing_is_unmatched(loaded, name):
    roles = loaded(name).roles
    assert sum(roles.params_by_role().values()) == roles.params_total
    assert roles.unmatched == ()
    assert all(p.role is not Role.OTHER for p in roles.params)


@pytest.mark.parametrize("name", ["gpt2", "llama", "moe_fused", "stacked_ffn", "bert"])
def test_anonymized_copy_gives_the_same_roles(tmp_path, name):
    """Names and exporter metadata are hints: with all of them gone the answer is the same."""
    path = tmp_path / f"{name}_anon.onnx"
    onnx.save(anonymize(onnx.load(str(FIXTURES / f"{name}.onnx"))), str(path))
    model = costlens.load(path)
    assert nonzero(model.roles.params_by_role()) == truth(name)["params_by_role"]
    assert per_layer(model.roles) == truth(name)["params_by_layer"]
    assert all(p.hint == "" for p in model.roles.params)


def test_deduplicated_norm_weight_counts_once_per_use(loaded):
    # the exporter folds the five all-ones RMSNorm weights of llama into one initializer:
    # 2 layers x 2 norms + final norm = 5 uses of 64 elements each
    roles = loaded("llama").roles
    norm_uses = [p for p in roles.params if p.role is Role.NORM]
    assert len({p.constant for p in norm_uses}) == 1
    assert len(norm_uses) == 5
    assert sum(p.n_params for p in norm_uses) == 5 * 64
    assert len({p.key for p in roles.params}) == len(roles.params)   # keys stay unique


def test_tied_head_counts_once_and_is_reported(loaded):
    roles = loaded("gpt2").roles
    head = [p for p in roles.params if p.role is Role.LM_HEAD]
    token = [p for p in roles.params if p.role is Role.EMBEDDING and p.kind == "token"]
    assert len(head) == 1 and head[0].n_params == 0 and head[0].tied_to == token[0].constant
    assert token[0].n_params == 512 * 64


def test_buffers_are_not_parameters(loaded):
    # llama computes RoPE from an inv_freq constant [head_dim/2 = 8]: a buffer, not a weight
    roles = loaded("llama").roles
    assert any(loaded("llama").graph.constants[b].shape == (8,) for b in roles.buffers)


def test_attention_projections_found_per_layer(loaded):
    llama = loaded("llama").roles
    assert [a.layer for a in llama.attentions] == [0, 1]
    for attention in llama.attentions:
        assert len(attention.q_sites) == len(attention.k_sites) == len(attention.v_sites) == 1
        assert len({attention.q_sites, attention.k_sites, attention.v_sites}) == 3
        assert (attention.heads, attention.kv_heads, attention.head_dim) == (4, 2, 16)
    gpt2 = loaded("gpt2").roles
    for attention in gpt2.attentions:   # one fused c_attn feeds q, k and v
        assert attention.q_sites == attention.k_sites == attention.v_sites
    kinds = {p.kind for p in gpt2.params if p.role is Role.ATTENTION}
    assert {"qkv", "o", "bias"} <= kinds


def test_moe_router_and_experts(loaded):
    for name, per_expert in (("moe", True), ("moe_fused", False)):
        roles = loaded(name).roles
        assert [(r.layer, r.n_experts, r.top_k) for r in roles.routers] == [(0, 4, 2), (1, 4, 2)]
        experts = [p for p in roles.params if p.role is Role.EXPERTS]
        if per_expert:   # 4 experts x (gate, up, down) per layer
            assert len(experts) == 2 * 4 * 3
        else:            # one [E, 2F, D] and one [E, D, F] tensor per layer
            assert len(experts) == 2 * 2 and all(p.n_experts == 4 for p in experts)


def test_stacked_ffn_has_two_ffn_units_per_block(loaded):
    roles = loaded("stacked_ffn").roles
    assert roles.architecture.ffn_per_block == 2
    assert [u.layer for u in roles.ffn_units] == [0, 0, 1, 1]


def test_post_norm_encoder_keeps_last_norm_in_its_layer(loaded):
    arch = loaded("bert").roles.architecture
    assert arch.norm_placement == "post" and arch.norm == "layernorm" and arch.positions == "learned"
