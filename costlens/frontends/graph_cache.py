"""An on-disk cache of lowered graphs, so a config traced once is read back in milliseconds.

Tracing a Hugging Face config costs seconds (importing torch and transformers, building the
model on the meta device, ``torch.export``); the graph IR it yields depends only on the
config's content and the code that traced it. An entry is keyed by a SHA-256 of exactly
that: the config's canonical JSON, the shallow depth, the costlens version plus a digest of
the front-end source files, and the torch and transformers versions. Change any of them and
the key changes; the old entry is simply never read again.

Entries are JSON, never pickle: reading one can yield a graph and nothing else. Each file
holds a header line (format, key, SHA-256 of the payload) and the payload; a file whose
header or hash does not match, or whose payload does not decode to a well-formed graph, is
ignored (the caller traces again and overwrites it). A graph is stored only after its JSON
form was decoded back and found equal to it, so the cache can only return what a trace
returned. The folder is ``$COSTLENS_CACHE`` (``off`` disables the cache), else
``$XDG_CACHE_HOME/costlens`` or ``~/.cache/costlens``; deleting it is always safe.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

from costlens.ir import Constant, Graph, Node, Tensor, frozen_map

FORMAT = "costlens.graph-cache/1"
CACHE_ENV = "COSTLENS_CACHE"
# the files whose code decides what a trace lowers to: an edit there is a new key
_TRACED_BY = ("frontends/hf_config.py", "frontends/torch_export.py", "frontends/aten/core.py", "frontends/aten/layout.py",
              "frontends/aten/tensors.py", "frontends/aten/__init__.py", "frontends/irbuild.py", "frontends/replicate.py", "ir.py",
              "ops/registry.py", "frontends/graph_cache.py")


class _Undecodable(Exception):
    """A value the JSON form cannot hold exactly (the graph is then not cached)."""


# --------------------------------------------------------------------------- where and which

def cache_dir() -> Path | None:
    """The cache folder, or None when ``COSTLENS_CACHE=off``."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return None if configured.strip().lower() in ("off", "0", "none", "") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "costlens"


def code_digest() -> str:
    """SHA-256 of the costlens files that decide a trace's IR (hex)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for relative in _TRACED_BY:
        digest.update(relative.encode())
        digest.update((root / relative).read_bytes())
    return digest.hexdigest()


def cache_key(parts: dict) -> str | None:
    """The entry key of a trace described by ``parts`` (JSON-able) plus the versions of
    costlens, its front-end code, torch and transformers; None when one is unknown."""
    try:
        versions = {name: metadata.version(name) for name in ("costlens", "torch", "transformers")}
        described = dict(parts, versions=versions, code=code_digest(), format=FORMAT)
        text = json.dumps(described, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (metadata.PackageNotFoundError, OSError, TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _entry(key: str, kind: str = "graph") -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / f"{kind}-{key}.json"


# --------------------------------------------------------------------------- read and write

def _read_payload(key: str | None, kind: str) -> bytes | None:
    """The checked payload of an entry (header: format, key, SHA-256 of the payload), or None."""
    path = _entry(key, kind) if key else None
    if path is None:
        return None
    try:
        header_line, _, payload = path.read_bytes().partition(b"\n")
        header = json.loads(header_line)
    except (OSError, ValueError, RecursionError):
        return None
    if header != {"format": FORMAT, "key": key, "sha256": hashlib.sha256(payload).hexdigest()}:
        return None
    return payload


def _write_payload(key: str | None, kind: str, payload: bytes) -> bool:
    """Write an entry atomically (a reader never sees half a file); False when caching is off or
    the folder is not writable."""
    path = _entry(key, kind) if key else None
    if path is None:
        return False
    header = json.dumps({"format": FORMAT, "key": key, "sha256": hashlib.sha256(payload).hexdigest()})
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=".tmp-", delete=False) as out:
            temporary = out.name
            out.write(header.encode() + b"\n" + payload)
        os.replace(temporary, path)
    except OSError:               # a read-only or full disk: the result stands uncached
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        return False
    return True


def load_graph_entry(key: str | None) -> Graph | None:
    """The cached graph of ``key``, or None (no entry, or one that is corrupt or foreign)."""
    payload = _read_payload(key, "graph")
    if payload is None:
        return None
    try:
        return graph_from_document(json.loads(payload))
    except (ValueError, TypeError, KeyError, AttributeError, _Undecodable, RecursionError):
        return None


def store_graph_entry(key: str | None, graph: Graph) -> bool:
    """Write ``graph`` under ``key``. Whether it was written: not when caching is off, the folder
    is not writable, or the JSON form would not give back an equal graph."""
    try:
        payload = json.dumps(graph_document(graph), separators=(",", ":")).encode()
        if graph_from_document(json.loads(payload)) != graph:
            return False
    except (_Undecodable, TypeError, ValueError, RecursionError):
        return False
    return _write_payload(key, "graph", payload)


def load_fact(key: str | None):
    """A small JSON value cached under ``key`` (what transformers answered about a model type,
    asked once per version: importing transformers costs seconds), or None."""
    payload = _read_payload(key, "fact")
    try:
        return None if payload is None else json.loads(payload)
    except (ValueError, RecursionError):
        return None


def store_fact(key: str | None, value) -> bool:
    """Cache a JSON-able ``value`` under ``key`` (``load_fact``); False when it was not written."""
    try:
        payload = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError):
        return False
    return _write_payload(key, "fact", payload)


# --------------------------------------------------------------------------- the JSON form

def graph_document(graph: Graph) -> dict:
    """The JSON form of a graph: every field, tuples and mappings tagged so they come back
    as tuples and mappings."""
    return {
        "nodes": [[n.name, n.op, list(n.inputs), list(n.outputs), _encode(dict(n.attrs)), n.scope] for n in graph.nodes],
        "tensors": [[t.name, _encode(t.shape), t.dtype] for t in graph.tensors.values()],
        "constants": [[c.name, list(c.shape), c.dtype, c.external] for c in graph.constants.values()],
        "inputs": list(graph.inputs), "outputs": list(graph.outputs), "source": graph.source,
        "small_values": [[name, list(values)] for name, values in graph.small_values.items()],
        "warnings": list(graph.warnings),
    }


def graph_from_document(doc: dict) -> Graph:
    """The graph of ``graph_document``'s JSON form (raises on anything malformed)."""
    nodes = tuple(Node(name=_str(name), op=_str(op), inputs=_strs(inputs), outputs=_strs(outputs),
                       attrs=frozen_map(_decode(attrs)), scope=_str(scope))
                  for name, op, inputs, outputs, attrs, scope in doc["nodes"])
    tensors = {_str(name): Tensor(_str(name), _decode(shape), _str(dtype)) for name, shape, dtype in doc["tensors"]}
    constants = {_str(name): Constant(_str(name), _ints(shape), _str(dtype), None if external is None else _str(external))
                 for name, shape, dtype, external in doc["constants"]}
    return Graph(nodes=nodes, tensors=frozen_map(tensors), constants=frozen_map(constants),
                 inputs=_strs(doc["inputs"]), outputs=_strs(doc["outputs"]), source=_str(doc["source"]),
                 small_values=frozen_map({_str(k): _ints(v) for k, v in doc["small_values"]}),
                 warnings=_strs(doc["warnings"]))


def _encode(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"t": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict) or type(value).__name__ == "mappingproxy":
        return {"m": [[_encode(k), _encode(v)] for k, v in value.items()]}
    raise _Undecodable(type(value).__name__)


def _decode(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict) and set(value) == {"t"}:
        return tuple(_decode(v) for v in value["t"])
    if isinstance(value, dict) and set(value) == {"m"}:
        return {_decode(k): _decode(v) for k, v in value["m"]}
    raise _Undecodable(repr(value)[:40])


def _str(value) -> str:
    if not isinstance(value, str):
        raise _Undecodable(repr(value)[:40])
    return value


def _strs(values) -> tuple[str, ...]:
    return tuple(_str(v) for v in values)


def _ints(values) -> tuple[int, ...]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise _Undecodable(repr(values)[:40])
    return tuple(values)
