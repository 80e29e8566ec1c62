"""The cost of a whole training job: optimizer steps, GPU-hours and money, from the cost of one step.

Units: tokens are counted in tokens; seconds, hours and GPU-hours are wall-clock; money is in
whatever currency ``price_per_gpu_hour`` is in (per GPU per hour).

One estimated step is a micro-batch: ``batch`` sequences of ``seq`` tokens on one data-parallel
rank (one tensor/expert-parallel group). An optimizer step accumulates ``grad_accum`` micro-batches
on each of ``dp_ranks`` data-parallel ranks, so it consumes

    tokens_per_step = batch x seq x grad_accum x dp_ranks

and a job of ``tokens`` tokens takes ``steps = ceil(tokens / tokens_per_step)`` optimizer steps (the
last one full). Each micro-batch costs ``seconds_per_microbatch`` on one device's worth of compute
(the roofline time of the estimate; a tensor-parallel group of T ranks runs it T times faster on
T GPUs: the same GPU-seconds), hence

    gpu_hours  = steps x grad_accum x dp_ranks x seconds_per_microbatch / 3600
    wall_hours = gpu_hours / gpus
    cost       = gpu_hours x price_per_gpu_hour

Communication, data loading, evaluation and the optimizer's own kernels are not included: the
figure is the compute/memory roofline of the training steps, a lower bound at the stated MFU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from costlens.errors import PlanError

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class JobCost:
    """A training job priced from its step (units in the field comments)."""

    tokens: int                  # tokens the job trains on (dataset tokens x epochs)
    tokens_per_step: int         # tokens per optimizer step: batch x seq x grad_accum x dp_ranks
    steps: int                   # optimizer steps, ceil(tokens / tokens_per_step)
    grad_accum: int              # micro-batches accumulated per optimizer step, per rank
    gpus: int                    # GPUs the job runs on
    seconds_per_step: float | None      # wall seconds per optimizer step (None without --gpu)
    wall_hours: float | None            # wall-clock hours of the job
    gpu_hours: float | None             # GPU-hours (wall hours x gpus)
    price_per_gpu_hour: float | None    # price per GPU per hour, where one is known
    price_source: str | None            # where the price came from ("--price-per-hour", "costlens.toml [prices]")
    cost: float | None                  # gpu_hours x price_per_gpu_hour


def job_tokens(tokens: int | None, dataset_tokens: int | None, epochs: float | None) -> int | None:
    """Tokens a job trains on: ``tokens``, or ``dataset_tokens x epochs`` (rounded up); None: no job."""
    if tokens is not None and dataset_tokens is not None:
        raise PlanError("give --tokens or --dataset-tokens (with --epochs), not both")
    if epochs is not None and dataset_tokens is None:
        raise PlanError("--epochs needs --dataset-tokens N (the tokens in one pass over the data)")
    if dataset_tokens is not None:
        _positive(dataset_tokens, "--dataset-tokens")
        epochs = 1.0 if epochs is None else epochs
        if not (math.isfinite(epochs) and epochs > 0):
            raise PlanError(f"--epochs must be a positive number, got {epochs}")
        return math.ceil(dataset_tokens * epochs)
    if tokens is not None:
        _positive(tokens, "--tokens")
    return tokens


def _positive(value, what: str) -> None:
    if value <= 0:
        raise PlanError(f"{what} must be positive, got {value}")


def job_cost(tokens: int, batch: int, seq: int, seconds_per_microbatch: float | None, *, grad_accum: int = 1,
             dp_ranks: int = 1, gpus: int = 1, price_per_gpu_hour: float | None = None,
             price_source: str | None = None) -> JobCost:
    """Steps, hours and money of training on ``tokens`` tokens (see the module docstring for the
    arithmetic); ``seconds_per_microbatch`` is one estimated step's roofline time in seconds."""
    for value, what in ((tokens, "tokens"), (batch, "batch"), (seq, "seq"), (grad_accum, "--grad-accum"),
                        (dp_ranks, "data-parallel ranks"), (gpus, "--gpus")):
        _positive(value, what)
    if price_per_gpu_hour is not None and not (math.isfinite(price_per_gpu_hour) and price_per_gpu_hour >= 0):
        raise PlanError(f"--price-per-hour must be a non-negative number, got {price_per_gpu_hour}")
    tokens_per_step = batch * seq * grad_accum * dp_ranks
    steps = -(-tokens // tokens_per_step)                  # ceil without floats: exact for huge counts
    gpu_hours = wall_hours = step_seconds = cost = None
    if seconds_per_microbatch is not None:
        gpu_hours = steps * grad_accum * dp_ranks * seconds_per_microbatch / SECONDS_PER_HOUR
        wall_hours = gpu_hours / gpus
        step_seconds = wall_hours * SECONDS_PER_HOUR / steps
        cost = None if price_per_gpu_hour is None else gpu_hours * price_per_gpu_hour
    return JobCost(tokens, tokens_per_step, steps, grad_accum, gpus, step_seconds, wall_hours, gpu_hours,
                   price_per_gpu_hour, price_source if price_per_gpu_hour is not None else None, cost)


def read_price_table(path: str) -> dict[str, float]:
    """``[prices]`` of a TOML file (``h100-80gb = 2.49``: price per GPU-hour, GPU names or aliases
    as keys, resolved to table names); {} when the file has no such table."""
    import sys
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    from costlens.gpus import gpu
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle).get("prices", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PlanError(f"{path}: cannot read its [prices] table ({e})") from None
    if not isinstance(table, dict):
        raise PlanError(f"{path}: [prices] must be a table of GPU = price per hour")
    prices = {}
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise PlanError(f"{path}: [prices] {name} must be a non-negative number (per GPU-hour), got {value!r}")
        prices[gpu(name).name] = float(value)
    return prices


@dataclass(frozen=True)
class Job:
    """What a user asks to price beyond one step: tokens, accumulation and a price."""

    tokens: int                          # tokens the whole job trains on
    grad_accum: int = 1                  # micro-batches per optimizer step, per data-parallel rank
    price_per_gpu_hour: float | None = None
    price_source: str | None = None


def with_price_table(job: Job, gpu_name: str, path: str) -> Job:
    """``job`` with the price of ``gpu_name`` from the [prices] table of ``path`` when it has none
    of its own and the file exists (a missing file or GPU leaves it unpriced)."""
    import os
    from dataclasses import replace
    from costlens.gpus import gpu
    if job.price_per_gpu_hour is not None or not os.path.isfile(path):
        return job
    price = read_price_table(path).get(gpu(gpu_name).name)
    return job if price is None else replace(job, price_per_gpu_hour=price, price_source=f"{path} [prices]")


def price_job(job: Job, batch: int, seq: int, seconds_per_microbatch: float | None, gpus: int,
              dp_ranks: int) -> JobCost:
    """job_cost of a Job whose micro-batch is one estimate (``batch`` x ``seq`` tokens)."""
    return job_cost(job.tokens, batch, seq, seconds_per_microbatch, grad_accum=job.grad_accum, dp_ranks=dp_ranks,
                    gpus=gpus, price_per_gpu_hour=job.price_per_gpu_hour, price_source=job.price_source)
