"""Roles on the exporter corpus (fixtures/hf): real transformers models exported by torch.onnx
(dynamo and TorchScript). Every count is checked against the truth file, which comes from the
torch module's own parameter names (fixtures/hf/build.py), never from costlens."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import costlens

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
INDEX = json.loads((CORPUS / "index.json").read_text())
EXPORTS = sorted(
    (arch, exporter)
    for arch, entry in INDEX["archs"].items()
    for exporter, outcome in entry["exporters"].items()
    if outcome["status"] == "ok"
)
IDS = [f"{a}.{e}" for a, e in EXPORTS]
# the truth files say how positions enter; costlens names the computed kind it sees
POSITIONS = {"learned": "learned", "computed": "rotary", "rotary": "rotary", "none": "none"}


def _truth(arch: str, exporter: str = "dynamo") -> dict:
    """The truth file: the torch module's own parameters, a tied weight counted once. The same for
    both exporters: the TorchScript exporter writes a tied head as a transposed copy of the token
    table, whose data the corpus keeps (build.py tied_initializers), so the tie is seen (issue 9)."""
    return json.loads((CORPUS / f"{arch}.truth.json").read_text())


def _load(arch: str, exporter: str):
    return costlens.load(CORPUS / f"{arch}.{exporter}.onnx")


def _layer_counts(model) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for use in model.roles.params:
        if not use.n_params:
            continue
        layer = "none" if use.layer is None else str(use.layer)
        row = counts.setdefault(layer, {})
        row[use.role.value] = row.get(use.role.value, 0) + use.n_params
    return counts


def test_corpus_is_not_empty():
    assert len({a for a, _ in EXPORTS}) >= 15


@pytest.mark.parametrize("arch,exporter", EXPORTS, ids=IDS)
def test_params_by_role_equal_truth(arch, exporter):
    model = _load(arch, exporter)
    truth = _truth(arch, exporter)
    found = {k: v for k, v in model.roles.params_by_role().items() if v}
    assert found == {k: v for k, v in truth["params_by_role"].items() if v}
    assert model.roles.params_total == truth["params_total"]


@pytest.mark.parametrize("arch,exporter", EXPORTS, ids=IDS)
def test_params_by_layer_equal_truth(arch, exporter):
    model = _load(arch, exporter)
    truth = {layer: {k: v for k, v in row.items() if v}
             for layer, row in _truth(arch, exporter)["params_by_layer"].items()}
    assert _layer_counts(model) == {k: v for k, v in truth.items() if v}


@pytest.mark.parametrize("arch,exporter", EXPORTS, ids=IDS)
def test_architecture_line(arch, exporter):
    arch_found = _load(arch, exporter).roles.architecture
    truth = _truth(arch)["architecture"]
    assert arch_found.layers == truth["layers"]
    assert arch_found.hidden == truth["hidden"]
    assert arch_found.vocab == truth["vocab"]
    assert arch_found.experts == truth["experts"]
    assert (arch_found.top_k or 0) == truth["top_k"]
    assert arch_found.positions == POSITIONS[truth["positions"]]
    assert arch_found.norm == truth["norm"]
    assert arch_found.gated_ffn == truth["gated_ffn"]
    assert arch_found.shared_experts == truth["shared_experts"]
    assert arch_found.tied_embedding == _truth(arch, exporter)["tied_embedding"]


@pytest.mark.parametrize("arch,exporter", EXPORTS, ids=IDS)
def test_no_parameter_left_unplaced(arch, exporter):
    assert _load(arch, exporter).roles.unmatched == ()


# ------------------------------------------------------------------ selectors on ties, norms, gates
# (issue 16 item 00). Expected counts come from the truth files (the torch module's own parameter
# names) or from the module itself with PEFT, never from costlens.
from costlens.estimate import estimate  # noqa: E402
from costlens.plans import Setup, parse_plan_spec  # noqa: E402

PLAN_SETUP = Setup(batch=2, seq=16)
# BERT's embedding block also holds a LayerNorm: test_bert_embeddings_layernorm_is_under_embed
TIED = sorted((a, e) for a, e in EXPORTS if _truth(a)["tied_embedding"] and a != "bert")


def _trainable(arch: str, exporter: str, spec: str) -> int:
    return estimate(_load(arch, exporter), parse_plan_spec(spec), PLAN_SETUP).params.trainable


def _token_table(truth: dict) -> int:
    """The tied tensor: vocab x hidden (the truth's embedding row also holds learned positions)."""
    return truth["architecture"]["vocab"] * truth["architecture"]["hidden"]


@pytest.mark.parametrize("arch,exporter", TIED, ids=[f"{a}.{e}" for a, e in TIED])
def test_freezing_embed_freezes_the_tied_head(arch, exporter):
    """A tie is one tensor: `--freeze embed,layers:0-N` leaves only what lies outside both (final
    norm, a head bias), never the shared table through the head."""
    truth = _truth(arch)
    outside = truth["params_by_layer"]["none"]
    expected = sum(outside.values()) - outside["embedding"]
    assert _trainable(arch, exporter, f"freeze=embed,layers:0-{truth['architecture']['layers'] - 1}") == expected


@pytest.mark.parametrize("arch,exporter", TIED, ids=[f"{a}.{e}" for a, e in TIED])
def test_freezing_the_tied_head_freezes_embed_and_training_it_trains_the_table(arch, exporter):
    truth = _truth(arch)
    head_own = truth["params_by_layer"]["none"].get("lm_head", 0)     # a bias the head does not share
    assert _trainable(arch, exporter, "freeze=head") == truth["params_total"] - _token_table(truth) - head_own
    assert _trainable(arch, exporter, "train=head") == _token_table(truth) + head_own


TIED_TORCHSCRIPT = sorted(a for a, e in EXPORTS if e == "torchscript" and _truth(a)["tied_embedding"])
UNTIED_TORCHSCRIPT = sorted(a for a, e in EXPORTS if e == "torchscript" and not _truth(a)["tied_embedding"])


@pytest.mark.parametrize("arch", TIED_TORCHSCRIPT)
def test_torchscript_tied_head_is_read_as_a_view_of_the_table(arch):
    """The exporter's copy (the head MatMul's anonymous [hidden, vocab] initializer, whose data the
    corpus keeps) is no constant any more: the head reads the table through a Transpose, as in the
    dynamo export, and the one tie is said once."""
    import onnx
    index = INDEX["archs"][arch]["exporters"]["torchscript"]
    proto = onnx.load(str(CORPUS / index["file"]), load_external_data=False)
    inline = {t.name: tuple(t.dims) for t in proto.graph.initializer if t.raw_data and len(t.dims) == 2}
    table, copy = sorted(inline, key=lambda n: n.startswith("onnx::"))
    assert sorted(inline) == index["inline_weights"] and inline[copy] == inline[table][::-1]
    model = _load(arch, "torchscript")
    assert copy not in model.graph.constants and table in model.graph.constants
    view = next(n for n in model.graph.nodes if copy in n.outputs)
    assert (view.op, view.inputs, view.attr("perm")) == ("Transpose", (table,), (1, 0))
    head = [u for u in model.roles.params if u.constant == table and u.role.value == "lm_head"]
    assert len(head) == 1 and head[0].tied_to == table and head[0].n_params == 0
    assert [w for w in model.graph.warnings if copy in w and "the transpose of" in w] and \
        not [w for w in model.graph.warnings if "cannot be seen" in w]


@pytest.mark.parametrize("arch", UNTIED_TORCHSCRIPT)
def test_weight_free_torchscript_head_says_a_tie_cannot_be_seen(arch):
    """An untied export stored without weights: the head is counted (the truth), and the result
    says once that a tie could not have been seen."""
    model = _load(arch, "torchscript")
    notes = [w for w in model.graph.warnings if "cannot be seen" in w]
    truth = _truth(arch)
    assert len(notes) == 1 and f"{_token_table(truth):,} parameters" in notes[0]
    assert model.roles.params_by_role()["lm_head"] == truth["params_by_role"]["lm_head"]


def test_bert_embeddings_layernorm_is_under_embed():
    """BERT's embeddings.LayerNorm (2 x hidden = 128) is part of the embedding block: frozen with it,
    so nothing below layer 0 trains and no backward runs through the frozen embeddings."""
    truth = _truth("bert")
    hidden = truth["architecture"]["hidden"]
    model = _load("bert", "dynamo")
    frozen = truth["params_by_layer"]["none"]["embedding"] + 2 * hidden   # tables (the tied head's once) + LN γ, β
    assert _trainable("bert", "dynamo", "freeze=embed") == truth["params_total"] - frozen
    # the norm is still a norm: `--train norm` names it, and the head transform's LayerNorm (in lm_head) too
    assert _trainable("bert", "dynamo", "train=norm") == truth["params_by_role"]["norm"] + 2 * hidden
    # with embed and layer 0 frozen, no node of layer 0 runs a backward pass (a trainable embeddings
    # LayerNorm below it made every one of them compute dX)
    from costlens.gradients import gradient_flow
    result = estimate(model, parse_plan_spec("freeze=embed,layers:0"), PLAN_SETUP)
    index_of = {n.name: i for i, n in enumerate(model.graph.nodes)}
    sites = {index_of[u.site] for u in model.roles.params if u.key in set(result.trainable_keys)}
    _, runs_backward = gradient_flow(model, sites, set())
    layer0 = [i for i, layer in enumerate(model.roles.node_layers) if layer == 0]
    assert layer0 and not any(runs_backward[i] for i in layer0)


def test_bert_head_transform_layernorm_is_head():
    """cls.predictions.transform.LayerNorm sits between the head's dense and its decoder: `--train
    head` trains it (PEFT modules_to_save=["cls"]); truth rule: ^cls.predictions. -> lm_head."""
    uses = [u for u in _load("bert", "dynamo").roles.params if u.hint and "transform" in u.hint and u.kind == "norm"]
    assert uses and {u.role.value for u in uses} == {"lm_head"}
    assert sum(u.n_params for u in uses) == 2 * _truth("bert")["architecture"]["hidden"]


def test_qwen2_moe_shared_expert_gate_takes_no_adapter():
    """`--lora shared_experts` adapts the shared expert's gate/up/down projections as PEFT does with
    the shared expert's module names; the [1, D] sigmoid gate (shared_expert_gate) is not one of them."""
    peft = pytest.importorskip("peft")
    import transformers
    config = transformers.AutoConfig.for_model(**{k: v for k, v in json.loads(
        (CORPUS / "qwen2_moe.config.json").read_text()).items() if not k.startswith("_")})
    module = transformers.AutoModelForCausalLM.from_config(config)
    rank = 4
    wrapped = peft.get_peft_model(module, peft.LoraConfig(r=rank, target_modules=r".*\.shared_expert\.(gate|up|down)_proj"))
    expected = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert not any("shared_expert_gate" in n and "lora_" in n for n, _ in wrapped.named_parameters())
    for exporter in ("dynamo",):
        result = estimate(_load("qwen2_moe", exporter), parse_plan_spec(f"lora=shared_experts;rank={rank}"), PLAN_SETUP)
        assert result.params.adapter == expected


# ------------------------------------------------------------------ MoE configs (issue 9)
# The config path traces fused experts in dense-dispatch form (every expert on every token,
# weighed by a [t, E] combine matrix): its roles must equal the truth (the torch module's
# parameter names) as the exports' do.
MOE_CONFIGS = sorted(a for a in INDEX["archs"] if _truth(a)["architecture"].get("experts"))


@pytest.mark.parametrize("arch", MOE_CONFIGS)
def test_moe_config_roles_equal_truth(arch):
    pytest.importorskip("transformers")
    model = costlens.load(CORPUS / f"{arch}.config.json")
    truth = _truth(arch)
    assert {k: v for k, v in model.roles.params_by_role().items() if v} == \
        {k: v for k, v in truth["params_by_role"].items() if v}
    assert model.roles.params_total == truth["params_total"]
    assert model.roles.architecture.experts == truth["architecture"]["experts"]
    assert (model.roles.architecture.top_k or 0) == truth["architecture"]["top_k"]


def test_gpt_oss_config_expert_biases_are_expert_parameters():
    """gpt-oss's experts hold [E, 2F] and [E, D] biases beside their 3-D weights: in dense
    dispatch they are added to each expert's product, h[E, t, 2F] + b[E, 1, 2F]."""
    pytest.importorskip("transformers")
    model = costlens.load(CORPUS / "gpt_oss.config.json")
    biases = {u.constant: u for u in model.roles.params if u.constant.endswith("_bias") and "experts" in u.constant}
    # 2 layers x (gate_up 4 x 128 + down 4 x 64) = 2 x 768 = 1,536
    assert sum(u.n_params for u in biases.values()) == 1536
    assert {u.role.value for u in biases.values()} == {"experts"}
    assert not [b for b in model.roles.buffers if b.endswith("_bias")]


def test_phimoe_config_router_is_found_without_topk():
    """PhiMoE's sparsemixer picks its 2 experts with two ArgMax passes, and dense dispatch picks
    no expert rows: the ArgMax ids scatter the combine matrix that weighs the experts."""
    pytest.importorskip("transformers")
    model = costlens.load(CORPUS / "phimoe.config.json")
    assert {k: v for k, v in model.roles.params_by_role().items() if v}.get("router") == 2 * 64 * 4   # 2 x [4, 64]
    assert model.roles.architecture.top_k == 2


def test_deepseek_v3_lora_attn_ffn_is_pefts_on_the_named_modules():
    """`lora-attn-ffn` on DeepSeek-V3 adapts MLA's q_a/q_b/kv_a/kv_b/o projections and the dense
    first layer's gate/up/down: PEFT's count on exactly those modules. PEFT >= 0.18 under
    transformers 5 rewrites target names ending in gate_proj/up_proj/down_proj of a qwen2_moe-style
    model to the fused expert tensors (a shim for v4 checkpoints): with it, the dense MLP loses its
    adapters and every MoE layer's experts get one, so that shim is switched off here to apply the
    modules the plan names."""
    peft = pytest.importorskip("peft")
    import contextlib
    import importlib.util
    from unittest import mock

    import torch
    import transformers
    config = transformers.AutoConfig.for_model(**{k: v for k, v in json.loads(
        (CORPUS / "deepseek_v3.config.json").read_text()).items() if not k.startswith("_")})
    module = transformers.AutoModelForCausalLM.from_config(config)
    targets = [name for name, sub in module.named_modules() if isinstance(sub, torch.nn.Linear)
               and (".self_attn." in name or re.search(r"layers\.\d+\.mlp\.(gate|up|down)_proj$", name))]
    shim = "peft.utils.transformers_weight_conversion"       # absent from older PEFT, which never retargets
    with (mock.patch(f"{shim}.convert_peft_config_for_transformers", lambda *args, **kwargs: None)
          if importlib.util.find_spec(shim) else contextlib.nullcontext()):
        wrapped = peft.get_peft_model(module, peft.LoraConfig(r=8, target_modules=targets))
    expected = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    for exporter in ("dynamo", "torchscript"):
        assert _trainable("deepseek_v3", exporter, "lora-attn-ffn-r8:lora=attn,ffn;rank=8") == expected


# ------------------------------------------------------------------ encoder-decoder (issue 16 item 4)
TINY_WHISPER = dict(use_cache=False, vocab_size=256, d_model=64, encoder_layers=2, decoder_layers=2,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                    num_mel_bins=8, max_source_positions=16, max_target_positions=32, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def test_whisper_config_is_refused_not_priced_as_its_decoder(tmp_path):
    """WhisperForCausalLM (the decoder alone) is what AutoModelForCausalLM builds from a Whisper
    config; pricing it dropped the encoder and cross-attention. The refusal names the full model's
    parameter count (37,760,640 for whisper-tiny's defaults: counted here on the module)."""
    transformers = pytest.importorskip("transformers")
    import torch
    from costlens.frontends.hf_config import ConfigError, build_model
    config = transformers.WhisperConfig(**TINY_WHISPER)
    with torch.device("meta"):
        full = transformers.WhisperForConditionalGeneration(config)
    total = sum(p.numel() for p in full.parameters())
    encoder = sum(p.numel() for p in full.get_encoder().parameters())
    with pytest.raises(ConfigError, match="encoder-decoder") as caught:
        build_model(config, "whisper")
    assert f"{total:,} parameters, {encoder:,} of them in the encoder" in str(caught.value)


def test_whisper_export_is_refused_with_what_is_missing(tmp_path):
    """A real torch.onnx export of a tiny WhisperForConditionalGeneration: the decoder's
    cross-attention (queries from the decoder's ids, keys from the audio features) is found from
    structure and the model refused with one line (exit 2), never priced as a smaller model."""
    transformers = pytest.importorskip("transformers")
    import torch
    from click.testing import CliRunner

    from costlens.cli import main
    from costlens.errors import StructureError

    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**TINY_WHISPER)).eval()

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_features, decoder_input_ids):
            return self.inner(input_features=input_features, decoder_input_ids=decoder_input_ids).logits

    path = tmp_path / "whisper.onnx"
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=32)
    torch.onnx.export(Logits(model).eval(), (torch.zeros(1, 8, 32), torch.zeros(1, 5, dtype=torch.long)), str(path),
                      dynamo=True, input_names=["input_features", "decoder_input_ids"], output_names=["logits"],
                      dynamic_shapes=({0: batch}, {0: batch, 1: seq}), verbose=False)
    with pytest.raises(StructureError, match="cross-attention") as caught:
        costlens.load(path)
    layers = TINY_WHISPER["decoder_layers"]
    assert f"{layers} of its {2 * layers + TINY_WHISPER['encoder_layers']} attention blocks" in str(caught.value)
    assert "decoder_input_ids" in str(caught.value) and "input_features" in str(caught.value)
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 2 and "cross-attention" in result.output and "Traceback" not in result.output
