"""The attention implementation a source runs when nobody chooses one (issue 16 item 3).

transformers builds a model with SDPA when its class supports it (``_supports_sdpa``) and eager
attention otherwise (gemma2, gpt_oss in transformers 5.24), unless the config names an
implementation. Pricing a newcomer's 7B LoRA as eager when the Trainer runs SDPA triples its
activations, so the default follows the source:

- HF ``config.json``, model folder, hub id, config object: the config's ``attn_implementation``
  (``_attn_implementation``) if set, else what transformers would pick for the causal-LM class of
  its ``model_type`` (read from the class, no module is built);
- ``.onnx`` file: eager, what the file computes (its attention is written out as MatMul/Softmax
  ops; fused attention ops are priced as the kernels they are whatever the setting);
- import spec or module: eager, the module's own attention as traced.

An explicit ``--attention`` always wins; this module is asked only when none was given.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from costlens.errors import CostlensError

# transformers' attn_implementation -> the costlens attention it is priced as
#   flash / flex attention (and kernel-hub flash kernels) save the output and a log-sum-exp only
_CONFIG_NAMES = {"eager": "eager", "paged|eager": "eager", "sdpa": "sdpa", "paged|sdpa": "sdpa"}
_FUSED_PREFIXES = ("flash_attention", "flex_attention", "paged|flash_attention", "kernels-community/")
ONNX_FUSED_OPS = ("com.microsoft.Attention", "com.microsoft.MultiHeadAttention",
                  "com.microsoft.GroupQueryAttention", "com.microsoft.PackedAttention",
                  "com.microsoft.PackedMultiHeadAttention", "Attention")


@dataclass(frozen=True)
class AttentionDefault:
    """The attention a source runs by default (``value``: one of plans.ATTENTION_IMPLS) and why,
    as the header's derived defaults print it."""

    value: str
    why: str
    from_config: bool = True     # read from a Hugging Face config (False: what an ONNX graph or module shows)


def default_attention(source, revision: str | None = None) -> AttentionDefault:
    """What ``source`` (anything load_graph takes) runs when no attention is chosen."""
    from costlens.frontends.source import SourceKind, classify
    found = classify(source, revision)
    if found.kind is SourceKind.ONNX:
        return _onnx_default(found.path)
    if found.kind is SourceKind.HF_CONFIG:
        from costlens.frontends.hf_config import read_config_data
        return config_default(read_config_data(found.path)[0])
    if found.kind is SourceKind.HUB_ID:
        from costlens.frontends.hf_config import read_config_data
        return config_default(read_config_data(_hub_config(found.text, revision))[0])
    if found.kind is SourceKind.CONFIG_OBJECT:
        return config_default(found.value.to_dict())
    return AttentionDefault("eager", "the module's own attention, as traced", from_config=False)


def _hub_config(repo_id: str, revision: str | None):
    """The hub id's config.json: from the local cache when loading already fetched it (no
    second request to the hub), else fetched."""
    from costlens.frontends.hub import cache_dir, check_no_remote_code, hub_config_path
    try:
        import huggingface_hub
        found = huggingface_hub.try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir(),
                                                       revision=revision)
    except ImportError:
        found = None
    if isinstance(found, str):
        check_no_remote_code(Path(found), repo_id)
        return Path(found)
    return hub_config_path(repo_id, revision)


def config_default(data: dict) -> AttentionDefault:
    """The default of a Hugging Face config (its JSON as a dict)."""
    named = data.get("attn_implementation") or data.get("_attn_implementation") \
        or data.get("_attn_implementation_internal")
    if isinstance(named, str):
        return AttentionDefault(_priced_as(named), f"from the config's attn_implementation {named!r}")
    if data.get("output_attentions"):        # transformers dispatches eager to return the probabilities
        return AttentionDefault("eager", "the config sets output_attentions (transformers then runs eager)")
    name, supports = _class_facts(data.get("model_type"))
    if name is None:
        return AttentionDefault("eager", f"no transformers causal-LM class for {data.get('model_type')!r}")
    if supports is None:
        return AttentionDefault("eager", f"{name} decides per instance whether it supports SDPA (give --attention)")
    if supports:
        return AttentionDefault("sdpa", f"transformers' default for {name} (it supports SDPA)")
    return AttentionDefault("eager", f"transformers' default for {name} (it has no SDPA attention)")


def _priced_as(named: str) -> str:
    if named in _CONFIG_NAMES:
        return _CONFIG_NAMES[named]
    if named.startswith(_FUSED_PREFIXES):
        return "fused"
    raise CostlensError(f"the config's attn_implementation {named!r} is not one costlens prices: "
                        "give --attention eager, sdpa or fused")


def _class_facts(model_type) -> tuple[str | None, bool | None]:
    """(causal-LM class name, its ``_supports_sdpa``) of a model type, from the graph cache when
    this transformers version was asked before: a warm ``plan`` on a config never imports it."""
    from costlens.frontends import graph_cache
    key = graph_cache.cache_key({"fact": "causal_lm_sdpa", "model_type": model_type}) \
        if isinstance(model_type, str) else None
    cached = graph_cache.load_fact(key)
    if isinstance(cached, list) and len(cached) == 2:
        return cached[0], cached[1]
    name = causal_lm_class_name(model_type)
    facts = (name, _supports_sdpa(name) if name is not None else None)
    graph_cache.store_fact(key, list(facts))
    return facts


def causal_lm_class_name(model_type) -> str | None:
    """The class AutoModelForCausalLM builds for ``model_type`` (as hf_config.build_model does)."""
    if not isinstance(model_type, str):
        return None
    from costlens.frontends.hf_config import transformers_offline
    transformers_offline()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def _supports_sdpa(class_name: str) -> bool | None:
    """The class attribute transformers reads (None: not a plain flag on the class)."""
    import transformers
    cls = getattr(transformers, class_name, None)
    flag = getattr(cls, "_supports_sdpa", None)
    return flag if isinstance(flag, bool) else None


def _onnx_default(path) -> AttentionDefault:
    from costlens.frontends.onnx import canonical_op, read_model
    fused = sorted({canonical_op(n) for n in read_model(path).graph.node} & set(ONNX_FUSED_OPS))
    if fused:
        return AttentionDefault("eager", f"from the ONNX graph: its {', '.join(fused)} ops are priced as the "
                                         "fused kernels they are, other attention as written", from_config=False)
    return AttentionDefault("eager", "from the ONNX graph: its attention is written out as MatMul/Softmax ops "
                                     "(what the file computes)", from_config=False)
