"""Hugging Face configs through the torch front end: LLaMA, GPT-2, Mixtral, Qwen2-MoE.

Small configs are built from transformers config objects (nothing is downloaded); each
model is built on the meta device and traced. Checks: roles and architecture from the
graph; parameter totals against the module's own parameters; FLOPs against
torch.utils.flop_counter on a real CPU model with the same config (its MoE layers run
transformers' eager per-expert loop, so only routed tokens are counted there too); the
shallow trace + replication equals a full trace node for node; config.json files and
folders load from the Python API and the CLI; bad configs give one line and exit 2.
"""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch", reason="needs the torch extra (pip install -e '.[torch]')")
transformers = pytest.importorskip("transformers", reason="needs the torch extra (transformers)")

from click.testing import CliRunner  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import costlens  # noqa: E402
from conftest import canonical  # noqa: E402  (tests/conftest.py)
from costlens.cli import main  # noqa: E402
from costlens.estimate import estimate  # noqa: E402
from costlens.frontends.hf_config import build_model, layer_container, shallow_config  # noqa: E402
from costlens.frontends.replicate import ReplicationError, replicate_blocks  # noqa: E402
from costlens.frontends.torch_export import load_torch  # noqa: E402
from costlens.plans import Setup, parse_plan_spec  # noqa: E402

SMALL = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
             bos_token_id=0, eos_token_id=1, pad_token_id=None)


def configs():
    return {
        "llama": transformers.LlamaConfig(intermediate_size=176, **SMALL),
        "gpt2": transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=4, n_head=4, n_positions=128,
                                        bos_token_id=0, eos_token_id=1),
        "mixtral": transformers.MixtralConfig(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                                              **SMALL),
        "qwen2_moe": transformers.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                                 num_experts_per_tok=2, shared_expert_intermediate_size=128,
                                                 **SMALL),
    }


CONFIGS = configs()


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = costlens.load(CONFIGS[name])
        return cache[name]
    return get


def module_params(config) -> int:
    return sum(p.numel() for p in build_model(config).parameters())   # tied tensors once


# --------------------------------------------------------------------------- roles

def test_llama_roles(loaded):
    model = loaded("llama")
    arch = model.roles.architecture
    assert (arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.head_dim, arch.ffn) == (4, 64, 4, 2, 16, 176)
    assert (arch.activation, arch.norm, arch.positions, arch.vocab) == ("silu (gated)", "rmsnorm", "rotary", 512)
    by_role = model.roles.params_by_role()
    # q, o: 64x64; k, v: 32x64 -> 12,288 per layer; SwiGLU 3 x 64 x 176 = 33,792 per layer
    assert by_role["attention"] == 4 * 12_288 and by_role["ffn"] == 4 * 33_792
    assert model.roles.params_total == module_params(CONFIGS["llama"])
    assert model.unknown_ops == {} and model.roles.unmatched == ()


def test_gpt2_roles(loaded):
    model = loaded("gpt2")
    arch = model.roles.architecture
    assert (arch.activation, arch.norm, arch.positions, arch.tied_embedding) == ("gelu_tanh", "layernorm",
                                                                                 "learned", True)
    assert arch.ffn == 256 and arch.layers == 4
    by_role = model.roles.params_by_role()
    assert by_role["lm_head"] == 0 and by_role["other"] == 0
    assert by_role["ffn"] == 4 * (64 * 256 + 256 + 256 * 64 + 64)          # Conv1D c_fc, c_proj with biases
    assert model.roles.params_total == module_params(CONFIGS["gpt2"])


def test_mixtral_router_and_experts(loaded):
    model = loaded("mixtral")
    arch = model.roles.architecture
    assert (arch.experts, arch.top_k, arch.ffn, arch.shared_experts) == (4, 2, 96, False)
    assert len(model.roles.routers) == 4
    by_role = model.roles.params_by_role()
    assert by_role["router"] == 4 * 64 * 4                                  # d -> E per layer
    assert by_role["experts"] == 4 * 4 * 3 * 64 * 96                        # fused [E, 2F, d] + [E, d, F]
    experts = [u for u in model.roles.params if u.role.value == "experts"]
    assert {u.n_experts for u in experts} == {4} and {u.kind for u in experts} == {"gate_up", "down"}
    assert model.roles.params_total == module_params(CONFIGS["mixtral"])


def test_qwen_moe_shared_expert(loaded):
    model = loaded("qwen2_moe")
    arch = model.roles.architecture
    assert (arch.experts, arch.top_k, arch.shared_experts) == (4, 2, True)
    by_role = model.roles.params_by_role()
    assert by_role["shared_experts"] == 4 * (3 * 64 * 128 + 64)            # SwiGLU + sigmoid gate d -> 1
    assert by_role["experts"] == 4 * 4 * 3 * 64 * 64
    assert model.roles.params_total == module_params(CONFIGS["qwen2_moe"])


def test_active_parameters_count_k_of_e_experts(loaded):
    model = loaded("mixtral")
    result = estimate(model, parse_plan_spec("full"), Setup(batch=1, seq=16))
    experts = model.roles.params_by_role()["experts"]
    assert result.params.active_per_token == model.roles.params_total - experts // 2     # k/E = 2/4


# --------------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("name", list(CONFIGS))
def test_flops_match_flop_counter_on_a_real_model(loaded, name):
    batch, seq = 2, 24
    config = CONFIGS[name]
    torch.manual_seed(0)
    kwargs = {"experts_implementation": "eager"} if name in ("mixtral", "qwen2_moe") else {}
    real = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", **kwargs)
    real.config.use_cache = False
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as forward:
        real(input_ids=ids)
    with FlopCounterMode(display=False) as step:
        logits = real(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)).backward()
    result = estimate(loaded(name), parse_plan_spec("full"), Setup(batch=batch, seq=seq))
    assert result.flops.forward == forward.get_total_flops()
    assert result.flops.forward + result.flops.backward == step.get_total_flops()


# --------------------------------------------------------------------------- replication

@pytest.mark.parametrize("name", list(CONFIGS))
def test_shallow_trace_replicated_equals_full_trace(name):
    config = CONFIGS[name]
    full = load_torch(build_model(config))
    shallow = build_model(shallow_config(config, 2))
    container = layer_container(shallow, 2)
    replicated = replicate_blocks(load_torch(shallow), container, config.num_hidden_layers)
    assert canonical(replicated) == canonical(full)
    assert len(replicated.nodes) == len(full.nodes)


def test_different_blocks_are_traced_in_full():
    # layer 2 of 4 keeps a dense MLP: the blocks differ, so no replication
    config = transformers.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=128,
                                         mlp_only_layers=[2], **SMALL)
    model = costlens.load(config)
    layers = {u.layer for u in model.roles.params if u.role.value == "ffn"}
    assert layers == {2}
    assert len(model.roles.routers) == 3
    assert model.roles.params_total == module_params(config)


def test_replication_refuses_blocks_that_differ():
    config = transformers.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=128,
                                         mlp_only_layers=[1], **{**SMALL, "num_hidden_layers": 2})
    with pytest.raises(ReplicationError):
        replicate_blocks(load_torch(build_model(config)), "model.layers", 8)


def test_deep_model_is_traced_shallow():
    config = transformers.LlamaConfig(intermediate_size=176, **{**SMALL, "num_hidden_layers": 48})
    model = costlens.load(config)
    assert any(n.name.endswith("@47") for n in model.graph.nodes)   # block 47 is a copy of block 1
    assert model.roles.architecture.layers == 48
    assert model.roles.params_total == module_params(config)


def test_moe_config_exports_to_onnx(tmp_path, loaded):
    # transformers' MoE models do not export with their grouped matmuls; in dense dispatch they do
    from costlens.frontends.onnx_export import export_onnx
    path = export_onnx(CONFIGS["mixtral"], tmp_path / "mixtral.onnx")
    exported, traced = costlens.load(path), loaded("mixtral")
    assert exported.roles.params_by_role() == traced.roles.params_by_role()
    assert exported.roles.architecture == traced.roles.architecture
    a, b = (estimate(m, parse_plan_spec("lora=attn,router,experts;rank=4"), Setup(batch=2, seq=32))
            for m in (exported, traced))
    assert (a.params, a.flops) == (b.params, b.flops)


# --------------------------------------------------------------------------- sources

@pytest.fixture
def config_folder(tmp_path):
    CONFIGS["llama"].save_pretrained(tmp_path)
    return tmp_path


def test_config_file_and_folder_load(config_folder, loaded):
    for source in (str(config_folder), config_folder / "config.json"):
        model = costlens.load(source)
        assert model.roles.params_by_role() == loaded("llama").roles.params_by_role()


def test_cli_plans_a_config_folder(config_folder):
    result = CliRunner().invoke(main, ["plan", str(config_folder), "--lora", "attn", "--batch", "2", "--seq", "32",
                                       "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    document = json.loads(result.stdout)
    assert document["model"]["params_total"] == module_params(CONFIGS["llama"])


@pytest.mark.parametrize("content, cause", [
    ({"model_type": "t5", "d_model": 64}, "unsupported architecture 't5'"),
    ({"model_type": "no_such_architecture"}, "unsupported architecture 'no_such_architecture'"),
    ({"hidden_size": 64}, "no model_type"),
    ("{not json", "not a readable JSON config"),
])
def test_bad_configs_give_one_line_and_exit_2(tmp_path, content, cause):
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("costlens: error:") and cause in lines[0], result.stderr
