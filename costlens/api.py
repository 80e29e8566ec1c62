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


def load(source, *, tracer: str = "export", revision: str | None = None) -> Model:
    """Load a model (any source ``load_graph`` takes; ``revision``: a hub id's branch, tag or
    commit) and locate the role of every parameter."""
    return analyse(load_graph(source, tracer=tracer, revision=revision))
