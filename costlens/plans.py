"""Plans (what trains, which adapters, which cuts) and setups (batch, seq, optimizer, ...).

A plan is written by a user as CLI options or as a spec string for `compare`:
``train=attn,router;lora=attn,experts;rank=attn=8,experts=4;stop-grad=attn``. A MoE's experts take
one rank per projection kind as ``ROLE.KIND`` targets (PEFT's fused gate_up at 2r beside down at r):
``lora=attn,experts.gate_up,experts.down;rank=8,experts.gate_up=16;alpha=16,experts.gate_up=32``.
Parsing and validation against a model live here; pricing lives in estimate.py.
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
# ``ROLE.KIND`` selectors: one projection kind of a feed-forward role, so a MoE's experts can hold
# two ranks (PEFT's transformers-5 rewrite adapts the fused gate_up tensor at 2r, down at r):
# ``experts.gate_up``, ``experts.down``, ``shared_experts.up``... A kind answers as the bare kind
# selectors do: ``up`` and ``gate`` also name a fused gate_up tensor, ``gate_up`` names it alone.
PART_ROLES: dict[str, Role] = {"ffn": Role.FFN, "experts": Role.EXPERTS, "shared_experts": Role.SHARED_EXPERTS}
PART_KINDS: dict[str, frozenset[str]] = {
    "gate_up": frozenset({"gate_up"}), "gate": frozenset({"gate", "gate_up"}),
    "up": frozenset({"up", "gate_up"}), "down": frozenset({"down"}),
}
LORA_TARGETS = ("attn", "q", "k", "v", "o", "ffn", "up", "gate", "down", "router", "experts", "shared_experts", "head")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd", "sgd-momentum", "adafactor")
# fp32; "bf16-autocast"/"fp16-autocast": fp32 weights, gradients and optimizer state, the forward
# under torch.autocast (the HF Trainer's bf16=True / fp16=True); "bf16": pure bf16 weights and
# optimizer state; "bf16-mixed"/"fp16-mixed": half-precision weights with an fp32 master copy.
PRECISIONS = ("fp32", "bf16-autocast", "fp16-autocast", "bf16", "bf16-mixed", "fp16-mixed")
# The dtype the forward runs in under each precision: half-weight precisions run the model's code
# in half, with its own fp32 upcasts (softmax, norms, RoPE); autocast runs fp32 code.
_RUNNING_DTYPES = {"bf16": "bfloat16", "bf16-mixed": "bfloat16", "fp16-mixed": "float16"}
# "eager": the softmax(QK^T)V ops as written; "sdpa": torch.nn.functional.scaled_dot_product_attention
# as torch dispatches it on the device (HF's default); "fused": a flash-style kernel that saves the
# output and its log-sum-exp only.
ATTENTION_IMPLS = ("eager", "sdpa", "fused")
# How experts stored as 3-D tensors (transformers 5's fused layout) run under routed dispatch,
# by transformers' experts_implementation names: "eager": a loop over the experts hit, each on
# its gathered tokens, combined with index_add (which keeps its source); "grouped_mm": tokens
# sorted by expert and run through torch._grouped_mm, combined by a gather and a sum (no
# index_add); "batched_mm": each pair's expert matrices gathered ([S, 2F, D], what a bmm keeps
# for dX) and run through bmm (what transformers' ONNX exports trace). Experts stored one linear
# per expert always run a loop.
EXPERTS_IMPLS = ("eager", "grouped_mm", "batched_mm")
# "ce": cross-entropy of the logits in their own dtype; "hf": as transformers computes it from
# labels (logits upcast to fp32, shifted by one, cross-entropy); "chunked-ce": torchtune's
# CEWithChunkedOutputLoss (the head per token chunk, each chunk upcast to fp32 on its own).
LOSSES = ("ce", "hf", "chunked-ce")
SHARD_MODES = ("none", "ddp", "zero1", "zero2", "zero3")   # how data-parallel ranks share the model
OFFLOAD = (None, "optimizer", "params")                    # what lives in host memory between uses
LAYER_RANGE = re.compile(r"^layers:(\d+)(?:-(\d+))?$")


def running_dtype(precision: str) -> str:
    """The torch dtype name the model's parameters have while the forward runs under
    ``precision`` ("float32", "bfloat16" or "float16"): the dtype to trace a config in."""
    return _RUNNING_DTYPES.get(precision, "float32")


@dataclass(frozen=True)
class Plan:
    """Which base weights train, which adapters are added, which gradients are cut."""

    name: str = "full"
    train: tuple[str, ...] = ()          # selectors; empty = everything (or nothing under LoRA)
    freeze: tuple[str, ...] = ()
    lora: tuple[str, ...] = ()           # LoRA targets (selectors)
    ranks: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    rank: int = 8                        # rank for targets without their own
    alpha: float = 16.0                  # LoRA alpha (scale alpha / rank) for targets without their own
    alphas: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    lora_dropout: float = 0.0
    dora: bool = False                   # PEFT use_dora: a trained magnitude per output, weight-normed
    stack_ffn: int = 0
    stack_ffn_width: int | None = None
    stop_grad: tuple[str, ...] = ()      # "attn": detach every attention output
    dropout: float = 0.0

    def rank_for(self, target: str) -> int:
        """The LoRA rank of one of the plan's targets (its own, else the plan's)."""
        return self.ranks.get(target, self.rank)

    def alpha_for(self, target: str) -> float:
        """The LoRA alpha of one of the plan's targets (its own, else the plan's); costs do not
        depend on it, the adapter's output scale alpha / rank does."""
        return self.alphas.get(target, self.alpha)


@dataclass(frozen=True)
class Setup:
    """How the step runs. Defaults: batch 1, seq 2048 (capped by a learned position table)."""

    batch: int = 1
    seq: int | None = None
    optimizer: str = "adamw"
    precision: str = "fp32"
    attention: str = "eager"             # the CLI's default is what the source runs (Model.default_attention)
    checkpointing: bool = False          # HF gradient_checkpointing_enable: non-reentrant, per decoder layer
    loss: str = "ce"                     # LOSSES
    optimizer_impl: str = "for-loop"     # "foreach" keeps whole-model temporaries (CUDA default)
    gpu: str | None = None
    mfu: float = 0.4
    moe_dispatch: str = "routed"         # "routed": experts see their k/E of the tokens; "dense": all tokens
    experts_impl: str = "eager"          # EXPERTS_IMPLS; the CLI's default: what the source runs (cli._experts_default)
    device: str = "cuda"                 # where the step runs: torch's kernels differ (dropout masks)
    # parallel layout (costlens/parallel/): per-rank figures when gpus > 1; batch is per data-parallel rank
    gpus: int = 1
    shard: str = "none"                  # none | ddp | zero1 | zero2 | zero3 (docs/distributed.md)
    tp: int = 1                          # tensor-parallel ranks (heads and FFN width split)
    ep: int = 1                          # expert-parallel ranks
    offload: str | None = None           # None | "optimizer" | "params"
    bandwidth: float = 100.0             # GB/s per rank, for the communication time
    base_quant: str | None = None        # None | "nf4" | "nf4-dq" | "int8": frozen linears stored by bitsandbytes (quant.py)

    @property
    def is_parallel(self) -> bool:
        """Whether the step runs on a parallel layout (per-rank figures, costlens/parallel/)."""
        return (self.gpus, self.shard, self.tp, self.ep, self.offload) != (1, "none", 1, 1, None)


# --------------------------------------------------------------------------- parsing

def split_list(text: str | None) -> tuple[str, ...]:
    """``"attn, ffn"`` -> ("attn", "ffn"); None or "" -> ()."""
    if not text:
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_ranks(text: str | None) -> tuple[int | None, dict[str, int]]:
    """``8`` -> (8, {}); ``attn=8,router=4`` -> (None, {...}); ``8,experts.gate_up=16`` -> (8, {...})
    (a bare number among the items: the rank of the targets without their own)."""
    return _per_target(text, "--rank", "N", _positive_int)


def parse_alphas(text: str | None) -> tuple[float | None, dict[str, float]]:
    """LoRA alphas, as ranks are given: ``16`` -> (16.0, {}); ``16,experts.gate_up=32`` -> (16.0, {...})."""
    return _per_target(text, "--alpha", "ALPHA", lambda value, what: _alpha(value))


def _per_target(text, option: str, unit: str, convert) -> tuple:
    """(default or None, {target: value}) of ``V`` / ``TARGET=V,...`` / ``V,TARGET=V,...``."""
    if not text:
        return None, {}
    text = str(text)
    if "=" not in text:
        return convert(text.strip(), option), {}
    default, values = None, {}
    for part in split_list(text):
        target, equals, value = (s.strip() for s in part.partition("="))
        if not equals:
            if default is not None:
                raise PlanError(f"{option}: two values without a target ({default}, {part}): give one, "
                                f"then TARGET={unit}")
            default = convert(target, option)
        elif not value or not target:
            raise PlanError(f"{option}: expected TARGET={unit}, got {part!r}")
        elif target in values:
            raise PlanError(f"{option}: {target!r} is given twice")
        else:
            values[target] = convert(value, f"{option} {target}")
    return default, values


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
                      stack_ffn=None, stack_ffn_width=None, stop_grad=None, dropout=None, dora=None,
                      **unknown) -> Plan:
    """The Plan of the CLI's plan options (or a spec's keys, as text), checked: unknown keys,
    contradictory or silently ignored options are refused (PlanError, one line)."""
    if unknown:
        raise PlanError(f"plan {name!r}: unknown key(s) {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(k.replace('_', '-') for k in PLAN_KEYS)})")
    default_rank, ranks = parse_ranks(rank)
    default_alpha, alphas = parse_alphas(alpha)
    _check_parts((*split_list(train), *split_list(freeze), *split_list(lora)))
    _check_consistent(name, split_list(train), split_list(freeze), split_list(lora), ranks,
                      {"rank": rank, "alpha": alpha, "lora-dropout": lora_dropout,
                       "dora": dora if _flag(dora, "dora") else None}, alphas)
    plan = Plan(
        name=name, train=split_list(train), freeze=split_list(freeze), lora=split_list(lora),
        ranks=MappingProxyType(ranks), rank=default_rank or 8,
        alpha=default_alpha if default_alpha is not None else _alpha(None), alphas=MappingProxyType(alphas),
        lora_dropout=_fraction(lora_dropout, "lora-dropout"), dropout=_fraction(dropout, "dropout"),
        dora=_flag(dora, "dora"),
        stack_ffn=_count(stack_ffn, "stack-ffn"),
        stack_ffn_width=_positive_int(str(stack_ffn_width), "stack-ffn-width") if stack_ffn_width else None,
        stop_grad=split_list(stop_grad),
    )
    return plan


def _check_parts(selectors: tuple[str, ...]) -> None:
    """Refuse a misspelt ``ROLE.KIND`` selector (``experts.gate_upp``) when the plan is read, not
    only when a model is priced: the kinds are the same for every model."""
    for selector in selectors:
        for part in selector.split("@"):
            if "." in part:
                part_selector(part)


def _check_consistent(name: str, train: tuple, freeze: tuple, lora: tuple, ranks: dict, adapter_options: dict,
                      alphas: dict | None = None) -> None:
    """Refuse options that would be silently ignored or contradict each other (issue 16 item 7)."""
    where = f"plan {name!r}: " if name not in ("", "full") and "=" not in name else ""   # spec-named: the options speak
    both = sorted(set(train) & set(freeze))
    if both:
        raise PlanError(f"{where}{', '.join(both)} is both in --train and in --freeze: choose one")
    if not lora:
        given = [key for key, value in adapter_options.items() if value not in (None, "")]
        if given:
            raise PlanError(f"{where}--{given[0]} sets a LoRA adapter, but the plan has none: add --lora TARGETS "
                            "(e.g. --lora attn)")
        return
    for option, values in (("--rank", ranks), ("--alpha", alphas or {})):
        stray = sorted(set(values) - set(lora))
        if stray:
            raise PlanError(f"{where}{option} {stray[0]}=...: {stray[0]!r} is not a --lora target "
                            f"(targets: {', '.join(lora)})")


def check_unique_names(plans) -> None:
    """Refuse two plans of the same name (a comparison could not tell them apart)."""
    seen = set()
    for plan in plans:
        if plan.name in seen:
            raise PlanError(f"two plans are named {plan.name!r}: give each --plan its own NAME:")
        seen.add(plan.name)


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


def _flag(value, what: str) -> bool:
    """A yes/no plan key: the CLI's flag (a bool), or the spec / plans-file text."""
    if value in (None, "", False):
        return False
    if value is True:
        return True
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise PlanError(f"--{what}: {value!r} is not true or false")


def _alpha(text) -> float:
    if not text:
        return 16.0
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise PlanError(f"--alpha: {text!r} is not a number (the LoRA scaling alpha, e.g. 16)") from None
    if not math.isfinite(value):
        raise PlanError(f"--alpha: must be a finite number, got {text!r}")
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


PLAN_KEYS = ("train", "freeze", "lora", "rank", "alpha", "lora_dropout", "dora", "stack_ffn", "stack_ffn_width",
             "stop_grad", "dropout")


def load_plans_file(path: str) -> list[tuple[str, Plan]]:
    """Plans from a TOML file: ``[[plan]]`` tables with ``name`` and either ``spec`` (the
    ``compare --plan`` syntax) or the keys train, freeze, lora, rank, alpha, lora-dropout, dora,
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
        if plans and (table.get("name") or f"plan{number}") in {plan.name for _, plan in plans}:
            raise PlanError(f"{path}: [[plan]] {number}: the name {table.get('name')!r} is taken by an earlier plan")
        name = table.get("name") or f"plan{number}"
        if not isinstance(name, str):
            raise PlanError(f"{path}: [[plan]] {number}: name must be a string, got {name!r}")
        if "spec" in table:
            extra = sorted(set(table) - {"name", "spec"})
            unknown = [key for key in extra if key.replace("-", "_") not in PLAN_KEYS]
            if unknown:
                raise PlanError(f"{path}: [[plan]] {name!r}: unknown key(s) {', '.join(unknown)} "
                                f"(known: name, spec, {', '.join(k.replace('_', '-') for k in PLAN_KEYS)})")
            if extra:
                raise PlanError(f"{path}: [[plan]] {name!r}: give either spec or keys, not both ({', '.join(extra)})")
            plans.append((str(table["spec"]), parse_plan_spec(str(table["spec"]), name)))
            continue
        options = {key.replace("-", "_"): str(value) if not isinstance(value, str) else value
                   for key, value in table.items() if key != "name"}
        unknown = sorted(set(options) - set(PLAN_KEYS))
        if unknown:
            raise PlanError(f"{path}: [[plan]] {name!r}: unknown key(s) {', '.join(unknown)} "
                            f"(known: name, spec, {', '.join(k.replace('_', '-') for k in PLAN_KEYS)})")
        spec = ";".join(f"{k.replace('_', '-')}={v}" for k, v in options.items()) or "full"
        plans.append((spec, plan_from_options(name, **options)))
    return plans


def check_setup(setup: Setup) -> Setup:
    """``setup`` itself when every field is one costlens prices; else PlanError naming the field."""
    if setup.optimizer not in OPTIMIZERS:
        raise PlanError(f"unknown optimizer {setup.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if setup.precision not in PRECISIONS:
        raise PlanError(f"unknown precision {setup.precision!r} (choose from {', '.join(PRECISIONS)})")
    if setup.loss not in LOSSES:
        raise PlanError(f"unknown loss {setup.loss!r} (choose from {', '.join(LOSSES)})")
    if setup.attention not in ATTENTION_IMPLS:
        raise PlanError(f"unknown attention {setup.attention!r} (choose from {', '.join(ATTENTION_IMPLS)})")
    if setup.device not in ("cuda", "cpu"):
        raise PlanError(f"unknown device {setup.device!r} (cuda or cpu)")
    if setup.moe_dispatch not in ("routed", "dense"):
        raise PlanError(f"unknown MoE dispatch {setup.moe_dispatch!r} (routed or dense)")
    if setup.experts_impl not in EXPERTS_IMPLS:
        raise PlanError(f"unknown experts implementation {setup.experts_impl!r} "
                        f"(choose from {', '.join(EXPERTS_IMPLS)})")
    if setup.batch <= 0 or (setup.seq is not None and setup.seq <= 0):
        raise PlanError("batch and seq must be positive")
    check_sizes(setup.batch, setup.seq)
    if (setup.gpus, setup.shard, setup.tp, setup.ep, setup.offload) != (1, "none", 1, 1, None):
        check_parallel(setup.gpus, setup.shard, setup.tp, setup.ep, setup.offload)
    if setup.bandwidth <= 0:
        raise PlanError("--bandwidth must be positive (GB/s)")
    if setup.base_quant not in (None, "nf4", "nf4-dq", "int8"):
        raise PlanError(f"unknown --quant {setup.base_quant!r} (nf4, nf4-dq or int8)")
    return setup


# Beyond these a figure describes no machine (issue 16 item 5). The longest contexts trained today are
# about 10M tokens (Llama 4 Scout) and the largest batches a few million tokens per step.
MAX_SEQ = 2**24              # tokens per sequence (16,777,216)
MAX_BATCH = 2**20            # sequences per step per rank (1,048,576)
MAX_TOKENS_PER_STEP = 2**32  # batch x seq (4.3e9 tokens: thousands of times any published step)


def check_sizes(batch: int, seq: int | None) -> None:
    """Refuse a batch or seq beyond any machine (PlanError with the limit and the reason)."""
    if seq is not None and seq > MAX_SEQ:
        raise PlanError(f"--seq {seq:,} is beyond any machine (at most {MAX_SEQ:,} tokens per sequence; "
                        "the longest trained contexts are about 10M)")
    if batch > MAX_BATCH:
        raise PlanError(f"--batch {batch:,} is beyond sanity (at most {MAX_BATCH:,} sequences per step and rank; "
                        "use --grad-accum and --gpus for a large global batch)")
    if seq is not None and batch * seq > MAX_TOKENS_PER_STEP:
        raise PlanError(f"--batch {batch:,} x --seq {seq:,} = {batch * seq:,} tokens per step is beyond any "
                        f"machine (at most {MAX_TOKENS_PER_STEP:,})")


def check_parallel(gpus: int, shard: str, tp: int, ep: int, offload: str | None) -> None:
    """Refuse (PlanError) a parallel layout that cannot run: ranks must divide into tp x ep groups."""
    if gpus < 1 or tp < 1 or ep < 1:
        raise PlanError("--gpus, --tp and --ep must be positive")
    if shard not in SHARD_MODES:
        raise PlanError(f"unknown --shard {shard!r} (choose from {', '.join(SHARD_MODES)})")
    if offload not in OFFLOAD:
        raise PlanError(f"unknown --offload {offload!r} (optimizer or params)")
    if gpus % (tp * ep):
        raise PlanError(f"--gpus {gpus} is not a multiple of --tp {tp} x --ep {ep}")
    if gpus // (tp * ep) > 1 and shard == "none":
        raise PlanError(f"--gpus {gpus}: choose how data-parallel ranks share the model (--shard ddp|zero1|zero2|zero3)")
    if offload == "params" and shard not in ("zero3",):
        raise PlanError("--offload params needs --shard zero3 (only sharded parameters are offloaded)")


# --------------------------------------------------------------------------- selection

def select(uses: tuple[ParamUse, ...], selector: str, roles: RoleMap) -> set[str]:
    """Keys of the parameter uses a selector names; a selector the model lacks is an error.
    ``A@B`` scopes a selector to another (``q@layers:0-15``: the q projections of layers 0-15,
    as PEFT's ``layers_to_transform`` adapts them); the scope must select something of ``A``."""
    if "@" in selector:
        return _scoped(uses, selector, roles)
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
    if "." in selector:
        return _part(uses, selector)
    if selector not in ROLE_SELECTORS:
        known = ", ".join([*ROLE_SELECTORS, *SPECIAL_SELECTORS, "layers:A-B", "experts.gate_up (ROLE.KIND)"])
        raise PlanError(f"unknown role {selector!r} (known: {known})")
    role, kinds = ROLE_SELECTORS[selector]
    chosen = {u.key for u in uses if u.role is role and (kinds is None or _kind_matches(u.kind, kinds))}
    chosen |= {u.key for u in uses if u.kind in SELECTOR_EXTRA_KINDS.get(selector, ())}
    if not chosen:
        raise PlanError(f"the model has no {selector!r} parameters" +
                        (" (it is a dense model)" if role in (Role.ROUTER, Role.EXPERTS, Role.SHARED_EXPERTS) else ""))
    return _with_ties(uses, chosen)


# Uses of another role a selector also names: the norm of the embeddings (BERT, BLOOM) belongs to
# the embedding block, so ``--freeze embed`` leaves nothing trainable below layer 0; ``norm``
# names every normalization weight, the head transform's included (as LayerNorm tuning does).
SELECTOR_EXTRA_KINDS = {"embed": ("embed_norm",), "norm": ("norm",)}


def _with_ties(uses: tuple[ParamUse, ...], chosen: set[str]) -> set[str]:
    """A tie is one tensor: a selector naming either use (token embedding, tied head) names both,
    so freezing ``embed`` freezes the head's copy too, and training ``head`` trains the table."""
    tied = [u for u in uses if u.tied_to]
    if not tied:
        return chosen
    by_constant: dict[str, set[str]] = {}
    for use in uses:
        by_constant.setdefault(use.constant, set()).add(use.key)
    for use in tied:
        group = by_constant.get(use.tied_to, set()) | {use.key}
        if group & chosen:
            chosen |= group
    return chosen


def _scoped(uses: tuple[ParamUse, ...], selector: str, roles: RoleMap) -> set[str]:
    base, scopes = selector.split("@")[0], selector.split("@")[1:]
    if not base or not all(scopes):
        raise PlanError(f"{selector}: a scoped selector is SELECTOR@SCOPE, e.g. q@layers:0-15")
    chosen = select(uses, base, roles)
    for scope in scopes:
        chosen &= select(uses, scope, roles)
    if not chosen:
        raise PlanError(f"{selector}: selects no parameter ({base!r} has none in {'@'.join(scopes)!r})")
    return chosen


def part_selector(selector: str) -> tuple[Role, frozenset[str]]:
    """(role, kinds) of a ``ROLE.KIND`` selector (``experts.gate_up``); PlanError, one line, for a
    role without projection kinds or an unknown kind. Needs no model: plans are checked on parsing."""
    role_name, _, kind = selector.partition(".")
    if role_name not in PART_ROLES:
        raise PlanError(f"{selector!r}: ROLE.KIND names a projection kind of {', '.join(PART_ROLES)} "
                        f"(e.g. experts.gate_up); {role_name!r} is not one (attention's kinds are q, k, v, o)")
    if kind not in PART_KINDS:
        raise PlanError(f"{selector!r}: unknown {role_name} kind {kind!r} (known: {', '.join(PART_KINDS)})")
    return PART_ROLES[role_name], PART_KINDS[kind]


def _part(uses: tuple[ParamUse, ...], selector: str) -> set[str]:
    role, kinds = part_selector(selector)
    chosen = {u.key for u in uses if u.role is role and u.kind in kinds}
    if not chosen:
        held = sorted({u.kind for u in uses if u.role is role and u.kind not in ("bias", "norm")})
        raise PlanError(f"the model has no {selector!r} parameters" +
                        (f" (its {role.value} hold: {', '.join(held)})" if held else f" (no {role.value} at all)"))
    return chosen


def lora_target_base(target: str) -> str:
    """The role part of a LoRA target (``q`` of ``q@layers:0-3``, ``experts`` of ``experts.down``):
    what must be a linear role."""
    return target.split("@", 1)[0].split(".", 1)[0]


def _kind_matches(kind: str, kinds: frozenset[str]) -> bool:
    # fused projections answer to each part: "qkv" is selected by q, k and v
    if kind in kinds:
        return True
    return kind in ("qkv", "kv", "qk") and any(k in kind for k in kinds)


def with_name(plan: Plan, name: str) -> Plan:
    """A copy of ``plan`` named ``name``."""
    return replace(plan, name=name)
