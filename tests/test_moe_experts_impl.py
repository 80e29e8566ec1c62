"""How transformers runs its fused (3-D) experts -- ``experts_implementation`` -- changes what
autograd keeps (issue 10): "eager" loops over the experts and adds each one's weighted output
back with index_add (which keeps that output for backward), "grouped_mm" sorts the (token,
expert) pairs and runs torch._grouped_mm, keeping only index tensors where the loop kept the
index_add source. Expected figures are derived by hand from the shapes below or measured on
the real transformers module (costlens.measure.validate.validate_config)."""
from __future__ import annotations

import json

import pytest

from costlens.errors import PlanError
from costlens.gradients import analyze
from costlens.model import analyse
from costlens.frontends.source import load_graph
from costlens.plans import Plan, Setup, check_setup, parse_plan_spec
from costlens.storages import Precision, StorageContext, collect_saved

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# one Mixtral layer: T = 2·8 = 16 tokens, k = 2 of E = 4 experts, so S = T·k = 32 pairs, D = 32
SMALL = {"model_type": "mixtral", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 64, "max_position_embeddings": 64,
         "num_local_experts": 4, "num_experts_per_tok": 2}
BATCH, SEQ, PAIRS, HIDDEN, EXPERTS, FFN = 2, 8, 32, 32, 4, 48
HF = "fixtures/hf"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / "config.json"
    path.write_text(json.dumps(SMALL))
    return analyse(load_graph(str(path)))


def _routed_saved(model, impl: str, plan: Plan = Plan()) -> dict[str, int]:
    """The routed-dispatch storages of the estimate (keys naming the routed unit), in bytes."""
    setup = check_setup(Setup(batch=BATCH, seq=SEQ, device="cpu", experts_impl=impl))
    analysis = analyze(model, plan, {"batch": BATCH, "seq": SEQ}, routed=True)
    saved = collect_saved(analysis, StorageContext(analysis, Precision.of("fp32"), "cpu"), plan, setup)
    found: dict[str, int] = {}
    for key, item in saved.items():
        if key.startswith(("routed_", "pair_weights", "gathered_weight")):
            found[key.split("@")[0]] = found.get(key.split("@")[0], 0) + item.n_bytes
    return found


def test_grouped_mm_keeps_indices_where_the_loop_keeps_the_index_add_source(small_model):
    """grouped_mm: perm // k (token gather), perm (routing-weight gather), inv_perm (un-permuting
    gather), S int64 each, and the group offsets, E int32; the loop: torch.where's [S, 2] int64
    (slot, token) pairs and index_add's source [S, D] fp32. Both keep one routing weight per
    pair, S fp32 (the dense form's [T, E] combine matrix is not what runs), and the gathered
    tokens [S, D] for the experts' dW."""
    grouped = _routed_saved(small_model, "grouped_mm")
    assert grouped == {"routed_input": PAIRS * HIDDEN * 4,          # 32·32·4 = 4096
                       "pair_weights": PAIRS * 4,                   # 32·4 = 128
                       "routed_token_index": PAIRS * 8, "routed_perm": PAIRS * 8, "routed_inv_perm": PAIRS * 8,
                       "routed_offsets": EXPERTS * 4}               # 4·4 = 16
    eager = _routed_saved(small_model, "eager")
    assert eager == {"routed_input": PAIRS * HIDDEN * 4, "pair_weights": PAIRS * 4,
                     "routed_pairs": PAIRS * 2 * 8,                 # 32·2·8 = 512
                     "routed_combine": PAIRS * HIDDEN * 4}          # 32·32·4 = 4096
    batched = _routed_saved(small_model, "batched_mm")         # its expert ids are topk's indices (a view)
    assert batched == {"routed_input": PAIRS * HIDDEN * 4, "pair_weights": PAIRS * 4,
                       "gathered_weight": PAIRS * 2 * FFN * HIDDEN * 4 + PAIRS * HIDDEN * FFN * 4}


def test_frozen_experts_keep_no_gathered_tokens_but_still_their_indices(small_model):
    """Attention LoRA: the experts' weights are frozen, so the grouped products keep no input
    (no dW), but the hidden states need a gradient (an adapter lies upstream): every gather
    still keeps its index."""
    grouped = _routed_saved(small_model, "grouped_mm", parse_plan_spec("lora=attn;rank=8"))
    assert "routed_input" not in grouped
    assert grouped["routed_token_index"] == grouped["routed_perm"] == grouped["routed_inv_perm"] == PAIRS * 8


def test_the_step_estimate_follows_the_implementation(small_model):
    """Activations differ by exactly the storages above: eager − grouped_mm = S·D·4 + S·2·8 −
    3·S·8 − E·4 = 4096 + 512 − 768 − 16 = 3824 bytes for the one layer."""
    from costlens.estimate import estimate
    figures = {impl: estimate(small_model, Plan(), Setup(batch=BATCH, seq=SEQ, device="cpu", experts_impl=impl))
               for impl in ("eager", "grouped_mm")}
    delta = figures["eager"].memory.activations - figures["grouped_mm"].memory.activations
    assert delta == PAIRS * HIDDEN * 4 + PAIRS * 2 * 8 - 3 * PAIRS * 8 - EXPERTS * 4
    assert figures["eager"].flops == figures["grouped_mm"].flops      # same products, grouped or looped


def test_an_exported_graph_defaults_to_the_implementation_its_export_traced():
    """The HF corpus index records the experts_implementation each ONNX file was exported with
    (its graph gathers expert weights: batched_mm); validate then runs the real module that way."""
    from costlens.defaults import corpus_experts_impl
    index = json.loads(open(f"{HF}/index.json", encoding="utf-8").read())
    recorded = index["archs"]["mixtral"]["exporters"]["dynamo"]
    assert corpus_experts_impl(f"{HF}/{recorded['file']}") == recorded["experts_implementation"]
    assert corpus_experts_impl("fixtures/moe_fused.onnx") is None       # not a corpus file: the loop


def test_an_unknown_implementation_is_refused():
    with pytest.raises(PlanError, match="experts implementation"):
        check_setup(Setup(experts_impl="batched"))
    from click.testing import CliRunner
    from costlens.cli import main
    result = CliRunner().invoke(main, ["plan", f"{HF}/mixtral.config.json", "--experts-impl", "batched"])
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr


def test_the_real_module_runs_the_setups_implementation():
    """A MoE class takes the setting; a class without experts builds with the default too."""
    from costlens.measure.hf_module import build_real_module
    config = transformers.AutoConfig.for_model(**SMALL)
    for impl in ("eager", "grouped_mm"):
        module = build_real_module(config, Setup(experts_impl=impl))
        assert module.config._experts_implementation == impl
    llama = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=32, vocab_size=64)
    assert build_real_module(llama, Setup()) is not None


def test_gpt_oss_down_bias_is_added_per_routed_pair():
    """GPT-OSS adds down_proj_bias to each expert's output before the routing weights multiply
    it: that sum is kept for the weights' gradient at its routed size, S·D (S = 2·8·2 = 32
    pairs, D = 64: 32·64·4 = 8192 bytes), not the dense form's E·T·D; the bias, gathered per
    pair by the sorted expert ids, keeps those ids when it trains."""
    model = analyse(load_graph(f"{HF}/gpt_oss.config.json"))
    hidden = model.roles.architecture.hidden
    by_name = {n.name: n for n in model.graph.nodes}
    outs = [by_name[u.site].outputs[0] for u in model.roles.params if u.constant.endswith("down_proj_bias")]
    for spec, bias_trains in (("full", True), ("lora=attn;rank=8", False)):
        plan = parse_plan_spec(spec)
        setup = check_setup(Setup(batch=BATCH, seq=SEQ, device="cpu", experts_impl="grouped_mm"))
        analysis = analyze(model, plan, {"batch": BATCH, "seq": SEQ}, routed=True)
        saved = collect_saved(analysis, StorageContext(analysis, Precision.of("fp32"), "cpu"), plan, setup)
        assert [saved[o].n_bytes for o in outs] == [PAIRS * hidden * 4] * len(outs) and len(outs) == 2
        ids = [item.n_bytes for key, item in saved.items() if key.startswith("routed_expert_ids@")]
        assert ids == ([PAIRS * 8] * 2 if bias_trains else [])


def _validate(arch: str, spec: str, impl: str, seq: int = 32):
    from costlens.measure.validate import validate_config
    result = validate_config(f"{HF}/{arch}.config.json", parse_plan_spec(spec),
                             Setup(batch=2, seq=seq, experts_impl=impl))
    return {c.quantity: c for c in result.comparisons}


@pytest.mark.parametrize("spec, impl", [("full", "grouped_mm"), ("lora=attn;rank=8", "grouped_mm"),
                                        ("full", "eager"), ("full", "batched_mm")])
def test_mixtral_saved_activations_match_the_real_module(spec, impl):
    """The tracker counts every saved storage exactly; what the estimate leaves out is the
    input ids the embedding keeps (2·32 int64 = 512 bytes): within 0.5%. The peak too with
    grouped_mm (the loop's and batched_mm's peaks hold weight-gradient temporaries, full-size
    per expert or per pair, that the dense-form graph does not show)."""
    rows = _validate("mixtral", spec, impl)
    assert rows["activation bytes"].estimated == pytest.approx(rows["activation bytes"].measured, rel=0.005)
    if impl == "grouped_mm":
        assert rows["peak bytes"].estimated == pytest.approx(rows["peak bytes"].measured, rel=0.005)


def test_gpt_oss_biased_experts_switch_implementation_as_the_real_module_does():
    """GPT-OSS's experts add per-expert biases after both products (the down bias is still per
    expert: its [S, D] output is what the routing weights multiply) and gather those biases by
    the sorted expert ids under grouped_mm. What switching the implementation changes must be
    what it changes in the real module (the attention-sink figures cancel out)."""
    grouped, eager = _validate("gpt_oss", "full", "grouped_mm", 16), _validate("gpt_oss", "full", "eager", 16)
    estimated = eager["activation bytes"].estimated - grouped["activation bytes"].estimated
    measured = eager["activation bytes"].measured - grouped["activation bytes"].measured
    assert estimated == pytest.approx(measured, rel=0.02)


def test_gpt_oss_attention_sink_max_keeps_only_its_indices():
    """GPT-OSS's eager attention subtracts ``logits.max(dim=-1, keepdim=True).values`` (with the
    sinks concatenated) before the softmax: max over one dim scatters its gradient through the
    indices it returns and keeps them (int64), not the scores. Priced as amax (input and output
    kept) it was +5.8% activations on the real module."""
    rows = _validate("gpt_oss", "full", "grouped_mm")
    assert rows["activation bytes"].estimated == pytest.approx(rows["activation bytes"].measured, rel=0.005)
    assert rows["peak bytes"].estimated == pytest.approx(rows["peak bytes"].measured, rel=0.005)


@pytest.mark.parametrize("spec", ["full", "lora=attn;rank=8"])
def test_grouped_mm_runs_outside_autocast_in_the_expert_weights_dtype(spec):
    """torch._grouped_mm is on no autocast list, so transformers casts the routed tokens to the
    expert weights' dtype: under bf16 autocast on fp32 weights the experts run in fp32 (fp32
    tokens kept, no half weight copies). Priced as a half matmul it was +8.9% activations with
    frozen experts and -1.9% with trained ones."""
    from costlens.measure.validate import validate_config
    result = validate_config(f"{HF}/mixtral.config.json", parse_plan_spec(spec),
                             Setup(batch=2, seq=32, experts_impl="grouped_mm", precision="bf16-autocast"))
    rows = {c.quantity: c for c in result.comparisons}
    assert rows["activation bytes"].estimated == pytest.approx(rows["activation bytes"].measured, rel=0.005)
    assert rows["peak bytes"].estimated == pytest.approx(rows["peak bytes"].measured, rel=0.005)
