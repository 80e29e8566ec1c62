"""The Python API the CLI is a thin shell over (usable from notebooks).

    model = costlens.load("model.onnx")
    model.roles.params_by_role()

A façade only: the model lives in costlens.model, source dispatch in costlens.frontends.source.
Pipeline modules import those, never this one (only the CLI and ``costlens/__init__`` do).
"""
from __future__ import annotations

from costlens.frontends.source import IMPORT_SPEC, SOURCE_KINDS, load_graph
from costlens.model import Model, analyse, unknown_ops

__all__ = ["IMPORT_SPEC", "SOURCE_KINDS", "Model", "load", "load_graph", "unknown_ops"]


def load(source, *, tracer: str = "export", revision: str | None = None, dtype: str = "float32") -> Model:
    """Load a model (any source ``load_graph`` takes; ``revision``: a hub id's branch, tag or
    commit; ``dtype``: the dtype a config is traced in, ``plans.running_dtype(precision)`` of
    the plan's precision) and locate the role of every parameter."""
    from dataclasses import replace

    from costlens.errors import CostlensError
    from costlens.frontends.attention_default import default_attention
    model = analyse(load_graph(source, tracer=tracer, revision=revision, dtype=dtype))
    try:
        chosen = default_attention(source, revision)       # issue 16 item 3: what the source runs
    except CostlensError as e:      # e.g. a config naming a kernel costlens does not price: no default
        return replace(model, default_attention=None, default_attention_why=str(e))
    return replace(model, default_attention=chosen.value, default_attention_why=chosen.why)
