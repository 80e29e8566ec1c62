"""What fits in a memory limit: the largest batch, the longest sequence, or the cheapest plan.

One loaded model (graph and roles) is priced again and again with ``estimate``; nothing is traced
twice. The usable memory is the limit less a headroom fraction (``--headroom 10%``: 90% of it).

- **batch** / **seq**: the step's peak grows with batch and with seq, so the largest value that
  fits is found by doubling from 1 until the peak exceeds the limit, then bisecting between the
  last value that fits and the first that does not (about 2·log2(answer) estimates). The answer
  fits by the estimate and the value one above it does not; a learned position table caps seq.
- **plan**: candidates are plans (full, freeze-attn, ffn-only or experts-only, LoRA r=8/16/64 on
  attention and on attention + FFN or experts) x checkpointing off/on, each tried with the
  setups that save memory, most faithful first: bf16-mixed + AdamW, bf16-mixed + 8-bit AdamW,
  bf16 + AdamW, bf16 + 8-bit AdamW (options given by the user fix that axis). The cheapest fit is
  the one with the fewest step FLOPs (time per step; recomputation included), then the fewest
  concessions (8-bit state, bf16 weights without fp32 master copies), then the lowest peak. A
  (plan, checkpointing) group whose leanest setup (bf16 + 8-bit AdamW: the least memory) does not
  fit has no setup that fits, so each group costs one to four estimates.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from costlens.errors import PlanError
from costlens.estimate import Estimate, estimate
from costlens.plans import Plan, Setup, parse_plan_spec

SEARCHES = ("batch", "seq", "plan")
MAX_BATCH = 2**16
MAX_SEQ = 2**20
LORA_RANKS = (8, 16, 64)
# setups tried per plan candidate, most faithful first (precision, optimizer, concessions)
VARIANTS = (("bf16-mixed", "adamw", 0), ("bf16-mixed", "adamw-8bit", 1), ("bf16", "adamw", 1), ("bf16", "adamw-8bit", 2))


@dataclass(frozen=True)
class Probe:
    """One priced point of the search."""

    name: str              # plan name
    spec: str              # plan spec text
    result: Estimate
    fits: bool
    concessions: int = 0   # 8-bit state, bf16 weights: memory saved at some fidelity
    rank_peak: int | None = None   # bytes: the largest rank's peak on a parallel layout (--gpus)

    @property
    def peak_bytes(self) -> int:
        """Bytes the limit is checked against: one device's peak, or the largest rank's."""
        return self.result.memory.peak if self.rank_peak is None else self.rank_peak

    @property
    def step_flops(self) -> int:
        return self.result.flops.step


@dataclass(frozen=True)
class FitResult:
    """The answer of one ``fit`` search (batch, seq or plan) and the probes that led to it; memory in bytes."""

    search: str
    memory_bytes: int          # the limit as given (a GPU's board memory, or --memory)
    headroom: float            # fraction of memory_bytes kept free
    usable_bytes: int          # memory_bytes x (1 - headroom)
    gpu: str | None
    probes: tuple[Probe, ...]  # batch/seq: in probing order; plan: one per candidate group
    best: Probe | None         # the answer; None when nothing fits
    next_up: Probe | None      # batch/seq: the smallest probed value above the answer (does not fit)
    capped: bool               # batch/seq: the search stopped at its cap, still fitting
    notes: tuple[str, ...]


def fit(model, memory_bytes: int, *, search: str = "batch", plan: Plan | None = None, setup: Setup | None = None,
        headroom: float = 0.0, gpu: str | None = None, extra_plans: tuple[tuple[str, Plan], ...] = (),
        fixed: frozenset[str] = frozenset(), progress: Callable[[str], None] = lambda message: None) -> FitResult:
    """Search ``model`` (a loaded Model) for what fits in ``memory_bytes`` less ``headroom``.
    ``plan`` and ``setup``: the step for batch/seq searches (the plan search's batch and seq and any
    fixed axes); ``fixed``: Setup fields the plan search must not vary (precision, optimizer,
    checkpointing); ``extra_plans``: more (spec, Plan) candidates for the plan search."""
    if search not in SEARCHES:
        raise PlanError(f"unknown search {search!r} (choose from {', '.join(SEARCHES)})")
    if not 0.0 <= headroom < 1.0:
        raise PlanError(f"headroom must be in [0, 100%), got {headroom:.0%}")
    if memory_bytes <= 0:
        raise PlanError("the memory limit must be positive")
    usable = int(memory_bytes * (1.0 - headroom))
    setup = setup or Setup()
    plan = plan or Plan()
    common = dict(search=search, memory_bytes=memory_bytes, headroom=headroom, usable_bytes=usable, gpu=gpu)
    if search == "plan":
        probes, best, notes = _cheapest_plan(model, setup, usable, extra_plans, fixed, progress)
        return FitResult(probes=probes, best=best, next_up=None, capped=False, notes=notes, **common)
    price = _pricer(model, plan, setup, usable, search, progress)
    cap = _seq_cap(model) if search == "seq" else MAX_BATCH
    probes, best, next_up, capped = _largest(price, cap, search)
    notes = (f"{search} capped at {cap:,} (the model's learned position table)" if search == "seq" and cap < MAX_SEQ
             else "",)
    return FitResult(probes=probes, best=best, next_up=next_up, capped=capped, notes=tuple(n for n in notes if n),
                     **common)


# --------------------------------------------------------------------------- batch, seq

def _pricer(model, plan: Plan, setup: Setup, usable: int, search: str, progress) -> Callable[[int], Probe]:
    def price(value: int) -> Probe:
        progress(f"{search} {value:,}")
        return _probe(plan.name, _spec(plan), estimate(model, plan, replace(setup, **{search: value})), usable)
    return price


def _probe(name: str, spec: str, result: Estimate, usable: int, concessions: int = 0) -> Probe:
    """A priced point; on a parallel layout the limit holds per rank (each GPU has its own memory)."""
    rank_peak = None
    if result.setup.is_parallel:
        from costlens.parallel import estimate_parallel
        s = result.setup
        rank_peak = estimate_parallel(result, s.gpus, s.shard, s.tp, s.ep, s.offload, s.bandwidth).memory.peak
    probe = Probe(name, spec, result, False, concessions, rank_peak)
    return replace(probe, fits=probe.peak_bytes <= usable)


def _largest(price: Callable[[int], Probe], cap: int, key: str):
    """(probes, best, next_up, capped): doubling from 1, then bisection; ``key``: batch or seq."""
    probes: list[Probe] = []
    _value = lambda probe: getattr(probe.result, key)  # noqa: E731

    def probe(value: int) -> Probe:
        probes.append(price(value))
        return probes[-1]

    first = probe(1)
    if not first.fits:
        return tuple(probes), None, first, False
    best, value = first, 1
    while True:
        value = min(value * 2, cap)
        if value == _value(best):
            return tuple(probes), best, None, True
        current = probe(value)
        if not current.fits:
            failed = current
            break
        best = current
    low, high = _value(best), _value(failed)
    while high - low > 1:
        middle = probe((low + high) // 2)
        if middle.fits:
            best, low = middle, _value(middle)
        else:
            failed, high = middle, _value(middle)
    return tuple(probes), best, failed, False


def _seq_cap(model) -> int:
    positions = [u for u in model.roles.params if u.kind == "position"]
    return min(positions[0].shape[0], MAX_SEQ) if positions else MAX_SEQ


# --------------------------------------------------------------------------- plans

def candidate_plans(model) -> list[tuple[str, Plan]]:
    """(spec, Plan) of the plan search's default candidates for this model."""
    from costlens.roles.types import Role
    roles = {u.role for u in model.roles.params}
    ffn = "ffn" if Role.FFN in roles else "experts" if Role.EXPERTS in roles else None
    specs = ["full", "freeze-attn:freeze=attn"]
    if ffn:
        specs.append(f"{ffn}-only:train={ffn}")
    specs += [f"lora-attn-r{r}:lora=attn;rank={r}" for r in LORA_RANKS]
    if ffn:
        specs += [f"lora-attn-{ffn}-r{r}:lora=attn,{ffn};rank={r}" for r in LORA_RANKS]
    return [(spec, parse_plan_spec(spec)) for spec in specs]


def _cheapest_plan(model, setup: Setup, usable: int, extra_plans, fixed: frozenset[str], progress):
    variants = [(p, o, c) for p, o, c in VARIANTS
                if ("precision" not in fixed or p == setup.precision) and ("optimizer" not in fixed or o == setup.optimizer)]
    if not variants:                     # the user's precision/optimizer is not one of the searched ones
        variants = [(setup.precision, setup.optimizer, 0)]
    leanest = min(variants, key=lambda v: (v[0] != "bf16", v[1] != "adamw-8bit"))
    checkpointing = (setup.checkpointing,) if "checkpointing" in fixed else (False, True)
    probes = []
    candidates, notes = candidate_plans(model), ()
    if setup.base_quant:        # a quantized base weight cannot train (quant.py): adapters only
        candidates = [(spec, plan) for spec, plan in candidates if plan.lora and not plan.train]
        notes = (f"--quant {setup.base_quant}: only the LoRA candidates (a quantized base weight cannot train)",)
    candidates += list(extra_plans)
    for spec, plan in candidates:
        for ckpt in checkpointing:
            progress(f"{plan.name}{' + checkpointing' if ckpt else ''}")
            probes.append(_group(model, spec, plan, replace(setup, checkpointing=ckpt), usable, variants, leanest))
    fitting = [p for p in probes if p.fits]
    best = min(fitting, key=lambda p: (p.step_flops, p.concessions, p.peak_bytes)) if fitting else None
    ordered = tuple(sorted(probes, key=lambda p: (p.step_flops, p.peak_bytes)))
    notes = ("cheapest: fewest step FLOPs, then fewest concessions (8-bit optimizer state, bf16 weights without "
             "fp32 master copies), then the lowest peak", *notes)
    return ordered, best, notes


def _group(model, spec: str, plan: Plan, setup: Setup, usable: int, variants, leanest) -> Probe:
    """The first setup that fits, most faithful first; the leanest one when none does."""
    def priced(variant) -> Probe:
        precision, optimizer, concessions = variant
        result = estimate(model, plan, replace(setup, precision=precision, optimizer=optimizer))
        return _probe(plan.name, spec, result, usable, concessions)

    lean = priced(leanest)
    if not lean.fits:
        return lean
    for variant in variants:
        if variant == leanest:
            return lean
        current = priced(variant)
        if current.fits:
            return current
    return lean


def _spec(plan: Plan) -> str:
    items = []
    for key in ("train", "freeze", "lora", "stop_grad"):
        if getattr(plan, key):
            items.append(f"{key.replace('_', '-')}={','.join(getattr(plan, key))}")
    if plan.lora:
        items.append("rank=" + (",".join(f"{t}={plan.rank_for(t)}" for t in plan.lora) if plan.ranks else str(plan.rank)))
        if plan.lora_dropout:
            items.append(f"lora-dropout={plan.lora_dropout}")
    for key in ("stack_ffn", "dropout"):
        if getattr(plan, key):
            items.append(f"{key.replace('_', '-')}={getattr(plan, key)}")
    return ";".join(items) or "full"
