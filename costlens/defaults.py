"""Defaults a model source decides, in one place for the CLI, budget files and the Python API (issue 16).

Several Setup fields have no fixed default: what the step runs depends on the source. This module
fills them, before anything is traced, and says why (the ``derived`` reasons the plan header and
the JSON ``setup.derived`` print):

- ``optimizer_impl``: foreach when a GPU is named (torch's default on CUDA), else for-loop;
- ``attention``: what the source runs (frontends/attention_default.py): a config's
  attn_implementation, else SDPA for a transformers class that supports it; eager for an ONNX graph;
- ``loss``: ``hf`` (a transformers model computes its loss from labels, logits upcast to fp32) for
  a Hugging Face config, folder, hub id or config object, else ``ce``;
- ``experts_impl``: a config's experts_implementation, else grouped_mm (transformers 5's) for a
  Hugging Face source; an ONNX file: what the HF corpus index records for it, else the loop;
- ``batch`` / ``seq`` of an ONNX file exported with static shapes (frontends/static_shapes.py):
  the export's, and a different value refused when the graph cannot be re-bound.

A value given explicitly always wins. No click here: ``costlens.cli`` names option sources as
``--gpu h100``, ``costlens.budgets`` as ``[setup] gpu = 'h100'`` (the ``origin`` argument).

In a notebook, ``costlens.api.setup_for(source, batch=4, seq=2048)`` returns the Setup the CLI
would price for ``costlens plan SOURCE --batch 4 --seq 2048``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from costlens.errors import CostlensError
from costlens.plans import EXPERTS_IMPLS, Setup

# the fields this module may fill (None or absent in the values given: not chosen)
SOURCE_KEYS = ("optimizer_impl", "attention", "loss", "experts_impl", "batch", "seq")


def option_origin(key: str, value: object) -> str:
    """How the CLI names where a value came from: ``--gpu h100``."""
    return f"--{key.replace('_', '-')} {value}"


@dataclass(frozen=True)
class SourceDefaults:
    """Setup values with the source's defaults filled in, and why each derived one was chosen
    (``derived``: {setup key: "value, reason"}, as ``setup.derived`` of costlens.plan/1)."""

    values: Mapping[str, object]
    derived: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def setup(self) -> Setup:
        """The Setup of these values (Setup's own defaults for the fields not given)."""
        return Setup(**self.values)


def source_defaults(source, values: Mapping[str, object], explicit: Iterable[str] = (), *,
                    revision: str | None = None, searched: str | None = None,
                    origin: Callable[[str, object], str] = option_origin) -> SourceDefaults:
    """``values`` (Setup fields; None or absent: not chosen) with the defaults ``source`` decides
    filled in. ``explicit``: the keys the user chose (a batch of 1 may be the default or a choice:
    only a chosen one is held against a static ONNX export); ``searched``: the dim ``costlens fit``
    varies (refused on a static graph that cannot be re-bound); ``origin``: how a key's value is
    named in a reason. Raises CostlensError (one line) for a static export asked at another shape."""
    values = {key: value for key, value in values.items()}
    explicit = set(explicit)
    derived: dict[str, str] = {}
    derived.update(_optimizer_impl(values, origin))
    kind, path = _kind(source)
    derived.update(_attention(values, source, kind, revision))
    derived.update(_loss(values, kind))
    if values.get("experts_impl") is None:
        values["experts_impl"] = experts_default(source)
    if kind == "onnx":
        derived.update(_static(values, explicit, source, searched))
    return SourceDefaults(MappingProxyType(values), MappingProxyType(derived))


def _optimizer_impl(values: dict, origin) -> dict[str, str]:
    if values.get("optimizer_impl"):
        return {}
    gpu = values.get("gpu")
    values["optimizer_impl"] = "foreach" if gpu else "for-loop"
    return {"optimizer_impl": f"foreach, from {origin('gpu', gpu)} (torch's default on CUDA)"} if gpu else {}


def _kind(source) -> tuple[str | None, object]:
    """(the SourceKind value of ``source`` or None when it is none, its path)."""
    from costlens.frontends.source import classify
    try:
        found = classify(source)
    except CostlensError:          # the source's own error is reported when it is loaded
        return None, None
    return found.kind.value, getattr(found, "path", None)


_HF_KINDS = ("hf-config", "hub-id", "config-object")      # sources that build the transformers module


def _attention(values: dict, source, kind: str | None, revision: str | None) -> dict[str, str]:
    if values.get("attention") is not None:
        return {}
    if kind in (None, "onnx"):     # an ONNX graph: what it computes (fused ops are priced as fused)
        values["attention"] = "eager"
        return {}
    from costlens.frontends.attention_default import default_attention
    chosen = default_attention(source, revision)
    values["attention"] = chosen.value
    # a module or graph runs the attention it shows: no news; a config's choice is news
    return {"attention": f"{chosen.value}, {chosen.why}"} if chosen.from_config else {}


def _loss(values: dict, kind: str | None) -> dict[str, str]:
    if values.get("loss") is not None:
        return {}
    values["loss"] = "hf" if kind in _HF_KINDS else "ce"
    if values["loss"] == "hf":
        return {"loss": "hf, as a transformers model computes it from labels (logits upcast to fp32)"}
    return {}


def experts_default(source) -> str:
    """The experts implementation the source runs (plans.EXPERTS_IMPLS): a Hugging Face source
    builds transformers 5's module, which runs its config's ``experts_implementation`` or
    grouped_mm. An ONNX graph written in dense form does not say how the module it came from ran
    its experts (a graph that gathers expert weights is priced as written, whatever this says):
    the implementation the HF corpus index records for the file's export, else the per-expert
    loop, what a hand-written module (and costlens's executor) runs; an import spec: the loop."""
    from costlens.frontends.source import SourceKind, classify
    try:
        found = classify(source)
    except CostlensError:
        return "eager"          # the source's own error is reported when it is loaded
    if found.kind is SourceKind.ONNX:
        return corpus_experts_impl(found.path) or "eager"
    if found.kind is SourceKind.HF_CONFIG:
        from costlens.frontends.hf_config import read_config_data
        try:
            data = read_config_data(found.path)[0]
        except CostlensError:
            return "grouped_mm"
        named = data.get("experts_implementation") or data.get("_experts_implementation")
        return named if named in EXPERTS_IMPLS else "grouped_mm"
    return "grouped_mm" if found.kind in (SourceKind.HUB_ID, SourceKind.CONFIG_OBJECT) else "eager"


def corpus_experts_impl(onnx_path) -> str | None:
    """The experts_implementation the HF corpus index (index.json beside the file, schema
    costlens.hf_corpus/1) records for this file's export, or None."""
    try:
        data = json.loads((Path(onnx_path).parent / "index.json").read_text(encoding="utf-8"))
        entries = [e for arch in data["archs"].values() for e in (arch.get("exporters") or {}).values()]
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    if data.get("schema") != "costlens.hf_corpus/1":
        return None
    found = [e.get("experts_implementation") for e in entries
             if isinstance(e, dict) and e.get("file") == Path(onnx_path).name]
    return found[0] if found and found[0] in EXPERTS_IMPLS else None


def _static(values: dict, explicit: set[str], source, searched: str | None) -> dict[str, str]:
    """A static ONNX export's batch / seq into ``values`` when not chosen; a chosen other value, or
    fit searching a dim (``searched``), refused unless the graph re-binds (issue 16 item 0)."""
    from costlens.frontends.static_shapes import REEXPORT_HINT, bind_static, rebindability
    try:
        static, not_rebindable = rebindability(source)
    except CostlensError:     # an unreadable file: loading reports it, after the command's usage errors
        return {}
    if static is None:
        return {}
    if not_rebindable is not None and getattr(static, str(searched), None) is not None:
        raise CostlensError(f"fit --search {searched} varies {searched}, but {source} was exported with static "
                            f"shapes ({static.describe()}) and cannot be re-bound ({not_rebindable}); {REEXPORT_HINT}")
    batch, seq, fixed = bind_static(static, values.get("batch", 1) if "batch" in explicit else None,
                                    values.get("seq"), str(source), not_rebindable)
    values["batch"], values["seq"] = batch or values.get("batch", 1), seq
    return fixed


# --------------------------------------------------------------------------- RoPE positions

def config_positions(source, revision: str | None = None) -> int | None:
    """A Hugging Face source's ``max_position_embeddings`` (None: not a config, or none set)."""
    kind, path = _kind(source)
    try:
        if kind == "hf-config":
            from costlens.frontends.hf_config import read_config_data
            data = read_config_data(path)[0]
        elif kind == "hub-id":
            from costlens.frontends.attention_default import _hub_config
            from costlens.frontends.hf_config import read_config_data
            data = read_config_data(_hub_config(str(source), revision))[0]
        elif kind == "config-object":
            data = source.to_dict()
        else:
            return None
    except CostlensError:
        return None
    limit = data.get("max_position_embeddings")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def seq_beyond_positions(model, seq: int | None, source, revision: str | None = None) -> str | None:
    """A warning when a chosen ``seq`` exceeds the config's ``max_position_embeddings`` of a model
    without a learned position table (RoPE): priced as asked, since RoPE scaling (rope_scaling,
    YaRN) may extend the context, but rarely what the model was trained for. A learned table
    refuses such a seq already (estimate.resolve_seq); a default seq (None) is not warned about."""
    if seq is None or any(u.kind == "position" for u in model.roles.params):
        return None
    limit = config_positions(source, revision)
    if limit is None or seq <= limit:
        return None
    return (f"seq {seq:,} exceeds the config's max_position_embeddings ({limit:,}): the model has no position "
            "table (RoPE) so it is priced as asked, but it was configured for at most "
            f"{limit:,} positions (RoPE scaling may extend it)")
