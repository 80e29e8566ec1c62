"""Hugging Face configs -> meta-device modules (transformers belongs to the torch extra).

A ``config.json`` (or a model folder holding one) is read as JSON and turned into the
architecture's config class; the model is built from it with ``AutoModelForCausalLM`` on the
meta device, with eager attention (so the attention core is visible in the trace), in float32
or in the half dtype the plan runs in (``dtype``: HF code upcasts softmax, norms and RoPE to
fp32 in a half model, and only a half trace shows those casts). Nothing is downloaded — the hub is switched offline before transformers is imported
and configs with custom code (``auto_map``) are refused — and no weight file is opened.

MoE experts of transformers 5.x (fused 3-D tensors run by ``_grouped_mm`` or a per-token
weight gather) are traced in their dense-dispatch form: every expert's matmul over all
tokens, combined by the router's sparse top-k weights. The result is the same; the form is
the one costlens prices, counting each expert matmul at k/E of the tokens — the routed
tokens only.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

from costlens.errors import AbsurdModelError, CostlensError


class ConfigError(CostlensError):
    """A config costlens cannot build a model from (unreadable, unsupported architecture)."""


def transformers_offline():
    """Import transformers with the hub switched off (never a download). Nothing here calls
    the hub anyway (configs are read as JSON, models built from them); if the caller
    imported transformers already, its settings are left alone."""
    if "transformers" not in sys.modules:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError as e:
        raise ConfigError("reading a Hugging Face config needs transformers (pip install 'costlens[torch]')") from e
    transformers.logging.set_verbosity_error()
    return transformers


def read_config(source: str | os.PathLike):
    """The transformers config of a ``config.json`` file or a folder holding one."""
    data, file = read_config_data(source)
    return config_from_data(data, file)


def read_config_data(source: str | os.PathLike) -> tuple[dict, Path]:
    """(the checked JSON of a ``config.json`` file or a folder holding one, the file); no
    transformers import, so a cached trace of it can be found without one."""
    path = Path(source)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{source}: no config.json found" if path.is_dir() else f"{source}: no such file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not a readable JSON config ({e})") from e
    except RecursionError:
        raise ConfigError(f"{file}: not a Hugging Face config (JSON nested too deeply)") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(f"{file}: not a Hugging Face config (no model_type)")
    check_config(data, file)
    return data, file


def config_from_data(data: dict, file) -> object:
    """The transformers config object of a checked config JSON (``read_config_data``)."""
    data = dict(data)
    transformers = transformers_offline()
    model_type = data.pop("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ConfigError(f"{file}: unsupported architecture {model_type!r} "
                          f"(not in transformers {transformers.__version__}; custom code is never run)")
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except Exception as e:  # noqa: BLE001 - a malformed config, reported in one line
        raise ConfigError(f"{file}: invalid {model_type} config ({type(e).__name__}: {e})") from e


# Sizes a config declares, checked before transformers sees them: a model is built on the meta
# device, but a 10**7-layer config still builds 10**7 modules and 10**12-wide ones overflow.
# Keys a config must give as a positive whole number (when present and not null) ...
POSITIVE_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
                  "n_embd", "n_layer", "n_head", "d_model", "num_key_value_heads", "head_dim", "n_inner",
                  "max_position_embeddings", "n_positions", "num_experts_per_tok", "moe_intermediate_size")
# ... and counts that may be 0 (no shared experts, dense layers first)
COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "n_shared_experts",
          "shared_expert_intermediate_size", "first_k_dense_replace")
MAX_LAYERS = 1024        # published models have at most a few hundred blocks
MAX_DIM, MAX_ELEMENTS = 2**40, 2**45    # as the ONNX front end (costlens.frontends.onnx)
SHALLOW_BLOCKS = 2      # blocks a uniform stack is traced with before replication (load_config_graph)


def check_config(data: dict, file) -> None:
    """Refuse what a config must never be: custom code, a model_type that is not a name,
    sizes that are not whole numbers or are absurd (AbsurdModelError)."""
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"{file}: model_type must be a string, got {model_type!r}")
    if data.get("auto_map") is not None:
        names = data["auto_map"] if isinstance(data["auto_map"], dict) else {}
        raise ConfigError(f"{file}: the config names custom code (auto_map: {', '.join(map(str, names)) or '?'}); "
                          "costlens never runs a model's own code")
    for key in POSITIVE_SIZES + COUNTS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{file}: {key} must be a whole number, got {value!r}")
        smallest = 1 if key in POSITIVE_SIZES else 0
        if value < smallest or value > MAX_DIM:
            raise AbsurdModelError(f"{file}: absurd {key} = {value}")
    heads = data.get("num_attention_heads") or data.get("n_head")
    width = data.get("hidden_size") or data.get("n_embd") or data.get("d_model") or 0
    if heads and width and heads > width:
        raise AbsurdModelError(f"{file}: absurd config: {heads} attention heads for a hidden size of {width}")
    if heads and data.get("num_key_value_heads") and data["num_key_value_heads"] > heads:
        raise AbsurdModelError(f"{file}: absurd config: {data['num_key_value_heads']} key/value heads "
                               f"for {heads} attention heads")
    layers = data.get("num_hidden_layers") or data.get("n_layer") or 0
    if layers > MAX_LAYERS:
        raise AbsurdModelError(f"{file}: absurd number of layers ({layers}; at most {MAX_LAYERS})")
    for key in ("vocab_size", "intermediate_size", "moe_intermediate_size"):
        if isinstance(data.get(key), int) and width * data[key] > MAX_ELEMENTS:
            raise AbsurdModelError(f"{file}: absurd size: {key} x hidden size = {width * data[key]:,} elements")


TRACE_DTYPES = ("float32", "bfloat16", "float16")


def build_model(config, source: str = "config", dtype: str = "float32"):
    """The causal-LM module of ``config`` on the meta device (eager attention), its parameters
    in ``dtype`` as ``from_pretrained(dtype=...)`` makes them: a model that runs in half keeps
    the fp32 upcasts of its own code (softmax, norms, RoPE) visible as casts in the trace."""
    import torch
    transformers = transformers_offline()
    config = copy.deepcopy(config)
    config.use_cache = False
    model_type = getattr(config, "model_type", "?")
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"{source}: unsupported architecture {model_type!r} (transformers "
                          f"{transformers.__version__} has no causal-LM model for it)")
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(_encoder_decoder_refusal(config, source, transformers))
    try:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                                 dtype=getattr(torch, dtype))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{source}: could not build a {model_type} model from its config "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def _encoder_decoder_refusal(config, source: str, transformers) -> str:
    """Why an encoder-decoder config is refused, with what would be missing (issue 16 item 4).
    Its causal-LM class (WhisperForCausalLM, BartForCausalLM) is the decoder alone: traced on
    token ids it runs no encoder and skips every cross-attention, so pricing it would silently
    price a smaller model. The parameter counts come from the full model built on the meta device."""
    import torch
    model_type = getattr(config, "model_type", "?")
    counts = ""
    for mapping in ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING"):
        classes = getattr(transformers, mapping, {})
        if type(config) not in classes:
            continue
        model_class = classes[type(config)]
        try:
            with torch.device("meta"):
                full = model_class(copy.deepcopy(config))
            total = sum(p.numel() for p in full.parameters())
            encoder = sum(p.numel() for p in full.get_encoder().parameters())
            counts = f" ({total:,} parameters, {encoder:,} of them in the encoder)"
        except Exception:  # noqa: BLE001 - the counts only decorate the refusal
            counts = ""
        break
    return (f"{source}: {model_type!r} is an encoder-decoder model{counts}: costlens prices one stack of "
            "blocks (decoder-only or encoder-only) and cannot place the encoder and the decoder's "
            "cross-attention; refused rather than priced as its decoder alone")


def layer_count(config) -> int | None:
    """The config's number of decoder blocks, or None when it does not say."""
    value = getattr(config, "num_hidden_layers", None)
    return value if isinstance(value, int) else None


def shallow_config(config, layers: int):
    """A copy with ``layers`` blocks; per-layer lists are cut to their first entries."""
    full = layer_count(config)
    shallow = copy.deepcopy(config)
    for key, value in vars(config).items():
        if isinstance(value, (list, tuple)) and full and len(value) == full and not key.startswith("_"):
            setattr(shallow, key, type(value)(value[:layers]))
    shallow.num_hidden_layers = layers
    return shallow


# --------------------------------------------------------------------------- structure

def layer_container(model, layers: int) -> str | None:
    """Module path of the ModuleList holding the model's ``layers`` repeated blocks."""
    from torch import nn
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers and layers > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                return name
    return None


def layer_signature(block) -> tuple:
    """What makes two blocks the same: submodule types, parameter shapes and every plain
    attribute (sliding windows, layer types, ...) except the block's own index."""
    items = []
    for name, module in block.named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(module).items()
                             if isinstance(v, (int, float, str, bool, type(None)))
                             and k not in ("layer_idx", "layer_id", "training", "_is_full_backward_hook")))
        params = tuple((n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False))
        items.append((name, type(module).__name__, attrs, params))
    return tuple(items)


# The canonical forms of transformers modules for tracing (dense-dispatch experts, one-op
# activations) live in canonical.py, which every torch front end reads.


# --------------------------------------------------------------------------- the front end

def load_config_graph(config, *, source: str = "config", shallow: bool = True, dtype: str = "float32"):
    """The graph IR of the model a config describes. With ``shallow`` (the default) a model
    whose blocks are alike from some block ``p`` on (``p`` = 0 for most; DeepSeek-V3's first
    three blocks are dense, the rest MoE) is traced with ``p + 2`` blocks and the graph
    replicated to full depth (replicate.py); otherwise, or when replication refuses, the
    full model is traced. ``dtype``: the parameters' dtype (TRACE_DTYPES), the one that runs."""
    if dtype not in TRACE_DTYPES:
        raise ConfigError(f"unknown trace dtype {dtype!r} (choose from {', '.join(TRACE_DTYPES)})")
    from costlens.frontends.replicate import ReplicationError, replicate_blocks
    from costlens.frontends.torch_export import load_torch

    model = build_model(config, source, dtype)
    layers = layer_count(config)
    container = layer_container(model, layers) if layers else None
    if shallow and layers and container:
        first = _uniform_tail(model, container, layers)
        depth = first + SHALLOW_BLOCKS
        if layers > depth:
            small = build_model(shallow_config(config, depth), source, dtype)
            if layer_container(small, depth) == container and all(
                    layer_signature(small.get_submodule(f"{container}.{i}"))
                    == layer_signature(model.get_submodule(f"{container}.{i}")) for i in range(depth)):
                graph = load_torch(small, source=source)
                try:
                    return replicate_blocks(graph, container, layers, first)
                except ReplicationError:
                    pass
    return load_torch(model, source=source)


def _uniform_tail(model, container: str, layers: int) -> int:
    """The first block from which every block has the last block's signature (0: all alike)."""
    blocks = model.get_submodule(container)
    last = layer_signature(blocks[layers - 1])
    first = layers - 1
    while first > 0 and layer_signature(blocks[first - 1]) == last:
        first -= 1
    return first


# --------------------------------------------------------------------------- cached

def load_config_file(source: str | os.PathLike, *, name: str | None = None, dtype: str = "float32"):
    """The graph IR of a ``config.json`` file (or a folder holding one), read from the graph
    cache (graph_cache.py) when this config was traced before by the same code and versions;
    otherwise traced (``load_config_graph``) and stored. Same graph either way."""
    from dataclasses import replace

    from costlens.frontends import graph_cache

    name = name or os.fspath(source)
    data, file = read_config_data(source)
    described = {"config": data, "shallow_blocks": SHALLOW_BLOCKS, "tracer": "export"}
    if dtype != "float32":          # fp32 keys stay as they were: their entries are still valid
        described["dtype"] = dtype
    key = graph_cache.cache_key(described)
    cached = graph_cache.load_graph_entry(key)
    if cached is not None:
        return replace(cached, source=name)
    graph = load_config_graph(config_from_data(data, file), source=name, dtype=dtype)
    graph_cache.store_graph_entry(key, replace(graph, source=""))    # the entry is the same for any path
    return graph
