"""PEFT ``adapter_config.json`` -> a costlens Plan, by the model's own module paths.

PEFT picks the modules it adapts by name; costlens prices plans by role. The bridge is the
module path every parameter use carries (``ParamUse.hint``, the exporter's or tracer's module
name; else the parameter name less its last part): PEFT's matching rules are replayed on those
paths (``target_modules`` as a list: a name equal to an entry or ending in ``.entry``; as a string:
``re.fullmatch``; ``"all-linear"``: every linear but the output head; ``exclude_modules``;
``layers_to_transform`` / ``layers_pattern``; ``target_parameters`` on parameter names;
``rank_pattern`` as PEFT's ``get_pattern_key``), and the matched uses are then written as costlens
LoRA targets (``attn``, ``q``, ``experts``, ...) found by the structural role locator, so module
names need no table: ``q_proj``, ``c_attn``, ``query_key_value``, ``w1`` all land on their role.

The plan must select exactly what PEFT adapts. A match costlens cannot write as targets (one
layer of several, an embedding, a norm, a container module, part of a role at one rank and part
at another) is a PlanError naming the modules, never dropped. ``modules_to_save`` become trained
base weights (``train=...``), also written as selectors.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from costlens.errors import PlanError
from costlens.plans import Plan, parse_plan_spec, select
from costlens.roles.types import ParamUse, Role

ADAPTER_FILE = "adapter_config.json"
LORA_ROLES = (Role.ATTENTION, Role.FFN, Role.ROUTER, Role.EXPERTS, Role.SHARED_EXPERTS, Role.LM_HEAD)
# costlens LoRA targets, coarse first: a role that PEFT adapts whole is written as its role
ROLE_TARGETS = ("attn", "ffn", "router", "experts", "shared_experts", "head")
KIND_TARGETS = ("q", "k", "v", "o", "up", "gate", "down")
TRAIN_SELECTORS = ("embed", "head", "norm", "attn", "ffn", "router", "experts", "shared_experts", "other",
                   *KIND_TARGETS)
# LoRA settings that change what a step costs and that costlens does not price
UNPRICED = {"use_dora": "DoRA (magnitude vectors, a weight-norm in every forward)", "lora_bias": "LoRA bias terms",
            "trainable_token_indices": "trainable token rows", "layer_replication": "layer replication",
            "use_qalora": "QALoRA", "alora_invocation_tokens": "activated LoRA"}


@dataclass(frozen=True)
class PeftPlan:
    """The plan a PEFT config amounts to, its spec text and what was noted on the way."""

    plan: Plan
    spec: str
    notes: tuple[str, ...]


def read_adapter_config(path: str | Path) -> dict:
    """The JSON of an ``adapter_config.json`` (or a folder holding one); PlanError if unreadable."""
    file = Path(path)
    if file.is_dir():
        file = file / ADAPTER_FILE
    if not file.is_file():
        raise PlanError(f"{path}: no such PEFT adapter config (give adapter_config.json or its folder)")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{file}: not a readable JSON adapter config ({e})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{file}: not a PEFT adapter config (expected a JSON object)")
    return data


def is_transformers_source(source: str) -> bool | None:
    """Whether a model source builds a transformers PreTrainedModel: True for a config.json, a
    model folder or a hub id; for an import spec, the factory's module class decides (built on
    the meta device); None for an ONNX file (its module class is unknown)."""
    from costlens.frontends.source import IMPORT_SPEC
    text = str(source)
    path = Path(text)
    if path.suffix.lower() == ".onnx" or (path.is_file() and path.suffix.lower() != ".json"):
        return None
    if path.exists() or path.suffix.lower() == ".json":
        return True
    if IMPORT_SPEC.match(text):
        from costlens.frontends.torch_export import module_from_spec
        module, _ = module_from_spec(text)
        return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
                   for c in type(module).__mro__)
    return True          # a hub id: a transformers config


# a last path segment naming the ONNX op rather than a module (onnxruntime-genai's builder writes
# model.layers.0.attn.q_proj.MatMul.weight)
OP_SEGMENTS = ("MatMul", "Gemm", "MatMulNBits", "Add", "Mul", "Conv")


def module_path(use: ParamUse) -> str | None:
    """The module a parameter use belongs to (its hint, else its parameter name less the last
    part, and less a trailing ONNX op name)."""
    if use.hint:
        return use.hint
    if "." not in use.constant:
        return None
    path = use.constant.rsplit(".", 1)[0]
    head, _, last = path.rpartition(".")
    return head if head and last in OP_SEGMENTS else path


def parameter_path(use: ParamUse) -> str:
    last = use.constant.rsplit(".", 1)[-1]
    return f"{use.hint}.{last}" if use.hint else use.constant


def plan_from_peft(config: dict | str | Path, model, name: str | None = None, *,
                   transformers_model: bool | None = None, label: str = "adapter config") -> PeftPlan:
    """The costlens Plan of a PEFT LoRA config (a dict, or an adapter_config.json path) on
    ``model`` (a loaded costlens Model). ``transformers_model``: whether the torch module is a
    transformers PreTrainedModel, which decides whether ``"all-linear"`` leaves the LM head out
    (PEFT drops a PreTrainedModel's output embedding only); needed for all-linear alone
    (``is_transformers_source`` answers it for a source string)."""
    source = str(config) if not isinstance(config, dict) else label
    data = read_adapter_config(config) if not isinstance(config, dict) else dict(config)
    _check_supported(data, source)
    targets = data.get("target_modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        if transformers_model is None:
            raise PlanError(f"{source}: target_modules 'all-linear' depends on the torch module's class (PEFT leaves "
                            "the LM head out of a transformers model only); list the modules instead")

    uses = model.roles.params
    if not any(module_path(u) for u in uses):
        raise PlanError(f"{source}: the model carries no module paths (an anonymized graph), so PEFT's module "
                        "names cannot be matched; give the plan with --lora/--rank")
    r = _positive(data.get("r", 8), "r", source)
    saved = _modules_to_save(data, uses, source)
    adapted, notes = _adapted(data, uses, saved, source, head_is_linear=transformers_model is False)
    ranks = {key: _rank_of(data, key_path, r, source) for key, key_path in adapted.items()}
    lora, rank_of_target = _cover_lora(ranks, model, source)
    train = _cover_train(saved, model, source) if saved else []
    spec_items = []
    if lora:
        spec_items.append("lora=" + ",".join(lora))
        distinct = set(rank_of_target.values())
        spec_items.append("rank=" + (str(distinct.pop()) if len(distinct) == 1 else
                                     ",".join(f"{t}={rank_of_target[t]}" for t in lora)))
        spec_items.append(f"alpha={float(data.get('lora_alpha', 8))}")
        dropout = float(data.get("lora_dropout") or 0.0)
        if dropout:
            spec_items.append(f"lora-dropout={dropout}")
    if train:
        spec_items.append("train=" + ",".join(train))
    if data.get("alpha_pattern"):
        notes.append("alpha_pattern does not change costs (recorded, not priced)")
    if saved:
        notes.append(f"modules_to_save: PEFT trains a copy of {', '.join(sorted(saved.values()))}; the frozen "
                     "original it also keeps is not in the weights figure")
    spec = ";".join(spec_items)
    return PeftPlan(parse_plan_spec(f"{name or 'peft'}:{spec}"), spec, tuple(notes))


def _check_supported(data: dict, source: str) -> None:
    kind = str(data.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise PlanError(f"{source}: peft_type {kind}: costlens prices LoRA adapters only")
    for key, what in UNPRICED.items():
        if data.get(key):
            raise PlanError(f"{source}: {key}: {what} is not priced by costlens")
    if data.get("bias", "none") != "none":
        raise PlanError(f"{source}: bias={data['bias']!r}: trained biases beside LoRA are not expressible "
                        "(costlens trains biases with their role only); use bias='none'")
    if data.get("target_modules") is None and not data.get("target_parameters"):
        raise PlanError(f"{source}: neither target_modules nor target_parameters is set")


def _positive(value, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlanError(f"{source}: {key} must be a positive whole number, got {value!r}")
    return value


def _module_matches(data: dict, path: str) -> bool:
    """PEFT's check_target_module_exists for target_modules (exclusions applied by the caller)."""
    targets = data.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    found = path in targets or any(path.endswith(f".{t}") for t in targets)
    layers = data.get("layers_to_transform")
    if found and layers is not None and (not isinstance(layers, list) or layers):
        index = _layer_index(path, data.get("layers_pattern"))
        found = index is not None and (index == layers if isinstance(layers, int) else index in layers)
    return found


def _layer_index(path: str, patterns) -> int | None:
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return int(match.group("idx")) if match else None


def _excluded(data: dict, path: str, saved_patterns: list[str]) -> bool:
    exclude = data.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, path):
            return True
        if not isinstance(exclude, str) and (path in exclude or any(path.endswith(f".{e}") for e in exclude)):
            return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in saved_patterns)


def _adapted(data: dict, uses, saved: dict, source: str, head_is_linear: bool) -> tuple[dict[str, str], list[str]]:
    """{use key: the module (or parameter) path PEFT adapts} and notes; ``head_is_linear``: all-linear
    takes the LM head too (the module is not a transformers model)."""
    notes: list[str] = []
    targets = data.get("target_modules")
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    saved_patterns = list(data.get("modules_to_save") or [])
    leaves = {module_path(u) for u in uses if module_path(u) and not u.n_experts}
    adapted: dict[str, str] = {}
    refused: list[str] = []
    for use in uses:
        path = module_path(use)
        if not path or use.kind == "bias" or use.tied_to or _excluded(data, path, saved_patterns):
            continue
        if all_linear:     # PEFT: every nn.Linear, less a transformers model's output embedding
            hit = len(use.shape) == 2 and use.role not in (Role.EMBEDDING, Role.NORM) and \
                (use.role is not Role.LM_HEAD or head_is_linear)
        else:
            hit = _module_matches(data, path)
        if not hit:
            continue
        if use.n_experts:
            refused.append(f"{path} (holds 3-D expert tensors: PEFT adapts them with target_parameters)")
        elif use.role not in LORA_ROLES or use.kind in ("norm", "token", "position"):
            refused.append(f"{path} ({use.role.value} {use.kind}: costlens prices LoRA on linear layers only)")
        elif use.kind == "gate_scale":     # never adapted by costlens (gradients.NOT_ADAPTED): refused, not dropped
            refused.append(f"{path} (a d->1 gate scaling the shared expert: costlens does not price LoRA on it)")
        else:
            adapted[use.key] = path
    if isinstance(targets, (list, tuple)) or (isinstance(targets, str) and not all_linear):
        containers = sorted({p for p in _prefixes(leaves) if p not in leaves and _module_matches(data, p)
                             and not _excluded(data, p, saved_patterns)})
        refused += [f"{p} (not a linear layer)" for p in containers]
    for pattern in data.get("target_parameters") or []:
        hits = [u for u in uses if u.n_experts and _parameter_matches(pattern, parameter_path(u))]
        if not hits:
            raise PlanError(f"{source}: target_parameters {pattern!r} matches no 3-D expert tensor of the model")
        adapted.update({u.key: parameter_path(u) for u in hits})
    if refused:
        raise PlanError(f"{source}: costlens cannot express LoRA on {'; '.join(sorted(set(refused)))}")
    if not adapted:
        raise PlanError(f"{source}: target_modules {targets!r} matches no module of the model")
    if isinstance(targets, (list, tuple)):
        unused = [t for t in targets if not any(p == t or p.endswith(f".{t}") for p in adapted.values())]
        if unused:
            notes.append(f"target_modules {', '.join(map(repr, unused))} match no linear layer (PEFT ignores them too)")
    return adapted, notes


def _prefixes(paths) -> set[str]:
    found = set()
    for path in paths:
        parts = path.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return found


def _parameter_matches(pattern: str, name: str) -> bool:
    return name == pattern or name.endswith(f".{pattern}")


def _rank_of(data: dict, path: str, r: int, source: str) -> int:
    """PEFT's get_pattern_key: the first rank_pattern key matching ``(.*\\.)?(key)$``."""
    for key, rank in (data.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return _positive(rank, f"rank_pattern[{key!r}]", source)
    return r


def _cover_lora(ranks: dict[str, int], model, source: str) -> tuple[list[str], dict[str, int]]:
    """LoRA targets whose selections partition the adapted uses, each at one rank."""
    linear = {u.key for u in model.roles.params
              if u.kind not in ("bias", "norm", "token", "position") and not u.tied_to}
    chosen, rank_of, covered = [], {}, set()
    for target in (*ROLE_TARGETS, *KIND_TARGETS):
        keys = _selection(model, target) & linear
        if keys and keys <= set(ranks) and not keys & covered and len({ranks[k] for k in keys}) == 1:
            chosen.append(target)
            rank_of[target] = ranks[next(iter(keys))]
            covered |= keys
    for target, rank in _layer_scoped(ranks, covered, linear, model):
        chosen.append(target)
        rank_of[target] = rank
        covered |= _selection(model, target) & linear
    left = set(ranks) - covered
    if left:
        paths = sorted({_display(model, k) for k in left})
        raise PlanError(f"{source}: costlens cannot express LoRA on {', '.join(paths)}: its LoRA targets adapt a "
                        "role or projection kind at one rank in every layer or in a layer range (attn, q, k, v, o, "
                        "ffn, up, gate, down, router, experts, shared_experts, head; q@layers:A-B)")
    return chosen, rank_of


def _layer_scoped(ranks: dict[str, int], covered: set[str], linear: set[str], model) -> list[tuple[str, int]]:
    """(``target@layers:A-B``, rank) pairs for what whole-model targets left: PEFT's
    ``layers_to_transform`` and per-layer ``rank_pattern`` adapt a kind in some layers only, or
    at different ranks by layer. Per kind, runs of consecutive layers at one rank become one
    scoped target; a layer where the kind is only partly adapted stays unexpressed."""
    found = []
    for target in (*ROLE_TARGETS, *KIND_TARGETS):
        per_layer: dict[int, int] = {}
        for layer in range(model.roles.architecture.layers):
            keys = _selection(model, f"{target}@layers:{layer}") & linear
            if keys and keys <= set(ranks) and not keys & covered and len({ranks[k] for k in keys}) == 1:
                per_layer[layer] = ranks[next(iter(keys))]
        for first, last, rank in _runs(per_layer):
            scope = f"layers:{first}" if first == last else f"layers:{first}-{last}"
            found.append((f"{target}@{scope}", rank))
            covered = covered | {k for layer in range(first, last + 1)
                                 for k in _selection(model, f"{target}@layers:{layer}") & linear}
    return found


def _runs(per_layer: dict[int, int]) -> list[tuple[int, int, int]]:
    """Maximal runs (first, last, rank) of consecutive layers at one rank."""
    runs: list[tuple[int, int, int]] = []
    for layer in sorted(per_layer):
        rank = per_layer[layer]
        if runs and runs[-1][1] == layer - 1 and runs[-1][2] == rank:
            runs[-1] = (runs[-1][0], layer, rank)
        else:
            runs.append((layer, layer, rank))
    return runs


def _cover_train(saved: dict[str, str], model, source: str) -> list[str]:
    chosen, covered = [], set()
    for selector in TRAIN_SELECTORS:
        keys = _selection(model, selector)
        if keys and keys <= set(saved) and not keys & covered:
            chosen.append(selector)
            covered |= keys
    left = set(saved) - covered
    if left:
        paths = sorted({saved[k] for k in left})
        raise PlanError(f"{source}: modules_to_save {', '.join(paths)}: costlens trains whole roles, not these "
                        "modules alone")
    return chosen


def _modules_to_save(data: dict, uses, source: str) -> dict[str, str]:
    """{use key: module path} of the parameters ``modules_to_save`` trains (PEFT's regex)."""
    names = data.get("modules_to_save") or []
    saved = {}
    for name in names:
        hits = {u.key: module_path(u) for u in uses
                if module_path(u) and re.match(rf"(^|.*\.){name}($|\..*)", module_path(u))}
        if not hits:
            raise PlanError(f"{source}: modules_to_save {name!r} matches no module of the model")
        saved.update(hits)
    return saved


def _selection(model, selector: str) -> set[str]:
    try:
        return select(model.roles.params, selector, model.roles)
    except PlanError:           # the model lacks the role
        return set()


def _display(model, key: str) -> str:
    use = next(u for u in model.roles.params if u.key == key)
    return f"{module_path(use) or key} ({use.role.value} {use.kind}, layer {use.layer})"


def peft_plan_with_options(path: str, model, source: str | None, options: dict) -> tuple[str, Plan, tuple[str, ...]]:
    """(spec text, Plan, notes) of ``--peft path`` on ``model`` (``source``: its MODEL argument),
    with the command's other plan options (train, freeze, stop-grad, dropout, stack-ffn) added.
    --lora, --rank, --alpha and --lora-dropout conflict: the adapter config gives them."""
    clashing = [key for key in ("lora", "rank", "alpha", "lora_dropout") if options.get(key)]
    if clashing:
        raise PlanError(f"--peft gives the LoRA settings: drop {', '.join('--' + k.replace('_', '-') for k in clashing)}")
    data = read_adapter_config(path)
    targets = data.get("target_modules")
    transformers_model = None
    if isinstance(targets, str) and targets.lower() == "all-linear" and source is not None:
        transformers_model = is_transformers_source(source)
    result = plan_from_peft(data, model, transformers_model=transformers_model, label=str(path))
    items = dict(item.split("=", 1) for item in result.spec.split(";") if item)
    for key in ("train", "freeze", "stop_grad", "dropout", "stack_ffn", "stack_ffn_width"):
        value = options.get(key)
        if not value:
            continue
        name = key.replace("_", "-")
        items[name] = ",".join(dict.fromkeys([*items[name].split(","), *str(value).split(",")])) \
            if name == "train" and name in items else str(value)
    spec = ";".join(f"{k}={v}" for k, v in items.items())
    return spec, parse_plan_spec(f"peft:{spec}"), result.notes
