"""PEFT adapter configs as costlens plans: the trainable count is PEFT's own.

Every expected number is ``get_peft_model(module, LoraConfig(**config)).get_nb_trainable_parameters()``
on the real module (fixtures/models.py factories, a tiny transformers LLaMA), never costlens output.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import costlens  # noqa: E402
from costlens.cli import main  # noqa: E402
from costlens.errors import PlanError  # noqa: E402
from costlens.peft_config import plan_from_peft  # noqa: E402

SEQ = costlens.Setup(seq=32)
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 256,
              "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = costlens.load(f"models:{name}")
        return cache[name]
    return get


def peft_count(module, config: dict) -> int:
    """PEFT's trainable parameters for ``config`` on ``module``."""
    wrapped = peft.get_peft_model(module, peft.LoraConfig(**config))
    return wrapped.get_nb_trainable_parameters()[0]


def costlens_count(model, config: dict, transformers_model: bool = False) -> int:
    plan = plan_from_peft(dict(config), model, transformers_model=transformers_model).plan
    return costlens.estimate(model, plan, SEQ).params.trainable


FIXTURE_CASES = [
    ("llama_like", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 16}),
    ("llama_like", {"target_modules": ["q_proj", "v_proj"], "r": 8, "lora_dropout": 0.05}),
    ("llama_like", {"target_modules": "all-linear", "r": 4}),          # a plain nn.Module: PEFT keeps lm_head
    ("llama_like", {"target_modules": r".*\.(gate_proj|up_proj|down_proj)", "r": 8, "rank_pattern": {"down_proj": 4}}),
    ("llama_like", {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"], "r": 8}),
    ("llama_like", {"target_modules": ["q_proj"], "layers_to_transform": [0, 1], "layers_pattern": "layers",
                    "r": 8}),                                          # every layer
    ("llama_like", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "exclude_modules": ["k_proj"], "r": 8}),
    # a layer subset and per-layer ranks: scoped targets (q@layers:0), PEFT's count on the module
    ("llama_like", {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers", "r": 8}),
    ("llama_like", {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": 1, "layers_pattern": ["layers"],
                    "r": 4}),
    ("llama_like", {"target_modules": r"layers\.0\.self_attn\.(q|v)_proj", "r": 8}),
    ("llama_like", {"target_modules": ["q_proj", "v_proj"], "r": 8, "rank_pattern": {"layers.0.self_attn.q_proj": 4}}),
    ("moe_like", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate", "gate_proj", "up_proj",
                                     "down_proj"], "r": 8, "rank_pattern": {"gate": 4}}),
    ("moe_like", {"target_modules": ["q_proj", "v_proj"], "r": 64, "alpha_pattern": {"q_proj": 8}}),
    ("moe_fused_like", {"target_modules": ["q_proj", "v_proj"], "target_parameters": ["mlp.gate_up_proj",
                                                                                        "mlp.down_proj"], "r": 4}),
    ("gpt2_like", {"target_modules": ["c_attn", "c_proj"], "r": 8}),   # c_proj is attention's o and the MLP's down
    ("gpt2_like", {"target_modules": ["c_attn", "c_fc"], "r": 8, "lora_dropout": 0.1}),
]


@pytest.mark.parametrize("factory, config", FIXTURE_CASES)
def test_trainable_count_is_pefts(models, factory, config):
    import models as fixture_models               # fixtures/ is on sys.path (conftest)
    expected = peft_count(getattr(fixture_models, factory)(), config)
    assert costlens_count(models(factory), config) == expected


def test_layer_subset_is_written_as_scoped_targets(models):
    config = {"target_modules": ["q_proj", "v_proj"], "r": 8, "rank_pattern": {"layers.0.self_attn.q_proj": 4}}
    result = plan_from_peft(config, models("llama_like"))
    assert set(result.plan.lora) == {"v", "q@layers:0", "q@layers:1"}
    assert result.plan.rank_for("q@layers:0") == 4 and result.plan.rank_for("q@layers:1") == 8
    # by hand: layer 0 q at r4: 4·(64+64) = 512; layer 1 q at r8: 1,024; v at r8 in both: 2 x 8·(64+32) = 1,536
    assert costlens_count(models("llama_like"), config) == 512 + 1_024 + 1_536


def test_llama_q_v_r16_by_hand(models):
    # 2 layers x (q: 16·(64+64) + v: 16·(64+32)) = 2 x (2048 + 1536) = 7,168
    assert costlens_count(models("llama_like"), {"target_modules": ["q_proj", "v_proj"], "r": 16}) == 7_168


@pytest.mark.parametrize("config", [
    {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 16, "lora_alpha": 32},
    {"target_modules": "all-linear", "r": 8},                          # a transformers model: lm_head left out
    {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"], "r": 8},
    {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "r": 8,
     "rank_pattern": {"o_proj": 2, "down_proj": 4}},
])
def test_transformers_llama_from_its_config_json(tmp_path, config):
    import transformers
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    model = costlens.load(path)
    torch.manual_seed(0)
    module = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    assert costlens_count(model, config, transformers_model=True) == peft_count(module, config)


@pytest.mark.parametrize("config, needles", [
    # PEFT's default layer regex wants a prefix before the layer list ("model.layers.0."): nothing matches here
    ({"target_modules": ["q_proj"], "layers_to_transform": [0]}, ["matches no module"]),
    ({"target_modules": ["embed_tokens"]}, ["embed_tokens", "linear layers only"]),
    ({"target_modules": ["self_attn"]}, ["layers.0.self_attn (not a linear layer)"]),
    ({"target_modules": ["q_proj"], "modules_to_save": ["input_layernorm"]}, ["modules_to_save", "input_layernorm"]),
    ({"target_modules": ["q_proj"], "use_dora": True}, ["use_dora"]),
    ({"target_modules": ["q_proj"], "bias": "all"}, ["bias='all'"]),
    ({"peft_type": "IA3", "target_modules": ["q_proj"]}, ["IA3"]),
    ({"target_modules": ["nothing_here"]}, ["matches no module"]),
    ({"target_modules": [], "target_parameters": ["mlp.gate_up_proj"]}, ["target_parameters", "3-D"]),
    ({"target_modules": "all-linear"}, ["all-linear"]),               # module class unknown: not guessed
])
def test_what_costlens_cannot_express_is_named(models, config, needles):
    with pytest.raises(PlanError) as error:
        plan_from_peft(config, models("llama_like"))
    assert all(n in str(error.value) for n in needles), str(error.value)


def test_anonymized_graph_has_no_module_paths():
    from conftest import FIXTURES
    with pytest.raises(PlanError, match="no module paths"):
        plan_from_peft({"target_modules": ["q_proj"]}, costlens.load(FIXTURES / "moe_anon.onnx"))


def test_cli_peft_file_and_folder(tmp_path):
    import models as fixture_models
    config = {"peft_type": "LORA", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], "r": 16,
              "lora_alpha": 32, "lora_dropout": 0.05, "task_type": "CAUSAL_LM", "base_model_name_or_path": "x"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    expected = peft_count(fixture_models.llama_like(), {k: v for k, v in config.items() if k not in
                                                       ("peft_type", "base_model_name_or_path", "task_type")})
    for given in (tmp_path / "adapter_config.json", tmp_path):
        result = CliRunner().invoke(main, ["plan", "models:llama_like", "--peft", str(given), "--seq", "32", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["plans"][0]["params"]["trainable"] == expected
    all_linear = tmp_path / "all" / "adapter_config.json"
    all_linear.parent.mkdir()
    all_linear.write_text(json.dumps({"target_modules": "all-linear", "r": 4}))
    result = CliRunner().invoke(main, ["plan", "models:llama_like", "--peft", str(all_linear), "--seq", "32", "--json"])
    assert json.loads(result.stdout)["plans"][0]["params"]["trainable"] == \
        peft_count(fixture_models.llama_like(), {"target_modules": "all-linear", "r": 4})


def test_cli_peft_conflicts_with_lora_options(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj"]}))
    result = CliRunner().invoke(main, ["plan", "models:llama_like", "--peft", str(tmp_path), "--rank", "4"])
    assert result.exit_code == 2 and "--rank" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_onnx_builder_names_map_by_role():
    from conftest import FIXTURES
    model = costlens.load(FIXTURES / "genai_dense.onnx")          # model.layers.0.attn.q_proj.MatMul.weight
    plan = plan_from_peft({"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4}, model).plan
    assert plan.lora == ("q", "v", "down") and plan.rank == 4


def test_validate_measures_the_peft_plan(tmp_path):
    import models as fixture_models
    config = {"target_modules": ["q_proj", "v_proj"], "r": 16}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["validate", "models:llama_like", "--peft", str(tmp_path), "--batch", "2",
                                       "--seq", "32", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["quantity"]: row for row in json.loads(result.stdout)["comparisons"]}
    assert rows["trainable params"]["measured"] == peft_count(fixture_models.llama_like(), config)


def test_all_linear_on_a_gated_shared_expert_is_refused_not_undercounted():
    # PEFT's all-linear adapts Qwen2-MoE's shared_expert_gate (a d -> 1 nn.Linear); costlens does
    # not price LoRA on that gate, so the plan is refused by name rather than counted short
    model = costlens.load(Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "qwen2_moe.config.json")
    with pytest.raises(PlanError, match="shared_expert_gate"):
        plan_from_peft({"target_modules": "all-linear", "r": 8}, model, transformers_model=True)


def test_compare_prices_peft_configs_beside_the_default_plans(tmp_path):
    import models as fixture_models
    for name, r in (("a", 8), ("b", 16)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj", "v_proj"], "r": r}))
    result = CliRunner().invoke(main, ["compare", "models:llama_like", "--seq", "32", "--json",
                                       "--peft", str(tmp_path / "a"), "--peft", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    by_name = {p["name"]: p["params"]["trainable"] for p in json.loads(result.stdout)["plans"]}
    assert "full" in by_name                                  # the default plans stay
    for name, r in (("a", 8), ("b", 16)):
        assert by_name[f"peft-{name}"] == peft_count(fixture_models.llama_like(), {"target_modules": ["q_proj", "v_proj"],
                                                                                   "r": r})
    same = CliRunner().invoke(main, ["compare", "models:llama_like", "--seq", "32",
                                     "--peft", str(tmp_path / "a"), "--peft", str(tmp_path / "a" / "adapter_config.json")])
    assert same.exit_code == 2 and "peft-a" in same.stderr
