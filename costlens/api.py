"""The Python API the CLI is a thin shell over (usable from notebooks).

    model = costlens.load("model.onnx")
    model.roles.params_by_role()
"""
from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from costlens.errors import CostlensError
from costlens.ir import Graph, frozen_map
from costlens.ops.registry import known
from costlens.roles import RoleMap, locate_roles


@dataclass(frozen=True)
class Model:
    """A loaded model: its graph, its located roles, and what costlens could not price."""

    graph: Graph
    roles: RoleMap
    unknown_ops: Mapping[str, int]

    @property
    def incomplete(self) -> bool:
        return bool(self.unknown_ops)


IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
SOURCE_KINDS = ("an .onnx file, a Hugging Face config.json or model folder, an import spec package.module:factory, "
                "or a Hugging Face Hub id org/name")


def load_graph(source, *, tracer: str = "export", revision: str | None = None) -> Graph:
    """Build the graph IR from a source: an ``.onnx`` file; a Hugging Face ``config.json`` or
    a folder holding one (built on the meta device, never downloaded, no weights read); an
    import spec ``package.module:factory`` (a callable returning an ``nn.Module``, or a
    ``(module, example_inputs)`` pair); a Hugging Face Hub id ``org/name`` (its config.json only,
    at ``revision``; frontends/hub.py); an ``nn.Module``; or a transformers config object.
    A local path wins over an import spec, which wins over a hub id.
    PyTorch sources are traced with ``torch.export`` (``tracer="export"``) or, for small
    modules that run on the CPU, TorchScript via fvcore (``tracer="fvcore"``)."""
    if tracer not in ("export", "fvcore"):
        raise CostlensError(f"unknown tracer {tracer!r} (choose export or fvcore)")
    if not isinstance(source, (str, os.PathLike)):
        return _load_object(source, tracer)
    path = Path(source)
    text = os.fspath(source)
    if revision is not None and (path.exists() or not _is_hub_id(text)):
        raise CostlensError(f"{source}: --revision applies to Hugging Face Hub ids (org/name) only")
    if path.suffix.lower() == ".onnx" or (path.is_file() and path.suffix.lower() != ".json"):
        from costlens.frontends.onnx import load_onnx
        return load_onnx(path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise CostlensError(f"{source}: is a directory with no config.json (give {SOURCE_KINDS})")
    if path.is_dir() or path.suffix.lower() == ".json":
        _needs_torch(text)
        from costlens.frontends.hf_config import read_config
        return _traced(read_config(path), text, tracer)
    if IMPORT_SPEC.match(text):
        _needs_torch(text)
        from costlens.frontends.torch_export import module_from_spec
        module, example_inputs = module_from_spec(text)
        return _traced(module, text, tracer, example_inputs)
    from costlens.frontends.hub import hub_config_path, is_hub_id
    if is_hub_id(text):
        _needs_torch(text)
        from costlens.frontends.hf_config import read_config
        return _traced(read_config(hub_config_path(text, revision)), text, tracer)
    raise CostlensError(f"{source}: no such model file (expected {SOURCE_KINDS})")


def _is_hub_id(text: str) -> bool:
    from costlens.frontends.hub import is_hub_id
    return is_hub_id(text) and not IMPORT_SPEC.match(text)


def _load_object(source, tracer: str) -> Graph:
    if type(source).__module__.startswith("transformers.") and hasattr(source, "model_type"):
        return _traced(source, type(source).__name__, tracer)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(source, torch.nn.Module):
        return _traced(source, type(source).__name__, tracer)
    raise CostlensError(f"cannot load a {type(source).__name__} (expected {SOURCE_KINDS}, or an nn.Module)")


def _needs_torch(source: str) -> None:
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        raise CostlensError(f"{source}: a PyTorch source needs the torch extra (pip install 'costlens[torch]'); "
                            "an .onnx file does not")


def _traced(model, name: str, tracer: str, example_inputs=None) -> Graph:
    """A module or a transformers config through the chosen tracer."""
    if tracer == "fvcore":
        from costlens.frontends.fvcore_jit import load_fvcore
        return load_fvcore(model, example_inputs, source=name)
    if hasattr(model, "model_type") and not hasattr(model, "forward"):
        from costlens.frontends.hf_config import load_config_graph
        return load_config_graph(model, source=name)
    from costlens.frontends.torch_export import load_torch
    return load_torch(model, example_inputs, source=name)


def load(source, *, tracer: str = "export", revision: str | None = None) -> Model:
    """Load a model (any source ``load_graph`` takes; ``revision``: a hub id's branch, tag or
    commit) and locate the role of every parameter."""
    graph = load_graph(source, tracer=tracer, revision=revision)
    roles = locate_roles(graph)
    return Model(graph=graph, roles=roles, unknown_ops=unknown_ops(graph))


def unknown_ops(graph: Graph) -> Mapping[str, int]:
    """Ops of the graph without a cost rule (ops/registry.py), by name with their counts: the
    estimate is incomplete while any is left, never silently priced at zero."""
    unknown = Counter(node.op for node in graph.nodes if not known(node.op))
    return frozen_map(dict(sorted(unknown.items())))
