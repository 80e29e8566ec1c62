"""Plans (what trains, which adapters, which cuts) and setups (batch, seq, optimizer, ...).

A plan is written by a user as CLI options or as a spec string for `compare`:
``train=attn,router;lora=attn,experts;rank=attn=8,experts=4;stop-grad=attn``. Parsing and
validation against a model live here; pricing lives in estimate.py.
"""
from __future__ import annotations

import math

import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from costlens.errors import PlanError
from costlens.roles.types import ParamUse, Role, RoleMap

# selector -> (role, kinds or None for every kind of that role)
ROLE_SELECTORS: dict[str, tuple[Role, frozenset[str] | None]] = {
    "attn": (Role.ATTENTION, None),
    "q": (Role.ATTENTION, frozenset({"q"})), "k": (Role.ATTENTION, frozenset({"k"})),
    "v": (Role.ATTENTION, frozenset({"v"})), "o": (Role.ATTENTION, frozenset({"o"})),
    "ffn": (Role.FFN, None),
    "up": (Role.FFN, frozenset({"up", "gate_up"})), "gate": (Role.FFN, frozenset({"gate", "gate_up"})),
    "down": (Role.FFN, frozenset({"down"})),
    "router": (Role.ROUTER, None),
    "experts": (Role.EXPERTS, None),
    "shared_experts": (Role.SHARED_EXPERTS, None),
    "embed": (Role.EMBEDDING, None),
    "norm": (Role.NORM, None),
    "head": (Role.LM_HEAD, None),
    "other": (Role.OTHER, None),
}
SPECIAL_SELECTORS = ("all", "stacked")
LORA_TARGETS = ("attn", "q", "k", "v", "o", "ffn", "up", "gate", "down", "router", "experts", "shared_experts", "head")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd", "sgd-momentum", "adafactor")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16")
ATTENTION_IMPLS = ("eager", "fused")
LAYER_RANGE = re.compile(r"^layers:(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class Plan:
    """Which base weights train, which adapters are added, which gradients are cut."""

    name: str = "full"
    train: tuple[str, ...] = ()          # selectors; empty = everything (or nothing under LoRA)
    freeze: tuple[str, ...] = ()
    lora: tuple[str, ...] = ()           # LoRA targets (selectors)
    ranks: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    rank: int = 8                        # rank for targets without their own
    alpha: float = 16.0
    lora_dropout: float = 0.0
    stack_ffn: int = 0
    stack_ffn_width: int | None = None
    stop_grad: tuple[str, ...] = ()      # "attn": detach every attention output
    dropout: float = 0.0

    def rank_for(self, target: str) -> int:
        return self.ranks.get(target, self.rank)


@dataclass(frozen=True)
class Setup:
    """How the step runs. Defaults: batch 1, seq 2048 (capped by a learned position table)."""

    batch: int = 1
    seq: int | None = None
    optimizer: str = "adamw"
    precision: str = "fp32"
    attention: str = "eager"
    checkpointing: bool = False
    optimizer_impl: str = "for-loop"     # "foreach" keeps whole-model temporaries (CUDA default)
    gpu: str | None = None
    mfu: float = 0.4
    moe_dispatch: str = "routed"         # "routed": experts see their k/E of the tokens; "dense": all tokens
    device: str = "cuda"                 # where the step runs: torch's kernels differ (dropout masks)
    # parallel layout (costlens/parallel/): per-rank figures when gpus > 1; batch is per data-parallel rank
    gpus: int = 1
    shard: str = "none"                  # none | ddp | zero1 | zero2 | zero3 (docs/distributed.md)
    tp: int = 1                          # tensor-parallel ranks (heads and FFN width split)
    ep: int = 1                          # expert-parallel ranks
    offload: str | None = None           # None | "optimizer" | "params"
    bandwidth: float = 100.0             # GB/s per rank, for the communication time


# --------------------------------------------------------------------------- parsing

def split_list(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_ranks(text: str | None) -> tuple[int | None, dict[str, int]]:
    """``8`` -> (8, {}); ``attn=8,router=4`` -> (None, {...})."""
    if not text:
        return None, {}
    if "=" not in text:
        return _positive_int(text, "--rank"), {}
    ranks = {}
    for part in split_list(text):
        target, _, value = part.partition("=")
        if not value:
            raise PlanError(f"--rank: expected TARGET=N, got {part!r}")
        ranks[target.strip()] = _positive_int(value, f"--rank {target}")
    return None, ranks


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise PlanError(f"{what}: {text!r} is not a whole number") from None
    if value <= 0:
        raise PlanError(f"{what}: must be positive, got {value}")
    return value


def parse_plan_spec(spec: str, default_name: str | None = None) -> Plan:
    """``name:key=value;key=value`` (keys: train, freeze, lora, rank, alpha, lora-dropout,
    stack-ffn, stack-ffn-width, stop-grad, dropout)."""
    head, colon, rest = spec.partition(":")
    name, body = (head.strip(), rest) if colon and "=" not in head else ("", spec)
    if "=" not in body:          # a bare name: the plan with every default ("full")
        name, body = name or body.strip(), ""
    values: dict = {}
    for item in filter(None, (p.strip() for p in body.split(";"))):
        key, _, value = item.partition("=")
        values[key.strip().replace("-", "_")] = value.strip()
    return plan_from_options(name or default_name or spec, **values)


def plan_from_options(name: str, train=None, freeze=None, lora=None, rank=None, alpha=None, lora_dropout=None,
                      stack_ffn=None, stack_ffn_width=None, stop_grad=None, dropout=None, **unknown) -> Plan:
    if unknown:
        raise PlanError(f"plan {name!r}: unknown key(s) {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(k.replace('_', '-') for k in PLAN_KEYS)})")
    default_rank, ranks = parse_ranks(rank)
    plan = Plan(
        name=name, train=split_list(train), freeze=split_list(freeze), lora=split_list(lora),
        ranks=MappingProxyType(ranks), rank=default_rank or 8,
        alpha=_alpha(alpha),
        lora_dropout=_fraction(lora_dropout, "lora-dropout"), dropout=_fraction(dropout, "dropout"),
        stack_ffn=_count(stack_ffn, "stack-ffn"),
        stack_ffn_width=_positive_int(str(stack_ffn_width), "stack-ffn-width") if stack_ffn_width else None,
        stop_grad=split_list(stop_grad),
    )
    return plan


MAX_STACKED = 1024        # extra FFN sublayers per block; far beyond any model, and each is priced


def _count(text, what: str) -> int:
    if text in (None, ""):
        return 0
    try:
        value = int(text)
    except ValueError:
        raise PlanError(f"--{what}: {text!r} is not a whole number") from None
    if value < 0:
        raise PlanError(f"--{what}: must be >= 0, got {value}")
    if value > MAX_STACKED:
        raise PlanError(f"--{what}: {value} is absurd (at most {MAX_STACKED})")
    return value


def _alpha(text) -> float:
    if not text:
        return 16.0
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise PlanError(f"alpha: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise PlanError(f"alpha: must be a finite number, got {text!r}")
    return value


def _fraction(text, what: str) -> float:
    if text in (None, ""):
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise PlanError(f"--{what}: {text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise PlanError(f"--{what}: must be in [0, 1), got {value}")
    return value


PLAN_KEYS = ("train", "freeze", "lora", "rank", "alpha", "lora_dropout", "stack_ffn", "stack_ffn_width",
             "stop_grad", "dropout")


def load_plans_file(path: str) -> list[tuple[str, Plan]]:
    """Plans from a TOML file: ``[[plan]]`` tables with ``name`` and either ``spec`` (the
    ``compare --plan`` syntax) or the keys train, freeze, lora, rank, alpha, lora-dropout,
    stack-ffn, stack-ffn-width, stop-grad, dropout."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plans file") from None
    except IsADirectoryError:
        raise PlanError(f"{path}: is a directory, not a plans file") from None
    except OSError as e:
        raise PlanError(f"{path}: cannot read the plans file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise PlanError(f"{path}: not UTF-8 text (byte {e.start}): not a TOML plans file") from None
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise PlanError(f"{path}: not a plans file (arrays or tables nested too deeply)") from None
    tables = document.get("plan")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise PlanError(f"{path}: expected one or more [[plan]] tables")
    plans = []
    for number, table in enumerate(tables, 1):
        name = table.get("name") or f"plan{number}"
        if not isinstance(name, str):
            raise PlanError(f"{path}: [[plan]] {number}: name must be a string, got {name!r}")
        if "spec" in table:
            extra = sorted(set(table) - {"name", "spec"})
            if extra:
                raise PlanError(f"{path}: [[plan]] {name!r}: give either spec or keys, not both ({', '.join(extra)})")
            plans.append((str(table["spec"]), parse_plan_spec(str(table["spec"]), name)))
            continue
        options = {key.replace("-", "_"): str(value) if not isinstance(value, str) else value
                   for key, value in table.items() if key != "name"}
        unknown = sorted(set(options) - set(PLAN_KEYS))
        if unknown:
            raise PlanError(f"{path}: [[plan]] {name!r}: unknown key(s) {', '.join(unknown)}")
        spec = ";".join(f"{k.replace('_', '-')}={v}" for k, v in options.items()) or "full"
        plans.append((spec, plan_from_options(name, **options)))
    return plans


def check_setup(setup: Setup) -> Setup:
    if setup.optimizer not in OPTIMIZERS:
        raise PlanError(f"unknown optimizer {setup.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if setup.precision not in PRECISIONS:
        raise PlanError(f"unknown precision {setup.precision!r} (choose from {', '.join(PRECISIONS)})")
    if setup.attention not in ATTENTION_IMPLS:
        raise PlanError(f"unknown attention {setup.attention!r} (choose from {', '.join(ATTENTION_IMPLS)})")
    if setup.device not in ("cuda", "cpu"):
        raise PlanError(f"unknown device {setup.device!r} (cuda or cpu)")
    if setup.moe_dispatch not in ("routed", "dense"):
        raise PlanError(f"unknown MoE dispatch {setup.moe_dispatch!r} (routed or dense)")
    if setup.batch <= 0 or (setup.seq is not None and setup.seq <= 0):
        raise PlanError("batch and seq must be positive")
    if (setup.gpus, setup.shard, setup.tp, setup.ep, setup.offload) != (1, "none", 1, 1, None):
        from costlens.parallel import check_parallel
        check_parallel(setup.gpus, setup.shard, setup.tp, setup.ep, setup.offload)
    if setup.bandwidth <= 0:
        raise PlanError("--bandwidth must be positive (GB/s)")
    return setup


# --------------------------------------------------------------------------- selection

def select(uses: tuple[ParamUse, ...], selector: str, roles: RoleMap) -> set[str]:
    """Keys of the parameter uses a selector names; a selector the model lacks is an error."""
    if selector == "all":
        return {u.key for u in uses}
    if selector == "stacked":
        from costlens.stacking import STACKED_PREFIX
        chosen = {u.key for u in uses if u.constant.startswith(STACKED_PREFIX)}
        if not chosen:
            raise PlanError("'stacked' selects the sublayers --stack-ffn N adds; give --stack-ffn")
        return chosen
    match = LAYER_RANGE.match(selector)
    if match:
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if last < first or last >= roles.architecture.layers:
            raise PlanError(f"{selector}: the model has layers 0-{roles.architecture.layers - 1}")
        return {u.key for u in uses if u.layer is not None and first <= u.layer <= last}
    if selector not in ROLE_SELECTORS:
        known = ", ".join([*ROLE_SELECTORS, *SPECIAL_SELECTORS, "layers:A-B"])
        raise PlanError(f"unknown role {selector!r} (known: {known})")
    role, kinds = ROLE_SELECTORS[selector]
    chosen = {u.key for u in uses if u.role is role and (kinds is None or _kind_matches(u.kind, kinds))}
    if not chosen:
        raise PlanError(f"the model has no {selector!r} parameters" +
                        (" (it is a dense model)" if role in (Role.ROUTER, Role.EXPERTS, Role.SHARED_EXPERTS) else ""))
    return chosen


def _kind_matches(kind: str, kinds: frozenset[str]) -> bool:
    # fused projections answer to each part: "qkv" is selected by q, k and v
    if kind in kinds:
        return True
    return kind in ("qkv", "kv", "qk") and any(k in kind for k in kinds)


def with_name(plan: Plan, name: str) -> Plan:
    return replace(plan, name=name)
