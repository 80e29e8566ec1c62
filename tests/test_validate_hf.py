"""validate on Hugging Face configs: the truth is the real transformers module (issue 10).

Expected figures come from the real module itself (its named_parameters, dtypes and shapes,
built here with transformers directly), never from costlens's own output."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402

from costlens.cli import main  # noqa: E402
from costlens.measure.hf_module import Dims, shrink_config  # noqa: E402
from costlens.measure.validate import validate_config  # noqa: E402
from costlens.plans import Setup, parse_plan_spec  # noqa: E402

BATCH, SEQ = 2, 16
LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 128, "max_position_embeddings": 64}
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 64, "vocab_size": 128,
        "n_positions": 64}


@pytest.fixture(params=["llama", "gpt2"])
def config_file(request, tmp_path):
    path = tmp_path / f"{request.param}.json"
    path.write_text(json.dumps(LLAMA if request.param == "llama" else GPT2))
    return path


def _reference(path):
    """The real module built here, straight from transformers (fp32, random weights)."""
    data = json.loads(path.read_text())
    config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    return transformers.AutoModelForCausalLM.from_config(config)


def _figures(result):
    return {c.quantity: c.measured for c in result.comparisons}


def _distinct(module):
    return list({id(p): p for p in module.parameters()}.values())


def _attn_lora_params(module, rank):
    """r·(d_in + d_out) per adapted attention projection, read from the module's own weights."""
    total = 0
    for name, sub in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") and isinstance(sub, torch.nn.Linear):
            total += rank * (sub.in_features + sub.out_features)
        if leaf in ("c_attn", "c_proj") and ".attn." in f".{name}." and type(sub).__name__ == "Conv1D":
            d_in, d_out = sub.weight.shape                   # GPT-2's Conv1D stores [in, out]
            total += rank * (d_in + d_out)
    return total


@pytest.mark.parametrize("spec", ["full", "lora-attn:lora=attn;rank=8", "ffn:train=ffn"])
def test_real_module_is_the_truth_and_trainable_params_come_from_it(config_file, spec):
    result = validate_config(config_file, parse_plan_spec(spec), Setup(batch=BATCH, seq=SEQ))
    reference = _reference(config_file)
    assert result.truth == f"real module (transformers {'.'.join(transformers.__version__.split('.')[:2])} " \
                           f"{type(reference).__name__})"
    if spec == "full":
        expected = sum(p.numel() for p in _distinct(reference))
    elif "lora" in spec:
        expected = _attn_lora_params(reference, 8)
    else:
        expected = sum(p.numel() for n, p in reference.named_parameters() if ".mlp." in n)
    assert _figures(result)["trainable params"] == expected


DTYPE_BYTES = {"fp32": (4, 4), "bf16-autocast": (4, 4), "bf16": (2, 2), "bf16-mixed": (2, 2)}


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16", "bf16-mixed"])
def test_each_precision_measures_weights_and_gradients_of_its_dtype(precision, tmp_path):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(LLAMA))
    result = validate_config(path, parse_plan_spec("full"), Setup(batch=BATCH, seq=SEQ, precision=precision))
    reference = _reference(path)
    weight_size, grad_size = DTYPE_BYTES[precision]
    numel = sum(p.numel() for p in _distinct(reference))
    buffers = sum(b.numel() * b.element_size() for b in reference.buffers())   # RoPE inv_freq stays fp32
    figures = _figures(result)
    assert figures["weights bytes"] == numel * weight_size + buffers
    assert figures["gradient bytes"] == numel * grad_size
    # AdamW: two moments in the parameter's dtype (+ one fp32 master copy under "-mixed"), a step scalar each
    moments = 2 * numel * (4 if precision.endswith("mixed") else weight_size)
    master = 4 * numel if precision.endswith("mixed") else 0
    steps = 4 * len(_distinct(reference))
    assert figures["optimizer bytes"] == moments + master + steps


def test_pure_bf16_keeps_peft_adapters_in_fp32(tmp_path):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(LLAMA))
    result = validate_config(path, parse_plan_spec("lora=attn;rank=4"), Setup(batch=BATCH, seq=SEQ, precision="bf16"))
    adapters = _attn_lora_params(_reference(path), 4)
    assert _figures(result)["gradient bytes"] == 4 * adapters          # fp32 adapters on a bf16 base


@pytest.mark.parametrize("overrides", [{"attention": "sdpa"}, {"checkpointing": True}, {"loss": "hf"},
                                       {"precision": "fp16-autocast"}, {"optimizer": "adafactor"}])
def test_other_recipes_run_on_the_real_module(overrides, tmp_path):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(LLAMA))
    result = validate_config(path, parse_plan_spec("full"), Setup(batch=BATCH, seq=SEQ, **overrides))
    reference = _reference(path)
    numel = sum(p.numel() for p in _distinct(reference))
    assert _figures(result)["gradient bytes"] == 4 * numel
    assert _figures(result)["activation bytes"] > 0


def test_checkpointing_saves_less_than_the_plain_step(tmp_path):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(LLAMA))
    plain, ckpt = (validate_config(path, parse_plan_spec("full"), Setup(batch=BATCH, seq=SEQ, checkpointing=c))
                   for c in (False, True))
    assert _figures(ckpt)["activation bytes"] < _figures(plain)["activation bytes"]
    assert _figures(ckpt)["step FLOPs"] > _figures(plain)["step FLOPs"]    # the recompute


def test_lora_dropout_keeps_a_dropped_copy(tmp_path):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(LLAMA))
    runs = [validate_config(path, parse_plan_spec(f"lora=attn;rank=4;lora-dropout={p}"), Setup(batch=BATCH, seq=SEQ))
            for p in (0.0, 0.1)]
    assert _figures(runs[1])["activation bytes"] > _figures(runs[0])["activation bytes"]


def test_tiny_shrinks_heads_keeping_the_gqa_ratio():
    config = transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256)
    small = shrink_config(config, Dims.tiny())
    assert (small.num_hidden_layers, small.hidden_size, small.vocab_size) == (2, 64, 256)
    assert small.num_attention_heads // small.num_key_value_heads == 32 // 8
    assert small.intermediate_size == 224                    # 14336 * 64 / 4096


def test_memory_preflight_refuses_and_suggests_tiny(tmp_path):
    from costlens.errors import PlanError
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(LLAMA))
    with pytest.raises(PlanError, match="--tiny"):
        validate_config(path, parse_plan_spec("full"), Setup(batch=BATCH, seq=SEQ), free_memory=1000)


def test_cli_reports_the_truth_in_json(tmp_path):
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps(GPT2))
    result = CliRunner().invoke(main, ["validate", str(path), "--batch", "2", "--seq", "16", "--json",
                                       "--lora", "attn", "--precision", "bf16-autocast"])
    document = json.loads(result.stdout)
    assert document["truth"].startswith("real module (transformers ") and "GPT2LMHeadModel" in document["truth"]
    assert document["setup"]["precision"] == "bf16-autocast"
    assert result.exit_code in (0, 1)


def test_cli_tiny_shrinks_both_estimate_and_truth(tmp_path):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps({**LLAMA, "hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 4}))
    result = CliRunner().invoke(main, ["validate", str(path), "--tiny", "--hidden", "32", "--batch", "2", "--seq",
                                       "16", "--json"])
    rows = {c["quantity"]: c for c in json.loads(result.stdout)["comparisons"]}
    # heads of 16 keeping 2 query heads per KV head; the FFN width scales with the hidden size (64 * 32/128)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=16, vocab_size=256,
                                      max_position_embeddings=64)
    expected = sum(p.numel() for p in _distinct(transformers.AutoModelForCausalLM.from_config(config)))
    assert rows["trainable params"]["measured"] == rows["trainable params"]["estimated"] == expected


def _one_line_exit_2(args):
    result = CliRunner().invoke(main, args)
    lines = [line for line in result.stderr.splitlines() if line.startswith(("costlens: error", "Error:"))]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(LLAMA))
    assert "--precision" in _one_line_exit_2(["validate", str(path), "--precision", "fp8"])
    assert "cuda" in _one_line_exit_2(["validate", str(path), "--device", "cuda"]) or torch.cuda.is_available()
    assert "chunked" in _one_line_exit_2(["validate", str(path), "--loss", "chunked"])
    onnx = tmp_path / "lonely.onnx"
    onnx.write_bytes(b"not used")
    assert "--tiny" in _one_line_exit_2(["validate", str(onnx), "--tiny"])


def test_grouped_mm_experts_are_counted_as_the_eager_loop_counts_them():
    """transformers' fused experts run torch._grouped_mm, which torch's FlopCounterMode has no
    formula for; the eager experts loop runs plain mm's that it counts. Same model, same FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode
    import costlens.measure.step  # noqa: F401 - registers the _grouped_mm formula
    config = transformers.MixtralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=32, vocab_size=64,
                                        num_local_experts=4, num_experts_per_tok=2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    counts = []
    for implementation in ("grouped_mm", "eager"):
        torch.manual_seed(0)
        module = transformers.AutoModelForCausalLM.from_config(config, experts_implementation=implementation)
        with FlopCounterMode(display=False) as counter:
            module(ids).logits.sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_cpu_sdpa_kernel_flops_are_counted():
    """SDPA's CPU flash kernel has no FlopCounterMode formula in torch; counted here, its forward
    equals the eager QKᵀ and PV bmm's, and its backward adds the recomputed QKᵀ (one S x S x D
    matmul per head: 2·B·H·S·S·D FLOPs), as torch counts its CUDA flash kernels."""
    from torch.utils.flop_counter import FlopCounterMode
    import costlens.measure.step  # noqa: F401 - registers the CPU SDPA formulas
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=32, vocab_size=64)
    batch, seq, heads, head_dim = 2, 8, 4, 8
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(0))
    counts = {}
    for implementation in ("sdpa", "eager"):
        torch.manual_seed(0)
        module = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
        with FlopCounterMode(display=False) as counter:
            loss = module(ids).logits.sum()
            forward = counter.get_total_flops()
            loss.backward()
        counts[implementation] = forward, counter.get_total_flops()
    assert counts["sdpa"][0] == counts["eager"][0]
    assert counts["sdpa"][1] == counts["eager"][1] + 2 * batch * heads * seq * seq * head_dim


def test_cuda_step_bytes_are_above_the_device_baseline_before_the_module(monkeypatch):
    """The CUDA figure beside the estimated peak: the allocator's peak minus what the device held
    before the module moved there (a stand-in allocator: no GPU needed)."""
    from costlens.measure.step import _AllocatorWatch
    from costlens.measure.tracker import Phase
    fake = {"allocated": 300, "peak": 300}                # 300 bytes of someone else's tensors
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: fake["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: fake["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: fake.update(peak=fake["allocated"]))
    watch = _AllocatorWatch("cuda")
    watch.before_module()
    fake.update(allocated=1300, peak=1300)               # the module, its gradients and state: 1000 bytes
    watch.start()
    with watch.phase(Phase.BACKWARD):
        fake.update(peak=2000)                           # 700 bytes of activations and gradients at the peak
    result = watch.result()
    assert (result.step_bytes, result.above_baseline_bytes) == (2000 - 300, 2000 - 1300)


def test_tiny_deepseek_keeps_mla_consistent_and_builds():
    """DeepSeek's head_dim is its RoPE width (qk_rope_head_dim), not hidden/heads: shrunk together."""
    config = transformers.DeepseekV3Config(hidden_size=1024, num_hidden_layers=6, num_attention_heads=16,
                                           num_key_value_heads=16, intermediate_size=2048, moe_intermediate_size=256,
                                           n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                           q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=32,
                                           qk_nope_head_dim=64, v_head_dim=64, vocab_size=4096,
                                           first_k_dense_replace=3)
    small = shrink_config(config, Dims.tiny())
    assert small.head_dim == small.qk_rope_head_dim == 4          # 32 * 64 / 1024, at least 4
    assert small.n_routed_experts == 8 and 8 % small.n_group == 0 and small.first_k_dense_replace == 1
    module = transformers.AutoModelForCausalLM.from_config(small)
    module(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()


def test_executor_truth_is_labelled_apart():
    from pathlib import Path
    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "gpt2.onnx"
    result = CliRunner().invoke(main, ["validate", str(fixture), "--seq", "16", "--json"])
    assert json.loads(result.stdout)["truth"] == "costlens executor (ONNX graph)"
