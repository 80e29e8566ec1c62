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

On transformers 5, PEFT's ``get_peft_model`` first rewrites the config of MoE types whose experts
transformers fused into 3-D tensors (``convert_peft_config_for_transformers``: mixtral, deepseek_v3,
olmoe, qwen3_moe, ...): v4 names such as ``gate_proj``/``up_proj``/``down_proj`` (``w1``/``w3``/``w2``)
leave ``target_modules`` -- a dense MLP or shared expert of that name is no longer adapted -- and
become ``target_parameters`` on the fused experts, ``gate_up_proj`` at rank and alpha times two.
Given the transformers module (the meta device is enough), that same PEFT function is run first,
so the plan prices what PEFT trains; without torch and PEFT, or for an ONNX graph, the names are
matched as written (a note says when a graph of fused experts would be rewritten).
"""
from __future__ import annotations

import copy
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from costlens.errors import PlanError
from costlens.plans import Plan, parse_plan_spec, select
from costlens.roles.types import ParamUse, Role

ADAPTER_FILE = "adapter_config.json"
LORA_ROLES = (Role.ATTENTION, Role.FFN, Role.ROUTER, Role.EXPERTS, Role.SHARED_EXPERTS, Role.LM_HEAD)
# costlens LoRA targets, coarse first: a role that PEFT adapts whole is written as its role
ROLE_TARGETS = ("attn", "ffn", "router", "experts", "shared_experts", "head")
KIND_TARGETS = ("q", "k", "v", "o", "up", "gate", "down")
# one projection kind of the experts: PEFT's transformers-5 rewrite adapts the fused gate_up_proj
# at rank 2r beside down_proj at r, which the one-rank ``experts`` target cannot say
PART_TARGETS = tuple(f"{role}.{kind}" for role in ("experts", "shared_experts") for kind in ("gate_up", "gate", "up",
                                                                                             "down"))
TRAIN_SELECTORS = ("embed", "head", "norm", "attn", "ffn", "router", "experts", "shared_experts", "other",
                   *KIND_TARGETS)
# LoRA settings that change what a step costs and that costlens does not price
UNPRICED = {"lora_bias": "LoRA bias terms",
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
    """The module path of a parameter as PEFT matches it (``layers.0.self_attn.q_proj.weight``): the
    exporter's recorded module path plus the tensor's last name part, else the constant's name."""
    last = use.constant.rsplit(".", 1)[-1]
    return f"{use.hint}.{last}" if use.hint else use.constant


def plan_from_peft(config: dict | str | Path, model, name: str | None = None, *,
                   transformers_model: bool | None = None, label: str = "adapter config",
                   module=None) -> PeftPlan:
    """The costlens Plan of a PEFT LoRA config (a dict, or an adapter_config.json path) on
    ``model`` (a loaded costlens Model). ``transformers_model``: whether the torch module is a
    transformers PreTrainedModel, which decides whether ``"all-linear"`` leaves the LM head out
    (PEFT drops a PreTrainedModel's output embedding only); needed for all-linear alone
    (``is_transformers_source`` answers it for a source string). ``module``: the transformers
    module PEFT would wrap (meta device will do; ``meta_module`` builds it from a source): when
    given, PEFT's own transformers-5 rewrite of MoE targets is applied first (module doc)."""
    source = str(config) if not isinstance(config, dict) else label
    data = read_adapter_config(config) if not isinstance(config, dict) else dict(config)
    _check_supported(data, source)
    rewrite = None
    if module is not None:
        data, rewrite = peft_rewrite(data, module, source)
    try:
        result = _plan_of(data, model, name, transformers_model, source)
    except PlanError as e:
        if rewrite:            # the rewritten targets are what could not be expressed: say where they came from
            raise PlanError(f"{e} ({rewrite})") from None
        raise
    if rewrite:
        return PeftPlan(result.plan, result.spec, (rewrite, *result.notes))
    fused = _fused_expert_names(data, model.roles.params) if module is None else None
    return PeftPlan(result.plan, result.spec, (*result.notes, fused) if fused else result.notes)


def _plan_of(data: dict, model, name: str | None, transformers_model: bool | None, source: str) -> PeftPlan:
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
    alpha = float(data.get("lora_alpha", 8))
    alphas = _target_alphas(lora, {key: _alpha_of(data, key_path, alpha) for key, key_path in adapted.items()}, model)
    train = _cover_train(saved, model, source) if saved else []
    spec_items = []
    if lora:
        spec_items.append("lora=" + ",".join(lora))
        distinct = set(rank_of_target.values())
        spec_items.append("rank=" + (str(distinct.pop()) if len(distinct) == 1 else
                                     ",".join(f"{t}={rank_of_target[t]}" for t in lora)))
        spec_items.append(f"alpha={alpha}" + "".join(f",{t}={a}" for t, a in (alphas or {}).items() if a != alpha))
        dropout = float(data.get("lora_dropout") or 0.0)
        if dropout:
            spec_items.append(f"lora-dropout={dropout}")
        if data.get("use_dora"):
            spec_items.append("dora=true")
    if train:
        spec_items.append("train=" + ",".join(train))
    if data.get("alpha_pattern") and alphas is None:
        notes.append("alpha_pattern does not change costs (recorded, not priced): its alphas differ within a "
                     "costlens target, so the plan keeps lora_alpha")
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
        # 3-D expert tensors, or a 2-D weight such as the router's gate.weight (PEFT's transformers-5
        # rewrite targets it so: the TopKRouter holding it is no nn.Linear); same adapter parameters
        hits = [u for u in uses if _parameter_matches(pattern, parameter_path(u)) and not u.tied_to
                and (u.n_experts or len(u.shape) == 2)]
        if not hits:
            raise PlanError(f"{source}: target_parameters {pattern!r} matches no 3-D expert tensor or linear weight "
                            "of the model")
        for use in hits:
            if use.n_experts or (use.role in LORA_ROLES and use.kind not in ("token", "position", "gate_scale")):
                adapted[use.key] = parameter_path(use)
            else:
                refused.append(f"{parameter_path(use)} ({use.role.value} {use.kind}: not priced as a LoRA target)")
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


def _alpha_of(data: dict, path: str, alpha: float) -> float:
    """PEFT's alpha of one adapted path: the first alpha_pattern key matching as rank_pattern's do."""
    for key, value in (data.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return float(value)
    return alpha


def _linear_keys(model) -> set[str]:
    return {u.key for u in model.roles.params if u.kind not in ("bias", "norm", "token", "position") and not u.tied_to}


def _target_alphas(lora: list[str], alpha_of: dict[str, float], model) -> dict[str, float] | None:
    """{target: alpha} of the chosen targets, each the alpha of every use it adapts (as
    gradients.lora_adapters assigns uses: the first target naming a use takes it); None when a
    target's uses have different alphas (alpha changes no cost: the caller notes it)."""
    linear, covered, alphas = _linear_keys(model), set(), {}
    for target in lora:
        keys = (_selection(model, target) & linear & set(alpha_of)) - covered
        covered |= keys
        found = {alpha_of[k] for k in keys}
        if len(found) > 1:
            return None
        if found:
            alphas[target] = found.pop()
    return alphas


def _cover_lora(ranks: dict[str, int], model, source: str) -> tuple[list[str], dict[str, int]]:
    """LoRA targets whose selections partition the adapted uses, each at one rank."""
    linear = _linear_keys(model)
    chosen, rank_of, covered = [], {}, set()
    for target in (*ROLE_TARGETS, *KIND_TARGETS, *PART_TARGETS):
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
                        "ffn, up, gate, down, router, experts, experts.gate_up, experts.down, shared_experts, head; "
                        "q@layers:A-B)")
    return chosen, rank_of


def _layer_scoped(ranks: dict[str, int], covered: set[str], linear: set[str], model) -> list[tuple[str, int]]:
    """(``target@layers:A-B``, rank) pairs for what whole-model targets left: PEFT's
    ``layers_to_transform`` and per-layer ``rank_pattern`` adapt a kind in some layers only, or
    at different ranks by layer. Per kind, runs of consecutive layers at one rank become one
    scoped target; a layer where the kind is only partly adapted stays unexpressed."""
    found = []
    for target in (*ROLE_TARGETS, *KIND_TARGETS, *PART_TARGETS):
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


# ------------------------------------------------------------ PEFT's transformers-5 rewrite of MoE targets

# the v4 module names of the projections transformers 5 fused into 3-D expert tensors (and the router)
V4_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate")


def meta_module(source: str, revision: str | None = None):
    """The transformers module of a model source on the meta device, as PEFT would wrap it (no
    weights), or None where PEFT would not rewrite for it: an ONNX file, a module that is not a
    transformers model, or no torch and PEFT installed (the names are then matched as written)."""
    import importlib.util
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("peft") is None:
        return None
    from costlens.frontends.source import SourceKind, classify, torch_source
    found = classify(source, revision)
    if found.kind is SourceKind.ONNX:
        return None
    built, _ = torch_source(found, revision)
    if found.kind in (SourceKind.IMPORT_SPEC, SourceKind.MODULE):
        # PEFT's own test (BaseTuner.inject_adapter): a transformers-like model has config.model_type
        return built if hasattr(getattr(built, "config", None), "model_type") else None
    from costlens.frontends.hf_config import build_model
    return build_model(built, source=found.text)


def peft_rewrite(data: dict, module, source: str) -> tuple[dict, str | None]:
    """(``data`` as PEFT's ``get_peft_model`` rewrites it for ``module``, a note naming the
    rewrite or None). PEFT's own ``convert_peft_config_for_transformers`` runs on a LoraConfig of
    ``data``; nothing changes without PEFT, on transformers 4 (PEFT does not convert there) or
    for a model type PEFT does not convert."""
    try:
        import peft
        from peft.utils.transformers_weight_conversion import (convert_peft_config_for_transformers,
                                                               get_model_conversion_mapping)
    except ImportError:        # no PEFT, or transformers 4: the module imports transformers 5's conversion_mapping
        return data, None
    known = {f.name for f in fields(peft.LoraConfig)}
    model_type = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
    try:
        # a copy: the rewrite edits rank_pattern and alpha_pattern in place
        config = peft.LoraConfig(**copy.deepcopy({k: v for k, v in data.items() if k in known}))
        before = _targets_of(config)
        # as BaseTuner.inject_adapter calls it; PEFT 0.21 passes the model's weight conversion mapping
        # and does not read it, so the same argument is given here
        convert_peft_config_for_transformers(config, model=module, conversions=get_model_conversion_mapping(module))
    except (TypeError, ValueError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"{source}: PEFT refuses this config on the {model_type} module ({message})") from None
    after = _targets_of(config)
    if after == before:
        return data, None
    rewritten = {**data, "target_modules": after[0] if isinstance(after[0], str) else list(after[0]),
                 "target_parameters": list(after[1]), "rank_pattern": dict(config.rank_pattern),
                 "alpha_pattern": dict(config.alpha_pattern)}
    return rewritten, _rewrite_note(peft.__version__, model_type, before, after, config)


def _targets_of(config) -> tuple:
    modules = config.target_modules
    return (modules if isinstance(modules, str) or modules is None else tuple(sorted(modules)),
            tuple(sorted(config.target_parameters or ())), tuple((config.rank_pattern or {}).items()),
            tuple((config.alpha_pattern or {}).items()))


def _rewrite_note(version: str, model_type: str, before: tuple, after: tuple, config) -> str:
    if isinstance(before[0], str):
        gone = f"target_modules {before[0]!r} resolve to {', '.join(after[0]) or 'nothing'}"
    else:
        gone = (f"target_modules {', '.join(sorted(set(before[0] or ()) - set(after[0]))) or 'none'} leave "
                "(no module of those names is adapted)")
    added = sorted(set(after[1]) - set(before[1]))
    scaled = [f"{_pattern_name(k)} at rank {v}, alpha {config.alpha_pattern.get(k, config.lora_alpha)}"
              for k, v in after[2] if (k, v) not in before[2]]
    return (f"PEFT {version} rewrites the targets for transformers 5's fused {model_type} experts, as get_peft_model "
            f"does: {gone}, target_parameters {', '.join(added) or 'none'} come in"
            + (f" ({'; '.join(scaled)})" if scaled else ""))


def _pattern_name(key: str) -> str:
    return key.removeprefix(r".*\.").replace("\\", "")


def _fused_expert_names(data: dict, uses) -> str | None:
    """A note when names PEFT rewrites on a transformers-5 MoE module meet a graph of fused experts
    (an ONNX export of one) whose model type is unknown here, so the rewrite cannot be run."""
    targets = data.get("target_modules")
    listed = targets if isinstance(targets, (list, tuple)) else []
    named = [t for t in listed if t.rsplit(".", 1)[-1] in V4_EXPERT_NAMES]
    # an exporter may rename the fused tensor (val_353): its kind, gate and up in one 3-D tensor, tells
    if not named or not any(u.n_experts and u.kind == "gate_up" for u in uses):
        return None
    return (f"target_modules {', '.join(named)}: this graph holds fused 3-D experts (gate and up in one tensor) as "
            "transformers 5 builds them; if it was exported from a transformers MoE model of a type PEFT converts "
            "(mixtral, deepseek_v3, olmoe, qwen3_moe, ...), PEFT on that module rewrites these names into "
            "target_parameters on the experts, which a graph does not say: priced as written here; price the "
            "model's config.json for PEFT's plan")


@contextmanager
def named_targets_only():
    """PEFT's ``get_peft_model`` without its transformers-5 rewrite of MoE targets (module doc),
    for a LoRA config of full module and parameter names: the rewrite matches names by their last
    part alone, so a dense MLP's ``model.layers.0.mlp.gate_proj`` would leave target_modules and
    re-target every layer's fused experts. A no-op where PEFT has no rewrite (no PEFT,
    transformers 4). PEFT 0.21 has no option to turn it off."""
    from unittest import mock
    try:
        import peft.utils.transformers_weight_conversion as conversion
    except ImportError:
        yield
        return
    # BaseTuner.inject_adapter imports the function from this module at each call: patched here, not in
    # peft.tuners.tuners_utils (which never holds the name)
    with mock.patch.object(conversion, "convert_peft_config_for_transformers", lambda *args, **kwargs: None):
        yield


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
    module = meta_module(source) if source is not None else None     # PEFT's rewrite needs the module
    result = plan_from_peft(data, model, transformers_model=transformers_model, label=str(path), module=module)
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
