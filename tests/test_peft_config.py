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
    # DoRA: PEFT adds a trained magnitude vector per output of every adapted linear
    ("llama_like", {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 8, "use_dora": True}),
    ("gpt2_like", {"target_modules": ["c_attn", "c_fc"], "r": 4, "use_dora": True}),
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
    ({"target_modules": ["q_proj"], "lora_bias": True}, ["lora_bias"]),
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


# --------------------------------------------- transformers 5 MoE: PEFT rewrites the targets first
HF_CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_PROJECTIONS = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]
MIXTRAL_ALL = [*ATTENTION, "w1", "w2", "w3"]          # Mixtral's v4 expert names


def corpus_module(arch: str):
    """The tiny transformers model of a corpus config, random weights on the CPU."""
    import transformers
    config = transformers.AutoConfig.for_model(**json.loads((HF_CORPUS / f"{arch}.config.json").read_text()))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def corpus_plan(arch: str, config: dict):
    from costlens.peft_config import meta_module
    path = HF_CORPUS / f"{arch}.config.json"
    model = costlens.load(path)
    return model, plan_from_peft(json.loads(json.dumps(config)), model, transformers_model=True,
                                 module=meta_module(str(path)))


# PEFT 0.21 rewrites mixtral and the types it maps to qwen2_moe (deepseek_v3, olmoe, qwen3_moe), not
# qwen2_moe itself; the rewrite puts gate_up_proj at rank 2r: with down_proj at 2r too (rank_pattern) the
# experts hold one rank (the experts target); at r, two (experts.gate_up, experts.down: TWO_RANK_CASES)
REWRITE_CASES = [
    *[(arch, {"target_modules": ATTENTION, "r": 8}) for arch in ("deepseek_v3", "mixtral", "qwen2_moe", "olmoe",
                                                                 "qwen3_moe")],
    ("deepseek_v3", {"target_modules": ALL_PROJECTIONS, "r": 8, "rank_pattern": {"down_proj": 16}}),
    ("olmoe", {"target_modules": ALL_PROJECTIONS, "r": 8, "rank_pattern": {"down_proj": 16}}),
    ("qwen3_moe", {"target_modules": [*ALL_PROJECTIONS, "gate"], "r": 8, "rank_pattern": {"down_proj": 16}}),
    ("mixtral", {"target_modules": MIXTRAL_ALL, "r": 8, "rank_pattern": {"down_proj": 16}}),
    ("mixtral", {"target_modules": "all-linear", "r": 4, "rank_pattern": {"down_proj": 8}}),
    ("deepseek_v3", {"target_modules": "all-linear", "r": 4, "rank_pattern": {"down_proj": 8}}),
]


@pytest.mark.parametrize("arch, config", REWRITE_CASES)
def test_moe_config_counts_what_peft_trains_after_its_rewrite(arch, config):
    model, result = corpus_plan(arch, config)
    expected = peft_count(corpus_module(arch), json.loads(json.dumps(config)))
    assert costlens.estimate(model, result.plan, SEQ).params.trainable == expected
    rewritten = [n for n in result.notes if "rewrites the targets" in n]
    assert bool(rewritten) == (config["target_modules"] != ATTENTION)
    if rewritten and isinstance(config["target_modules"], list):
        assert "gate_up_proj" in rewritten[0] and ("gate_proj" in rewritten[0] or "w1" in rewritten[0])


TWO_RANK_CASES = [("deepseek_v3", ALL_PROJECTIONS), ("mixtral", MIXTRAL_ALL), ("olmoe", ALL_PROJECTIONS),
                  ("qwen3_moe", ALL_PROJECTIONS), ("qwen3_moe", [*ALL_PROJECTIONS, "gate"])]


@pytest.mark.parametrize("arch, targets", TWO_RANK_CASES)
def test_rewritten_experts_at_two_ranks_are_priced_as_peft_trains_them(arch, targets):
    config = {"target_modules": targets, "r": 8, "lora_alpha": 16}
    model, result = corpus_plan(arch, config)
    # PEFT: gate_up_proj at r16 and alpha 32 beside the experts' down_proj at r8 (alpha 16)
    plan = result.plan
    assert (plan.rank_for("experts.gate_up"), plan.rank_for("experts.down")) == (16, 8), result.spec
    assert (plan.alpha_for("experts.gate_up"), plan.alpha_for("experts.down")) == (32.0, 16.0), result.spec
    assert "experts.gate_up=16" in result.spec and "experts.gate_up=32.0" in result.spec
    assert any("rewrites the targets" in n and "gate_up_proj at rank 16, alpha 32" in n for n in result.notes)
    expected = peft_count(corpus_module(arch), dict(config))
    assert costlens.estimate(model, plan, SEQ).params.trainable == expected
    # the names matched as written (the plan before the rewrite) are not what PEFT trains
    try:
        as_written = costlens.estimate(model, plan_from_peft(dict(config), model, transformers_model=True).plan,
                                       SEQ).params.trainable
    except PlanError:
        as_written = None
    assert as_written != expected


def test_all_linear_on_fused_experts_takes_two_ranks():
    config = {"target_modules": "all-linear", "r": 4, "lora_alpha": 8}
    model, result = corpus_plan("mixtral", config)
    assert (result.plan.rank_for("experts.gate_up"), result.plan.rank_for("experts.down")) == (8, 4)
    assert costlens.estimate(model, result.plan, SEQ).params.trainable == \
        peft_count(corpus_module("mixtral"), dict(config))


def test_what_stays_inexpressible_after_the_rewrite_names_it():
    with pytest.raises(PlanError) as error:
        corpus_plan("olmoe", {"target_modules": [*ALL_PROJECTIONS, "embed_tokens"], "r": 8})
    message = str(error.value)
    assert "embed_tokens" in message and "rewrites the targets" in message and "\n" not in message, message


def lora_layout(wrapped) -> list[tuple]:
    """(rank, scaling, A shape, B shape) of every LoRA layer PEFT built, sorted: what a plan adapts,
    whatever order the wrappers of one module's tensors were nested in."""
    found = []
    for _, sub in wrapped.named_modules():
        if hasattr(sub, "lora_A") and "default" in getattr(sub, "r", {}):
            found.append((sub.r["default"], sub.scaling["default"], tuple(sub.lora_A["default"].weight.shape),
                          tuple(sub.lora_B["default"].weight.shape)))
    return sorted(found)


@pytest.mark.parametrize("arch, targets", [("mixtral", MIXTRAL_ALL), ("olmoe", ALL_PROJECTIONS)])
def test_apply_plan_builds_the_adapters_pefts_rewrite_builds(arch, targets):
    from costlens.measure.validate import apply_plan
    config = {"target_modules": targets, "r": 8, "lora_alpha": 16}
    model, result = corpus_plan(arch, config)
    priced = costlens.estimate(model, result.plan, SEQ)
    ours = lora_layout(apply_plan(corpus_module(arch), model, priced))
    pefts = lora_layout(peft.get_peft_model(corpus_module(arch), peft.LoraConfig(**config)))
    assert ours == pefts and {(r, scaling) for r, scaling, *_ in ours} == {(8, 2.0), (16, 2.0)}


def test_validate_measures_the_two_expert_ranks(tmp_path):
    config = {"target_modules": MIXTRAL_ALL, "r": 8, "lora_alpha": 16}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["validate", str(HF_CORPUS / "mixtral.config.json"), "--peft", str(tmp_path),
                                       "--batch", "2", "--seq", "16", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["quantity"]: row for row in json.loads(result.stdout)["comparisons"]}
    expected = peft_count(corpus_module("mixtral"), config)
    assert rows["trainable params"]["measured"] == rows["trainable params"]["estimated"] == expected
    peak = rows["peak bytes"]
    assert abs(peak["estimated"] - peak["measured"]) <= 0.03 * peak["measured"], peak
    for quantity in ("forward FLOPs", "step FLOPs"):          # the real step under FlopCounterMode
        assert rows[quantity]["ok"], rows[quantity]
    assert "did not match any targeted module" not in result.stderr     # PEFT 0.21's false warning, filtered


def test_without_pefts_rewrite_the_names_are_matched_as_written(monkeypatch):
    import importlib.util
    import sys
    from costlens.peft_config import meta_module
    path = HF_CORPUS / "olmoe.config.json"
    model, module = costlens.load(path), meta_module(str(path))
    config = {"target_modules": ALL_PROJECTIONS, "r": 8, "rank_pattern": {"down_proj": 16}}
    # OLMoE's experts are fused 3-D tensors, so the names as written match its attention only
    attention_only = peft_count(corpus_module("olmoe"), {"target_modules": ATTENTION, "r": 8})
    monkeypatch.setitem(sys.modules, "peft.utils.transformers_weight_conversion", None)   # as on transformers 4
    result = plan_from_peft(dict(config), model, transformers_model=True, module=module)
    assert not any("rewrites" in n for n in result.notes)
    assert costlens.estimate(model, result.plan, SEQ).params.trainable == attention_only
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    assert meta_module(str(path)) is None                    # no PEFT: no module built, nothing rewritten


def test_onnx_export_of_fused_experts_notes_the_rewrite_it_cannot_run():
    model = costlens.load(HF_CORPUS / "olmoe.dynamo.onnx")   # the fused tensors renamed (val_353)
    notes = plan_from_peft({"target_modules": ALL_PROJECTIONS, "r": 8}, model).notes
    assert any("fused 3-D experts" in n and "gate_proj, up_proj, down_proj" in n for n in notes), notes
    assert not any("fused" in n for n in plan_from_peft({"target_modules": ATTENTION, "r": 8}, model).notes)


def test_cli_peft_on_a_moe_config_prices_pefts_rewrite(tmp_path):
    config = {"target_modules": ALL_PROJECTIONS, "r": 8, "rank_pattern": {"down_proj": 16}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["plan", str(HF_CORPUS / "olmoe.config.json"), "--peft", str(tmp_path),
                                       "--seq", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plans"][0]["params"]["trainable"] == peft_count(corpus_module("olmoe"), config)
    assert "rewrites the targets" in result.stderr and "gate_up_proj at rank 16" in result.stderr


def test_validate_applies_the_named_plan_on_a_rewritten_moe_type():
    # DeepSeek-V3's layer 0 is a dense MLP: PEFT's rewrite would move its gate/up/down_proj adapters
    # to the fused experts; validate must adapt exactly the named modules that were priced
    module = corpus_module("deepseek_v3")
    r = 8
    expected = sum(r * (sub.in_features + sub.out_features) for name, sub in module.named_modules()
                   if isinstance(sub, torch.nn.Linear) and (".self_attn." in name or
                                                            name.rsplit(".", 1)[0].endswith(".mlp")))
    assert any(name.endswith("layers.0.mlp.gate_proj") for name, _ in module.named_modules())
    result = CliRunner().invoke(main, ["validate", str(HF_CORPUS / "deepseek_v3.config.json"), "--lora", "attn,ffn",
                                       "--rank", str(r), "--batch", "2", "--seq", "16", "--json"])
    rows = {row["quantity"]: row for row in json.loads(result.stdout)["comparisons"]}
    assert rows["trainable params"]["measured"] == rows["trainable params"]["estimated"] == expected
