"""What a model source is, decided in one place: ``load_graph`` (tracing), ``export``
(torch.onnx) and the PEFT reader all dispatch on ``classify``.

Precedence: a local path wins over an import spec, which wins over a hub id. Nothing here
imports torch or transformers: a source is classified from its text and the file system.
"""
from __future__ import annotations

import enum
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from costlens.errors import CostlensError

IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
SOURCE_KINDS = ("an .onnx file, a Hugging Face config.json or model folder, an import spec package.module:factory, "
                "or a Hugging Face Hub id org/name")


class SourceKind(enum.Enum):
    """What a MODEL argument is (``classify``), which decides the front end that reads it."""

    ONNX = "onnx"                   # an ONNX file (any existing non-JSON file is read as one)
    HF_CONFIG = "hf-config"         # a config.json, or a folder holding one
    IMPORT_SPEC = "import-spec"     # package.module:factory
    HUB_ID = "hub-id"               # org/name on the Hugging Face Hub (config.json only)
    MODULE = "module"               # an nn.Module object
    CONFIG_OBJECT = "config-object"  # a transformers PretrainedConfig object

    @property
    def needs_torch(self) -> bool:
        return self is not SourceKind.ONNX


@dataclass(frozen=True)
class Source:
    """A classified model source: ``kind`` and the original object or text (``path`` for files)."""

    kind: SourceKind
    value: object
    path: Path | None = None

    @property
    def text(self) -> str:
        return os.fspath(self.value) if isinstance(self.value, (str, os.PathLike)) else type(self.value).__name__


def classify(source, revision: str | None = None) -> Source:
    """The kind of ``source``; a CostlensError (one line) when it is none of SOURCE_KINDS.
    ``revision`` applies to hub ids only and is refused with any other kind."""
    if not isinstance(source, (str, os.PathLike)):
        return _classify_object(source)
    path, text = Path(source), os.fspath(source)
    try:
        kind = _path_kind(path, text)
    except CostlensError:
        kind = None
        if revision is None:
            raise
    if revision is not None and kind is not SourceKind.HUB_ID:
        raise CostlensError(f"{source}: --revision applies to Hugging Face Hub ids (org/name) only")
    return Source(kind, source, path if kind in (SourceKind.ONNX, SourceKind.HF_CONFIG) else None)


def _path_kind(path: Path, text: str) -> SourceKind:
    if path.suffix.lower() == ".onnx" or (path.is_file() and path.suffix.lower() != ".json"):
        return SourceKind.ONNX
    if path.is_dir() and not (path / "config.json").is_file():
        raise CostlensError(f"{text}: is a directory with no config.json (give {SOURCE_KINDS})")
    if path.is_dir() or path.suffix.lower() == ".json":
        return SourceKind.HF_CONFIG
    if IMPORT_SPEC.match(text):
        return SourceKind.IMPORT_SPEC
    from costlens.frontends.hub import is_hub_id
    if is_hub_id(text):
        return SourceKind.HUB_ID
    raise CostlensError(f"{text}: no such model file (expected {SOURCE_KINDS})")


def _classify_object(source) -> Source:
    if type(source).__module__.startswith("transformers.") and hasattr(source, "model_type"):
        return Source(SourceKind.CONFIG_OBJECT, source)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(source, torch.nn.Module):
        return Source(SourceKind.MODULE, source)
    raise CostlensError(f"cannot load a {type(source).__name__} (expected {SOURCE_KINDS}, or an nn.Module)")


def require_torch(source: Source) -> None:
    """A one-line error when a PyTorch source meets an install without the torch extra."""
    import importlib.util
    if source.kind.needs_torch and importlib.util.find_spec("torch") is None:
        raise CostlensError(f"{source.text}: a PyTorch source needs the torch extra (pip install 'costlens[torch]'); "
                            "an .onnx file does not")


def load_graph(source, *, tracer: str = "export", revision: str | None = None, dtype: str = "float32"):
    """Build the graph IR (costlens.ir.Graph) from a source: an ``.onnx`` file; a Hugging Face
    ``config.json`` or a folder holding one (built on the meta device, never downloaded, no
    weights read); an import spec ``package.module:factory`` (a callable returning an
    ``nn.Module``, or a ``(module, example_inputs)`` pair); a Hugging Face Hub id ``org/name``
    (its config.json only, at ``revision``; frontends/hub.py); an ``nn.Module``; or a
    transformers config object. PyTorch sources are traced with ``torch.export``
    (``tracer="export"``) or, for small modules that run on the CPU, TorchScript via fvcore
    (``tracer="fvcore"``). ``dtype`` ("float32", "bfloat16", "float16"): the parameters' dtype a
    config or an import spec's meta-built module is traced in (plans.running_dtype of the
    precision); an .onnx file and a given module keep their own dtypes."""
    if tracer not in ("export", "fvcore"):
        raise CostlensError(f"unknown tracer {tracer!r} (choose export or fvcore)")
    found = classify(source, revision)
    require_torch(found)
    if found.kind is SourceKind.ONNX:
        from costlens.frontends.onnx import load_onnx
        return load_onnx(found.path)
    if found.kind is SourceKind.HF_CONFIG and tracer == "export":      # issue 12: the on-disk graph cache
        from costlens.frontends.hf_config import load_config_file
        return load_config_file(found.path, name=found.text, dtype=dtype)
    module, example_inputs = torch_source(found, revision)
    if dtype != "float32" and found.kind is SourceKind.IMPORT_SPEC:
        import torch
        module = module.to(getattr(torch, dtype))        # built by costlens on the meta device
    return _traced(module, found.text, tracer, example_inputs, dtype)


def torch_source(found: Source, revision: str | None = None):
    """(a transformers config object or an nn.Module, example inputs or None) of a classified
    PyTorch source; configs stay configs, so the config front end can trace them shallow."""
    if found.kind in (SourceKind.MODULE, SourceKind.CONFIG_OBJECT):
        return found.value, None
    if found.kind is SourceKind.IMPORT_SPEC:
        from costlens.frontends.torch_export import module_from_spec
        return module_from_spec(found.text)
    from costlens.frontends.hf_config import read_config
    if found.kind is SourceKind.HUB_ID:
        from costlens.frontends.hub import hub_config_path
        return read_config(hub_config_path(found.text, revision)), None
    return read_config(found.path), None


def _traced(model, name: str, tracer: str, example_inputs=None, dtype: str = "float32"):
    """A module or a transformers config (built in ``dtype``) through the chosen tracer."""
    if tracer == "fvcore":
        from costlens.frontends.fvcore_jit import load_fvcore
        return load_fvcore(model, example_inputs, source=name)
    if hasattr(model, "model_type") and not hasattr(model, "forward"):
        from costlens.frontends.hf_config import load_config_graph
        return load_config_graph(model, source=name, dtype=dtype)
    from costlens.frontends.torch_export import load_torch
    return load_torch(model, example_inputs, source=name)
