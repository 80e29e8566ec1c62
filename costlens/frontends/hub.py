"""Hugging Face Hub ids (``org/name``) -> the repository's ``config.json``, nothing else.

Only ``config.json`` is ever requested (``hf_hub_download(repo, "config.json", revision=...)``):
no weight file, tokenizer or Python file is downloaded and no remote code runs. A config that
asks for custom code (``auto_map``) or names a ``model_type`` the installed transformers does not
know is refused: costlens never runs ``trust_remote_code``. The fetched file is then priced
exactly as a local ``config.json`` (frontends/hf_config.py).

The environment is read at call time, not when huggingface_hub was imported:
- ``HF_HUB_OFFLINE`` (1/true/yes/on): the local cache only, never a network request;
- ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ``XDG_CACHE_HOME``/huggingface/hub, else
  ``~/.cache/huggingface/hub``: the cache (layout ``models--org--name/snapshots/<commit>/``,
  ``refs/<branch>`` holding the commit);
- ``HF_TOKEN``: the token for gated or private repositories.

What a source string is (api.load_graph applies this order): an existing local path always wins;
then an import spec ``package.module:factory`` (it has a colon, a hub id never does); then a hub
id, which is ``namespace/name`` (exactly one slash, hub characters only, not ending in
``.onnx``/``.json``). Legacy ids without a namespace (``gpt2``) are written with their
namespace (``openai-community/gpt2``).

Caveat: reading a local config imports transformers with the hub switched offline
(hf_config.transformers_offline); later hub ids in the same process then resolve from the cache.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from costlens.errors import CostlensError

CONFIG_FILE = "config.json"
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"^{_PART}/{_PART}$")
_TRUE = {"1", "true", "yes", "on"}


class HubError(CostlensError):
    """A hub id that cannot be resolved to a config costlens may read."""


def is_hub_id(text: str) -> bool:
    """``namespace/name`` with hub characters only (no ``--`` or ``..``), not a model file name."""
    if not HUB_ID.match(text) or "--" in text or ".." in text:
        return False
    return not text.lower().endswith((".onnx", ".json"))


def cache_dir() -> Path:
    """The hub cache folder the environment names now (see the module docstring)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """HF_HUB_OFFLINE as set now, or as huggingface_hub read it at import (either one wins)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    import huggingface_hub.constants
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def fetch_config(repo_id: str, revision: str | None = None) -> Path:
    """The local path of ``repo_id``'s config.json at ``revision`` (default: main), from the
    cache, or downloaded into it when online. HubError, in one line, when it cannot be had."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError as e:
        raise HubError(f"{repo_id}: a hub id needs huggingface_hub (pip install 'costlens[torch]')") from e
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    cache = cache_dir()
    if offline():
        found = huggingface_hub.try_to_load_from_cache(repo_id, CONFIG_FILE, cache_dir=cache, revision=revision)
        if isinstance(found, str):
            return Path(found)
        raise HubError(f"{where}: not a local path, and its config.json is not in the Hugging Face cache ({cache}) "
                       "while HF_HUB_OFFLINE is set")
    token = os.environ.get("HF_TOKEN") or None
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, CONFIG_FILE, revision=revision, cache_dir=cache,
                                                    token=token))
    except errors.GatedRepoError:
        raise HubError(f"{where}: a gated repository; accept its terms on the hub and set HF_TOKEN") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{where}: no such revision on the hub") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{where}: not a local path and not a hub repository (or a private one: set HF_TOKEN)") from None
    except errors.EntryNotFoundError:
        raise HubError(f"{where}: the repository has no config.json") from None
    except errors.LocalEntryNotFoundError:
        raise HubError(f"{where}: the hub cannot be reached and config.json is not in the cache ({cache})") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise HubError(f"{where}: cannot fetch config.json ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def check_no_remote_code(path: Path, repo_id: str) -> None:
    """Refuse a config whose model needs code from the repository (``auto_map``, unknown model_type)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{repo_id}: config.json is not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise HubError(f"{repo_id}: config.json is not a Hugging Face config")
    refusal = f"{repo_id}: trust_remote_code models are not supported (costlens never runs code from a repository)"
    if "auto_map" in data:
        raise HubError(f"{refusal}; its config.json has auto_map")
    from costlens.frontends.hf_config import transformers_offline
    transformers = transformers_offline()
    model_type = data.get("model_type")
    if model_type is not None and model_type not in transformers.CONFIG_MAPPING:
        raise HubError(f"{refusal}; model_type {model_type!r} is not in transformers {transformers.__version__}")


def hub_config_path(repo_id: str, revision: str | None = None) -> Path:
    """config.json of a hub id, checked to need no remote code: ready for hf_config.read_config."""
    path = fetch_config(repo_id, revision)
    check_no_remote_code(path, repo_id)
    return path
