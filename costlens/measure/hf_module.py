"""The truth of `costlens validate` for a Hugging Face config: the real transformers module.

The causal-LM module of the config is built with random weights (seeded; nothing is
downloaded, custom code is never run: frontends/hf_config.read_config refuses ``auto_map``),
the recipe is applied as people run it, and its real training step is measured by
``measure_step``:

- precision "fp32"; "bf16-autocast" / "fp16-autocast": fp32 weights, gradients and AdamW,
  forward and loss under ``torch.autocast`` (HF Trainer bf16=True / fp16=True; on the CPU no
  GradScaler, which holds one scalar); "bf16": ``model.to(bfloat16)`` before PEFT, so PEFT's
  default keeps the adapters fp32 on the bf16 base; "bf16-mixed" / "fp16-mixed": every
  parameter half precision, the optimizer steps fp32 master copies (step.MasterCopyOptimizer);
- attention "eager" runs ``attn_implementation="eager"``, "sdpa" and "fused" run "sdpa"
  (on the CPU torch picks its SDPA kernel; "fused" is the estimator's flash-style pricing);
- experts: ``experts_implementation=setup.experts_impl`` ("grouped_mm", transformers 5's default,
  "eager" or "batched_mm") where the model's experts class takes one;
- checkpointing: ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``;
- loss "ce" (cross-entropy of the logits against the ids), "hf" (the model's own loss,
  labels=input_ids);
- the plan's ``dropout`` is written into every dropout probability of the config (0 by
  default, so the estimate and the real module agree on where dropout runs).

``shrink_config`` makes a small model of the same architecture (``--tiny`` or explicit sizes):
heads keep their GQA group ratio, experts are kept (at most 8), per-layer lists are cut.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass

from costlens.errors import PlanError

TINY_HEAD_DIM = 16
TINY_MAX_EXPERTS = 8
TINY = {"layers": 2, "hidden": 64, "vocab": 256, "experts": TINY_MAX_EXPERTS}
HALF = {"bf16": "bfloat16", "bf16-mixed": "bfloat16", "fp16-mixed": "float16"}
AUTOCAST = {"bf16-autocast": "bfloat16", "fp16-autocast": "float16"}
# DeepSeek MLA widths: scaled with the hidden size when it shrinks
MLA_WIDTHS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_hidden_size", "moe_intermediate_size",
                     "shared_expert_intermediate_size")
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
# QLoRA as users load it: from_pretrained(dtype=D, quantization_config=BitsAndBytesConfig(compute dtype D)),
# D the precision's weight dtype; "-mixed" would cast the packed uint8 weights, autocast is not measured
QUANT_PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Dims:
    """Sizes to shrink a config to; None keeps the config's own."""

    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    vocab: int | None = None
    intermediate: int | None = None
    experts: int | None = None

    @classmethod
    def tiny(cls, **overrides) -> "Dims":
        return cls(**{**TINY, **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def given(self) -> bool:
        return any(v is not None for v in vars(self).values())


def _even(value: float, smallest: int = 2) -> int:
    return max(smallest, 2 * round(value / 2))


def shrink_config(config, dims: Dims):
    """A copy of ``config`` at ``dims`` (same model_type, same kinds of blocks)."""
    from costlens.frontends.hf_config import layer_count, shallow_config
    for name, value in vars(dims).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PlanError(f"--{name} must be a positive whole number, got {value!r}")
    layers = layer_count(config)
    small = shallow_config(config, dims.layers) if dims.layers and layers and dims.layers <= layers \
        else copy.deepcopy(config)
    if dims.layers and layers and dims.layers > layers:
        raise PlanError(f"--layers {dims.layers}: the config has {layers} layers (validate shrinks, never grows)")
    if dims.layers and getattr(small, "first_k_dense_replace", None):
        small.first_k_dense_replace = min(small.first_k_dense_replace, dims.layers // 2)
    if dims.hidden:
        _shrink_width(small, config, dims)
    elif dims.heads:
        raise PlanError("--heads needs --hidden (the head width follows from both)")
    if dims.intermediate:
        for key in INTERMEDIATE_KEYS:
            if getattr(small, key, None):
                setattr(small, key, dims.intermediate)
    if dims.vocab:
        _shrink_vocab(small, dims.vocab)
    if dims.experts:
        _shrink_experts(small, dims.experts)
    return small


def _shrink_width(small, full, dims: Dims) -> None:
    hidden, old_hidden = dims.hidden, full.hidden_size
    old_heads = getattr(full, "num_attention_heads", None) or 1
    old_kv = getattr(full, "num_key_value_heads", None) or old_heads
    group = max(1, old_heads // old_kv)                       # query heads per key/value head
    heads = dims.heads or max(1, hidden // TINY_HEAD_DIM)
    if hidden % heads:
        raise PlanError(f"--hidden {hidden} is not a multiple of {heads} heads")
    kv = max(1, heads // group)
    while heads % kv:
        kv -= 1
    small.hidden_size = hidden
    small.num_attention_heads = heads
    if getattr(full, "num_key_value_heads", None) is not None:
        small.num_key_value_heads = kv
    ratio = hidden / old_hidden
    if getattr(full, "head_dim", None) and not getattr(full, "qk_rope_head_dim", None):
        small.head_dim = hidden // heads      # (DeepSeek's MLA head_dim is its RoPE width, scaled below)
    if not dims.intermediate:
        for key in INTERMEDIATE_KEYS:
            value = getattr(full, key, None)
            if isinstance(value, int) and value:
                setattr(small, key, _even(value * ratio, 8))
    for key in MLA_WIDTHS:
        value = getattr(full, key, None)
        if isinstance(value, int) and value:
            setattr(small, key, _even(value * ratio, 4))
    if getattr(full, "qk_rope_head_dim", None) and getattr(full, "head_dim", None) == full.qk_rope_head_dim:
        small.head_dim = small.qk_rope_head_dim


def _shrink_vocab(small, vocab: int) -> None:
    small.vocab_size = vocab
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(small, key, None)
        if isinstance(value, int) and value >= vocab:
            setattr(small, key, None if key == "pad_token_id" else vocab - 1)


def _shrink_experts(small, most: int) -> None:
    for key in EXPERT_KEYS:
        experts = getattr(small, key, None)
        if isinstance(experts, int) and experts > most:
            setattr(small, key, most)
            experts = most
        if isinstance(experts, int) and experts:
            if getattr(small, "num_experts_per_tok", None):
                small.num_experts_per_tok = min(small.num_experts_per_tok, experts)
            groups = getattr(small, "n_group", None)
            if isinstance(groups, int) and groups and experts % groups:
                small.n_group = math.gcd(groups, experts)
                small.topk_group = min(getattr(small, "topk_group", 1) or 1, small.n_group)


# --------------------------------------------------------------------------- the recipe

def check_recipe(setup, device: str) -> None:
    """Refuse (PlanError, one line) what cannot be measured here, saying why."""
    import importlib.util
    import torch
    needs_bnb = [f"--quant {setup.base_quant}"] if getattr(setup, "base_quant", None) else []
    needs_bnb += ["--optimizer adamw-8bit"] if setup.optimizer == "adamw-8bit" else []
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        raise PlanError(f"validate cannot measure {' and '.join(needs_bnb)}: bitsandbytes is not installed "
                        "(pip install 'costlens[quant]'); the estimate still prices it (costlens plan)")
    if getattr(setup, "base_quant", None) and setup.precision not in QUANT_PRECISIONS:
        raise PlanError(f"validate measures --quant with --precision {' or '.join(QUANT_PRECISIONS)} (the weights "
                        f"and bitsandbytes' compute dtype), not {setup.precision}")
    if setup.precision == "fp16-autocast" and not _autocast_fp16_works(torch, device):
        raise PlanError(f"fp16-autocast: torch {torch.__version__} has no float16 autocast on {device}")


def _autocast_fp16_works(torch, device: str) -> bool:
    try:
        with torch.autocast(torch.device(device).type, dtype=torch.float16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    except Exception:  # noqa: BLE001 - an autocast torch does not offer
        return False


def step_recipe(setup):
    """The step.StepRecipe of a Setup."""
    import torch
    from costlens.measure.step import StepRecipe
    autocast = getattr(torch, AUTOCAST[setup.precision]) if setup.precision in AUTOCAST else None
    return StepRecipe(loss=setup.loss, autocast=autocast, master_weights=setup.precision.endswith("-mixed"))


def _set_dropout(config, probability: float) -> None:
    """Every dropout probability of the config (and of its sub-configs) to ``probability``."""
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and not isinstance(value, bool) and (
                "dropout" in key or key.endswith("pdrop")) and not key.startswith("_"):
            setattr(config, key, probability)


def build_real_module(config, setup, dropout: float = 0.0, seed: int = 0):
    """The real causal-LM module of ``config`` on the CPU, with random (seeded) weights, in
    training mode, with the setup's attention kernel, checkpointing and pure-bf16 weights."""
    import torch
    from costlens.frontends.hf_config import ConfigError, transformers_offline
    transformers = transformers_offline()
    config = copy.deepcopy(config)
    config.use_cache = False
    _set_dropout(config, dropout)
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"unsupported architecture {config.model_type!r} (transformers {transformers.__version__} "
                          "has no causal-LM model for it)")
    torch.manual_seed(seed)
    attention = "eager" if setup.attention == "eager" else "sdpa"
    # pure bf16 as from_pretrained(dtype=bfloat16) builds it: parameters bf16, buffers computed in
    # fp32 (RoPE inv_freq) stay fp32; built before PEFT, so its adapters stay fp32 (PEFT's default)
    dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
    kwargs = dict(attn_implementation=attention, dtype=dtype, **_experts_kwargs(transformers, config, setup))
    try:
        module = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        if getattr(setup, "base_quant", None):
            module = _quantized(transformers, module, setup, kwargs)
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build, in one line
        raise ConfigError(f"could not build the {config.model_type} module ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e
    module.train()
    if setup.checkpointing:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return module


def bnb_config(transformers, setup, dtype):
    """The ``BitsAndBytesConfig`` of ``setup.base_quant`` as QLoRA users write it: nf4 (with double
    quantization for "nf4-dq") computing in ``dtype``, or LLM.int8 (``load_in_8bit``)."""
    if setup.base_quant == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=setup.base_quant == "nf4-dq",
                                           bnb_4bit_compute_dtype=dtype)


def _quantized(transformers, module, setup, kwargs: dict):
    """``module`` loaded back quantized, the way QLoRA runs: saved to a temporary folder and read by
    ``from_pretrained(quantization_config=...)`` on the CPU (transformers' bitsandbytes integration
    swaps each nn.Linear but the head for a Linear4bit / Linear8bitLt). No
    ``prepare_model_for_kbit_training``: norms and embeddings keep the precision's dtype, as priced."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="costlens-qlora-") as folder, _quiet_loading(transformers):
        count_bnb_flops()       # imports bitsandbytes (which logs a missing optional CPU kernel) quietly
        module.save_pretrained(folder)
        del module
        # loaded on the measured device itself: measure_step's .to(device) is then a no-op and the quantization
        # state registered below stays the one storage the layers read
        quantized = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=bnb_config(transformers, setup, kwargs["dtype"]),
            device_map=getattr(setup, "device", None) or "cpu", **kwargs)
    expose_quant_state(quantized)
    return quantized


def quant_state_tensors(weight) -> list:
    """The tensors beside a bitsandbytes weight's packed data that it needs to compute: nf4's
    per-block absmax and code table (double quantization: uint8 absmax, the second-level absmax,
    code and offset); int8's per-row scales (``SCB``). Empty for any other weight."""
    state = getattr(weight, "quant_state", None)
    if state is not None:
        tensors = [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        return tensors
    scales = getattr(weight, "SCB", None)
    return [scales] if scales is not None else []


def expose_quant_state(module) -> None:
    """bitsandbytes keeps each quantized weight's scales and code tables on the weight object, not as
    parameters or buffers, so the measurement (which counts parameters and buffers as weights) would
    not see them although they live as long as the weight: registered as non-persistent buffers of
    their layer (the same storages; the state_dict is unchanged)."""
    for layer in list(module.modules()):
        for index, tensor in enumerate(quant_state_tensors(getattr(layer, "weight", None))):
            layer.register_buffer(f"costlens_quant_state_{index}", tensor, persistent=False)


def _gemm_4bit_flops(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
    """2·M·N·K of ``bitsandbytes::gemm_4bit`` (A [..., K] against the [N, K] weight it dequantizes
    inside the op): FlopCounterMode has no formula for it and would miss every forward matmul of a
    4-bit linear (its backward runs aten.matmul on a dequantized copy, which torch counts)."""
    return 2 * math.prod(a_shape[:-1]) * shape_b[0] * shape_b[1]


def count_bnb_flops() -> None:
    """Give torch's FlopCounterMode the formula of bitsandbytes' fused 4-bit matmul (once)."""
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula
    import bitsandbytes  # noqa: F401  (registers the torch.ops.bitsandbytes namespace)
    op = torch.ops.bitsandbytes.gemm_4bit
    if op.default not in flop_registry:
        register_flop_formula(op)(_gemm_4bit_flops)


@contextmanager
def _quiet_loading(transformers):
    """No progress bars or load reports on the terminal while the quantized copy is written and read."""
    import logging
    verbosity = transformers.logging.get_verbosity()
    bnb_logger = logging.getLogger("bitsandbytes")
    level = bnb_logger.level
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    bnb_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
        bnb_logger.setLevel(level)


def _experts_kwargs(transformers, config, setup) -> dict:
    """``experts_implementation`` of the setup, for a class whose experts take one (transformers'
    ``@use_experts_implementation``); other classes refuse the keyword and run their own loop."""
    cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    can_set = getattr(cls, "_can_set_experts_implementation", None)
    return {"experts_implementation": setup.experts_impl} if can_set is not None and can_set() else {}


def to_half_after_plan(module, setup):
    """"bf16-mixed" / "fp16-mixed": every parameter (adapters too) in half precision; buffers
    keep their dtype, as from_pretrained(dtype=...) leaves them."""
    import torch
    if setup.precision in ("bf16-mixed", "fp16-mixed"):
        half = getattr(torch, HALF[setup.precision])
        for parameter in module.parameters():
            parameter.data = parameter.data.to(half)
    return module


def truth_label(module) -> str:
    """"real module (transformers X.Y Class)" of a (PEFT-wrapped) transformers module."""
    import transformers
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    version = ".".join(transformers.__version__.split(".")[:2])
    return f"real module (transformers {version} {type(base).__name__})"
