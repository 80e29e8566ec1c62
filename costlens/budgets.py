"""Budget files (``costlens.toml``) and the verdicts of a costlens.plan/1 document against them.

A budget file names plans (the spec syntax of ``costlens compare --plan``) and the most each may
cost: peak memory, trainable parameters, step FLOPs, seconds per step. ``[setup]`` sets the
step (batch, seq, optimizer, ...; the fields of ``costlens.plans.Setup``), ``[defaults]`` holds
limits for every plan, each ``[[plan]]`` its own (overriding the defaults). docs/ci.md has the
format; ``load_budget`` parses it, ``judge`` compares a plan document with it.

A malformed file raises BudgetError naming the file, the line and the key path
(``plan[1].peak_memory``: the second ``[[plan]]`` table, counting from 0).
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from costlens import gpus
from costlens.errors import CostlensError
from costlens.plans import (ATTENTION_IMPLS, OPTIMIZERS, PLAN_KEYS, PRECISIONS, Setup, check_setup,
                            parse_plan_spec)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class BudgetError(CostlensError):
    """A budget file that cannot be read, parsed, or makes no sense (line and key named)."""


class Limit(Enum):
    """What a budget bounds, each in one unit: bytes, parameters, FLOPs, seconds."""

    PEAK_MEMORY = "peak_memory"
    TRAINABLE_PARAMS = "trainable_params"
    STEP_FLOPS = "step_flops"
    TIME_PER_STEP = "time_per_step"
    MAX_COST = "max_cost"              # money of the whole [job] (price per GPU-hour x GPU-hours)


@dataclass(frozen=True)
class Bound:
    """One limit as the file wrote it and as a number (bytes, params, FLOPs or seconds)."""

    limit: Limit
    maximum: float
    written: str          # e.g. "fits: h100-80gb (10% headroom)", "24GiB", "50M"
    where: str            # key path in the file, e.g. "defaults.peak_memory"
    gpu: str | None = None  # the accelerator of a "fits:" limit
    gpus: int = 1           # "fits: 8x h100-80gb": the per-rank peak on each of 8 ranks ([setup] gpus = 8)


@dataclass(frozen=True)
class PlanBudget:
    """One ``[[plan]]`` table: the plan it names and its limits (its own, else the ``[defaults]`` ones)."""

    name: str
    spec: str             # the plan spec as written (name prefix included, if any)
    bounds: tuple[Bound, ...]


@dataclass(frozen=True)
class Budget:
    """A parsed budget file: the step ``[setup]``, the plans with their limits, and the job and prices
    that ``max_cost`` needs. Prices are per GPU-hour, in the file's own currency."""

    source: str
    setup: Mapping[str, object]     # Setup fields the file sets, validated
    plans: tuple[PlanBudget, ...]
    gpu: str | None                 # [setup] gpu, else the first "fits:" GPU: the memory line to draw
    job: Mapping[str, object] = dataclasses.field(default_factory=dict)    # [job]: tokens, grad_accum, price_per_hour
    prices: Mapping[str, float] = dataclasses.field(default_factory=dict)  # [prices]: GPU name -> price per GPU-hour
    accelerators: tuple = ()        # [gpu.NAME]: the custom gpus.Gpu entries the file defines


@dataclass(frozen=True)
class Verdict:
    """One plan against one limit. ``value`` and ``maximum`` are in the limit's unit."""

    plan: str
    limit: Limit
    maximum: float
    value: float
    written: str
    where: str

    @property
    def passed(self) -> bool:
        return self.value <= self.maximum

    @property
    def excess(self) -> float:
        """How far over the limit (negative: the margin left)."""
        return self.value - self.maximum

    @property
    def excess_fraction(self) -> float | None:
        return self.excess / self.maximum if self.maximum else None


# --------------------------------------------------------------------------- units

_NUMBER = r"([0-9][0-9_]*\.?[0-9_]*(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)"
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_PARAM_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
_FLOP_UNITS = {"": 1, "flop": 1, "kflop": 1e3, "mflop": 1e6, "gflop": 1e9, "tflop": 1e12, "pflop": 1e15,
               "eflop": 1e18}
_SECOND_UNITS = {"": 1, "s": 1, "ns": 1e-9, "us": 1e-6, "ms": 1e-3, "min": 60, "h": 3600}
_EXAMPLES = {Limit.PEAK_MEMORY: '24GiB, 512MiB, 80GB, a number of bytes or "fits: h100-80gb"',
             Limit.TRAINABLE_PARAMS: "50M, 1.2B, 350K or a whole number",
             Limit.STEP_FLOPS: '2.5e15, "3 PFLOP", "800 TFLOP"',
             Limit.TIME_PER_STEP: '"1.2s", "500ms", "2min" or a number of seconds',
             Limit.MAX_COST: "1200 or 1200.50 (in the currency of the prices)"}
_UNITS = {Limit.PEAK_MEMORY: _BYTE_UNITS, Limit.TRAINABLE_PARAMS: _PARAM_UNITS,
          Limit.STEP_FLOPS: _FLOP_UNITS, Limit.TIME_PER_STEP: _SECOND_UNITS, Limit.MAX_COST: {"": 1}}
_FITS = re.compile(r"^\s*fits\s*:\s*(?:(\d+)\s*[x×]\s*)?(\S+)\s*$", re.IGNORECASE)


def parse_quantity(value: object, limit: Limit) -> float:
    """A limit's value in its unit: a number, or a string of a number and a unit. ValueError if not."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    if isinstance(value, str):
        match = re.fullmatch(_NUMBER + r"\s*([A-Za-z]*)", value.strip())
        if not match:
            raise ValueError
        unit = match.group(2).lower()
        if limit is Limit.STEP_FLOPS:
            unit = unit.removesuffix("s")        # "PFLOPs" reads as "PFLOP"
        scale = _UNITS[limit].get(unit)
        if scale is None:
            raise ValueError
        value = float(match.group(1).replace("_", "")) * scale
    if not math.isfinite(value) or value < 0:
        raise ValueError
    return float(value)


# --------------------------------------------------------------------------- the file

_LIMIT_KEYS = tuple(limit.value for limit in Limit)
# a [[plan]] gives its plan as spec = "..." or as the plan keys themselves (as `compare --plans` files do)
_PLAN_KEYS = tuple(key.replace("_", "-") for key in PLAN_KEYS)
_TABLE_KEYS = {"defaults": (*_LIMIT_KEYS, "headroom"),
               "plan": ("name", "spec", *_LIMIT_KEYS, "headroom", *_PLAN_KEYS)}
_SETUP_CHOICES = {"optimizer": OPTIMIZERS, "precision": PRECISIONS, "attention": ATTENTION_IMPLS,
                  "optimizer_impl": ("for-loop", "foreach")}        # as `--optimizer-impl` accepts


def load_budget(path: str | Path) -> Budget:
    """Read and check a budget file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BudgetError(f"{path}: no such budget file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BudgetError(f"{path}: cannot read the budget file ({e})") from None
    return parse_budget(text, str(path))


def parse_budget(text: str, source: str = "costlens.toml") -> Budget:
    """A budget from the TOML ``text``; ``source`` names the file in every BudgetError (with line and key)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(e, text, source) from None
    except RecursionError:
        raise BudgetError(f"{source}: not a budget file (arrays or tables nested too deeply)") from None
    where = _Locator(text, source)
    for key in data:
        if key not in ("setup", "defaults", "plan", "job", "prices", "gpu"):
            raise where.error((key,), "unknown table or key (expected [setup], [defaults], [[plan]], [job], "
                                      "[prices] and [gpu.NAME] tables)")
    for key in ("setup", "defaults", "job", "prices", "gpu"):
        if not isinstance(data.get(key, {}), dict):
            raise where.error((key,), f"must be a table: [{key}]")
    accelerators = _parse_gpus(data.get("gpu", {}), where)     # before [setup], which may name one
    plans = data.get("plan", [])
    if not isinstance(plans, list) or not plans or not all(isinstance(p, dict) for p in plans):
        raise where.error(("plan",), "name at least one plan in a [[plan]] table (with spec = \"...\")")
    setup = _parse_setup(data.get("setup", {}), where)
    defaults = data.get("defaults", {})
    _check_keys(defaults, ("defaults",), where)
    budgets, names = [], set()
    for index, table in enumerate(plans):
        budget = _parse_plan(table, index, defaults, setup, where)
        if budget.name in names:
            raise where.error(("plan", index, "name" if "name" in table else "spec"),
                              f"plan {budget.name!r} appears twice (give each plan its own name)")
        names.add(budget.name)
        budgets.append(budget)
    fits = [bound.gpu for plan in budgets for bound in plan.bounds if bound.gpu]
    gpu = setup.get("gpu") or (fits[0] if fits else None)
    job, prices = _parse_job(data.get("job", {}), where), _parse_prices(data.get("prices", {}), where)
    if any(b.limit is Limit.MAX_COST for plan in budgets for b in plan.bounds):
        _check_priced(job, prices, setup, where)
    return Budget(source=source, setup=MappingProxyType(setup), plans=tuple(budgets), gpu=gpu,
                  job=MappingProxyType(job), prices=MappingProxyType(prices), accelerators=accelerators)


# [gpu.NAME] keys -> (Gpu field, scale to its unit)
_GPU_KEYS = {"memory": ("memory_bytes", 1), "bf16_tflops": ("peak_flops", 1e12), "fp32_tflops": ("fp32_flops", 1e12),
             "tf32_tflops": ("tf32_flops", 1e12), "fp16_tflops": ("fp16_flops", 1e12),
             "fp8_tflops": ("fp8_flops", 1e12), "bandwidth_tb_s": ("bandwidth", 1e12), "note": ("note", None)}


def _parse_gpus(tables: dict, where: "_Locator") -> tuple:
    """[gpu.NAME] tables: custom accelerators (memory, dense TFLOP/s per dtype, TB/s), registered in gpus
    (so that --gpu and [setup] gpu find them); returns them."""
    entries = []
    for name, table in tables.items():
        path = ("gpu", name)
        if not isinstance(table, dict):
            raise where.error(path, "must be a table: [gpu.NAME] with memory and bf16_tflops")
        values = {}
        for key, value in table.items():
            if key not in _GPU_KEYS:
                raise where.error((*path, key), f"unknown key (known: {', '.join(_GPU_KEYS)})")
            field_name, scale = _GPU_KEYS[key]
            if scale is None:
                values[field_name] = str(value)
            elif key == "memory":
                values[field_name] = int(_quantity(value, Limit.PEAK_MEMORY, (*path, key), where))
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise where.error((*path, key), f"must be a positive number, got {value!r}")
            else:
                values[field_name] = float(value) * scale
        for required in ("memory", "bf16_tflops"):
            if _GPU_KEYS[required][0] not in values:
                raise where.error(path, f"[gpu.{name}] needs {required}")
        try:
            entries.append(gpus.register(gpus.Gpu(name=name, **values)))
        except CostlensError as e:
            raise where.error(path, str(e)) from None
    return tuple(entries)


_JOB_KEYS = {"tokens": int, "dataset_tokens": int, "epochs": (int, float), "grad_accum": int,
             "price_per_hour": (int, float)}


def _parse_job(table: dict, where: "_Locator") -> dict:
    """[job]: the whole training job whose cost max_cost bounds (costlens/jobcost.py)."""
    from costlens.jobcost import job_tokens
    for key, value in table.items():
        if key not in _JOB_KEYS:
            raise where.error(("job", key), f"unknown key (known: {', '.join(_JOB_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, _JOB_KEYS[key]) or value <= 0:
            raise where.error(("job", key), f"must be a positive number, got {value!r}")
    if not table:
        return {}
    try:
        tokens = job_tokens(table.get("tokens"), table.get("dataset_tokens"), table.get("epochs"))
    except CostlensError as e:
        raise where.error(("job",), str(e)) from None
    if tokens is None:
        raise where.error(("job",), "give tokens = N (or dataset_tokens = N with epochs = E)")
    return {"tokens": tokens, "grad_accum": table.get("grad_accum", 1), "price_per_hour": table.get("price_per_hour")}


def _parse_prices(table: dict, where: "_Locator") -> dict:
    """[prices]: price per GPU-hour by accelerator name (aliases resolved)."""
    prices = {}
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise where.error(("prices", name), f"must be a non-negative price per GPU-hour, got {value!r}")
        prices[_gpu_name(name, ("prices", name), where)] = float(value)
    return prices


def _check_priced(job: dict, prices: dict, setup: dict, where: "_Locator") -> None:
    if not job:
        raise where.error(("job",), "max_cost needs the job: a [job] table with tokens = N")
    if not setup.get("gpu"):
        raise where.error(("setup",), 'max_cost needs the accelerator: set gpu = "h100-80gb" (or another) in [setup]')
    if job.get("price_per_hour") is None and setup["gpu"] not in prices:
        raise where.error(("prices",), f"max_cost needs a price: price_per_hour in [job] or {setup['gpu']} = ... in [prices]")


def job_of(budget: Budget):
    """The jobcost.Job the budget's [job] and [prices] describe (None without a [job] table)."""
    from costlens.jobcost import Job
    if not budget.job:
        return None
    price, source = budget.job.get("price_per_hour"), f"{budget.source} [job]"
    if price is None and budget.setup.get("gpu") in budget.prices:
        price, source = budget.prices[budget.setup["gpu"]], f"{budget.source} [prices]"
    return Job(tokens=budget.job["tokens"], grad_accum=budget.job["grad_accum"], price_per_gpu_hour=price,
               price_source=source if price is not None else None)


def _parse_setup(table: dict, where: "_Locator") -> dict:
    hints = typing.get_type_hints(Setup)
    fields = [f.name for f in dataclasses.fields(Setup)]
    values = {}
    for key, value in table.items():
        path = ("setup", key)
        if key not in fields:
            raise where.error(path, f"unknown setup key (known: {', '.join(fields)})")
        accepted = tuple(t for t in (typing.get_args(hints[key]) or (hints[key],)) if t is not type(None))
        if float in accepted and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) != (bool in accepted) or not isinstance(value, accepted):
            raise where.error(path, f"expected {' or '.join(t.__name__ for t in accepted)}, got {value!r}")
        if key in _SETUP_CHOICES and value not in _SETUP_CHOICES[key]:
            raise where.error(path, f"{value!r} is not one of {', '.join(_SETUP_CHOICES[key])}")
        if key in ("batch", "seq") and value <= 0:
            raise where.error(path, f"must be positive, got {value}")
        if key == "mfu" and not 0.0 < value <= 1.0:
            raise where.error(path, f"must be in (0, 1], got {value}")
        if key == "gpu":
            value = _gpu_name(value, path, where)
        values[key] = value
    try:
        check_setup(Setup(**values))                 # whatever else the estimator refuses
    except CostlensError as e:
        raise where.error(("setup",), str(e)) from None
    return values


def _parse_plan(table: dict, index: int, defaults: dict, setup: dict, where: "_Locator") -> PlanBudget:
    _check_keys(table, ("plan", index), where)
    spec = _plan_spec(table, index, where)
    try:
        plan = parse_plan_spec(spec)
    except CostlensError as e:
        raise where.error(("plan", index, "spec" if "spec" in table else _plan_keys(table)[0]), str(e)) from None
    name = table.get("name", plan.name)
    if not isinstance(name, str) or not name.strip():
        raise where.error(("plan", index, "name"), "must be a non-empty string")
    bounds = []
    for limit in Limit:
        own = limit.value in table
        if not own and limit.value not in defaults:
            continue
        path = ("plan", index, limit.value) if own else ("defaults", limit.value)
        value = table[limit.value] if own else defaults[limit.value]
        if limit is Limit.PEAK_MEMORY:
            bound = _memory_bound(value, path, table, defaults, where)
            if bound.gpus != setup.get("gpus", 1) and bound.gpus > 1:
                raise where.error(path, f"{bound.written!r} needs gpus = {bound.gpus} in [setup] "
                                        "(and shard = \"ddp\", \"zero1\", \"zero2\" or \"zero3\")")
            bounds.append(bound)
            continue
        if limit is Limit.TIME_PER_STEP and not setup.get("gpu"):
            raise where.error(path, 'a time limit needs the accelerator: set gpu = "h100-80gb" (or another) in [setup]')
        bounds.append(Bound(limit, _quantity(value, limit, path, where), _written(value), where.path(path)))
    if "headroom" in table and not any(b.limit is Limit.PEAK_MEMORY for b in bounds):
        raise where.error(("plan", index, "headroom"), "headroom without a peak_memory limit")
    if not bounds:
        raise where.error(("plan", index), f"plan {name!r} has no limits (none of its own, none in [defaults])")
    return PlanBudget(name=name.strip(), spec=spec.strip(), bounds=tuple(bounds))


def _plan_spec(table: dict, index: int, where: "_Locator") -> str:
    """The plan as a spec string: ``spec``, or the plan keys joined (none: "full")."""
    keys = _plan_keys(table)
    if "spec" in table:
        if keys:
            raise where.error(("plan", index, keys[0]), "give the plan as spec = \"...\" or as keys, not both")
        if not isinstance(table["spec"], str) or not table["spec"].strip():
            raise where.error(("plan", index, "spec"), 'must be a plan spec such as "lora=attn;rank=8"')
        return table["spec"].strip()
    return ";".join(f"{key.replace('_', '-')}={table[key]}" for key in keys) or "full"


def _plan_keys(table: dict) -> list[str]:
    """The plan keys a table uses, as written (``stop_grad`` or ``stop-grad``)."""
    return [key for key in table if key.replace("_", "-") in _PLAN_KEYS]


def _memory_bound(value, path: tuple, table: dict, defaults: dict, where: "_Locator") -> Bound:
    """``peak_memory``: bytes, or ``fits: GPU`` less a headroom fraction of the GPU's memory.
    A plan's headroom overrides the defaults'; headroom beside a size (not a GPU) is an error."""
    owner = table if path[0] == "plan" else defaults
    own_headroom = path[:-1] + ("headroom",) if "headroom" in table else None
    headroom_path = own_headroom or (("defaults", "headroom") if "headroom" in defaults else None)
    fits = _FITS.match(value) if isinstance(value, str) else None
    if fits is None:
        stray = own_headroom if own_headroom else (("defaults", "headroom") if "headroom" in owner else None)
        if stray:
            raise where.error(stray, 'headroom applies to peak_memory = "fits: GPU" only; a size is the limit itself')
        return Bound(Limit.PEAK_MEMORY, _quantity(value, Limit.PEAK_MEMORY, path, where), _written(value),
                     where.path(path))
    name = _gpu_name(fits.group(2), path, where)
    count = int(fits.group(1) or 1)
    if count < 1:
        raise where.error(path, "the number of GPUs in \"fits: Nx GPU\" must be positive")
    headroom = (table if own_headroom else defaults).get("headroom", 0.0)
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0.0 <= headroom < 1.0:
        raise where.error(headroom_path, f"must be a fraction in [0, 1), e.g. 0.1, got {headroom!r}")
    maximum = gpus.gpu(name).memory_bytes * (1.0 - headroom)
    written = f"fits: {f'{count}x ' if count > 1 else ''}{name}" + (f" ({headroom:.0%} headroom)" if headroom else "")
    return Bound(Limit.PEAK_MEMORY, maximum, written, where.path(path), gpu=name, gpus=count)


def _quantity(value, limit: Limit, path: tuple, where: "_Locator") -> float:
    try:
        return parse_quantity(value, limit)
    except ValueError:
        raise where.error(path, f"{value!r} is not a {limit.value.replace('_', ' ')} limit "
                                f"(write e.g. {_EXAMPLES[limit]})") from None


def _gpu_name(value, path: tuple, where: "_Locator") -> str:
    if not isinstance(value, str):
        raise where.error(path, f"expected a GPU name, got {value!r}")
    try:
        return gpus.gpu(value).name
    except CostlensError as e:
        raise where.error(path, str(e)) from None


def _check_keys(table: dict, path: tuple, where: "_Locator") -> None:
    known = _TABLE_KEYS[path[0]]
    for key in table:
        if key not in known and not (path[0] == "plan" and key.replace("_", "-") in _PLAN_KEYS):
            raise where.error((*path, key), f"unknown key (known: {', '.join(known)})")


def _written(value) -> str:
    return value.strip() if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- where in the file

_POSITION = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)\s*$")
_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_\-]+)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"^\s*[\"']?([A-Za-z0-9_\-]+)[\"']?\s*=")


def _syntax_error(error: Exception, text: str, source: str) -> BudgetError:
    message = str(getattr(error, "msg", "") or error)
    position = _POSITION.search(message)
    lines = text.splitlines()
    line = getattr(error, "lineno", None) or (int(position.group(1)) if position and position.group(1) else len(lines))
    message = _POSITION.sub("", message)
    key = _KEY.match(lines[line - 1]) if line and line <= len(lines) else None
    named = f" (key {key.group(1)!r})" if key else ""
    return BudgetError(f"{source}:{line}: not valid TOML{named}: {message}")


class _Locator:
    """Finds the line of a key path in the file's text (tomllib reports none for values)."""

    def __init__(self, text: str, source: str):
        self.lines = text.splitlines()
        self.source = source

    def path(self, path: tuple) -> str:
        table, *rest = path
        text = table
        for part in rest:
            text += f"[{part}]" if isinstance(part, int) else f".{part}"
        return text

    def line(self, path: tuple) -> int | None:
        table = path[0]
        index = path[1] if len(path) > 1 and isinstance(path[1], int) else None
        key = path[-1] if isinstance(path[-1], str) and len(path) > 1 + (index is not None) else None
        current, seen = (None, None), {}
        for number, text in enumerate(self.lines, 1):
            header = _HEADER.match(text)
            if header:
                name = header.group(2)
                array = header.group(1) == "[["
                seen[name] = seen.get(name, -1) + 1 if array else None
                current = (name, seen[name])
                if key is None and current == (table, index):
                    return number
                continue
            match = _KEY.match(text)
            if match and key is not None and current == (table, index) and match.group(1) == key:
                return number
            if match and current == (None, None) and len(path) == 1 and match.group(1) == table:
                return number
        return None

    def error(self, path: tuple | None, message: str) -> BudgetError:
        if path is None:
            return BudgetError(f"{self.source}: {message}")
        line = self.line(path)
        return BudgetError(f"{self.source}:{line if line else '?'}: {self.path(path)}: {message}")


# --------------------------------------------------------------------------- verdicts

def judge(budget: Budget, document: dict) -> tuple[Verdict, ...]:
    """Each budgeted plan of a costlens.plan/1 document against each of its limits."""
    by_name = {plan["name"]: plan for plan in document["plans"]}
    verdicts = []
    for plan_budget in budget.plans:
        plan = by_name.get(plan_budget.name)
        if plan is None:
            raise BudgetError(f"{budget.source}: plan {plan_budget.name!r} is not in the estimate "
                              f"(it has: {', '.join(by_name)})")
        for bound in plan_budget.bounds:
            value = _measure(bound.limit, plan, document, budget)
            verdicts.append(Verdict(plan_budget.name, bound.limit, bound.maximum, value, bound.written, bound.where))
    return tuple(verdicts)


def _measure(limit: Limit, plan: dict, document: dict, budget: Budget) -> float:
    if limit is Limit.TRAINABLE_PARAMS:
        return plan["params"]["trainable"]
    if limit is Limit.STEP_FLOPS:
        return plan["flops"]["step"]
    if limit is Limit.MAX_COST:
        cost = (plan.get("job") or {}).get("cost")
        if cost is None:
            raise CostlensError(f"plan {plan['name']!r}: max_cost cannot be checked: the estimate has no job cost "
                                "(plans[].job.cost; price it with --tokens, --gpu and a price)")
        return cost
    if limit is Limit.PEAK_MEMORY:
        if plan.get("parallel"):             # several ranks: the largest per-rank peak must fit
            return plan["parallel"]["per_rank_bytes"]["peak"]
        peak = (plan.get("memory_bytes") or {}).get("peak")
        if peak is None:
            raise CostlensError(f"plan {plan['name']!r}: peak_memory cannot be checked: the estimate "
                                "has no memory figures (memory_bytes.peak)")
        return peak
    seconds = (plan.get("time") or {}).get("seconds_per_step")
    if seconds is not None:
        return seconds
    # the estimate predates plans[].time: the same arithmetic from the [setup] GPU and MFU
    mfu = budget.setup.get("mfu", (document.get("setup") or {}).get("mfu", Setup.mfu))
    accelerator = gpus.gpu(str(budget.setup["gpu"]))
    precision = budget.setup.get("precision", (document.get("setup") or {}).get("precision"))
    dtype = gpus.compute_dtype(str(precision), accelerator) if precision else None   # None: the half-precision peak
    return gpus.seconds_per_step(plan["flops"]["step"], accelerator, mfu, dtype)


def _setup_origin(key: str, value: object) -> str:
    """How a derived reason names a [setup] key: ``[setup] gpu = 'h100-80gb'``."""
    return f"[setup] {key} = {value!r}"


def resolved_setup(budget: Budget, source=None, revision: str | None = None):
    """The budget's [setup] with the defaults ``source`` (the MODEL checked; None: no source)
    decides filled in, as ``costlens plan`` fills them (costlens/defaults.py): a
    defaults.SourceDefaults (its ``setup()`` and ``derived`` reasons). Keys the file sets win."""
    from costlens.defaults import source_defaults
    values = {"batch": Setup.batch, **budget.setup}
    try:
        return source_defaults(source, values, budget.setup.keys(), revision=revision, origin=_setup_origin)
    except CostlensError as e:          # e.g. a static ONNX export asked at another [setup] batch / seq
        raise BudgetError(f"{budget.source}: [setup]: {e}") from None


def derived_of(budget: Budget, source=None) -> dict[str, str]:
    """The defaults setup_of derives (from another [setup] key, or from ``source``), as the plan
    document records them."""
    return dict(resolved_setup(budget, source).derived)


def setup_of(budget: Budget, source=None) -> Setup:
    """The Setup the budget describes on ``source`` (the MODEL checked): what [setup] sets, and
    for the rest what ``costlens plan SOURCE`` would price: the optimizer steps with ``foreach``
    when a GPU is named (torch's CUDA default), the attention, loss and experts implementation
    the source runs, a static ONNX export's shape (costlens/defaults.py). Without a source, the
    source-free defaults only (Setup's, and foreach with a GPU)."""
    return resolved_setup(budget, source).setup()
