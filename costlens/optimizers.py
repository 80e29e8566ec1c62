"""Bytes of optimizer state per trainable parameter, and the optimizer step's temporaries.

AdamW keeps two moments (exp_avg, exp_avg_sq) shaped like the parameter, plus a 0-d ``step``
tensor per parameter tensor (float32, as torch.optim keeps it). SGD with momentum keeps one
buffer; plain SGD none. 8-bit Adam (bitsandbytes) keeps two 1-byte moments plus one fp32
absmax per 2048-element block each. Adafactor (torch.optim.Adafactor) keeps a row and a
column second-moment vector per matrix and a full one per vector, no first moment.
Mixed precision adds an fp32 master copy of each trainable parameter.
"""
from __future__ import annotations

from math import ceil

FP32 = 4
BLOCK_8BIT = 2048


def state_bytes(optimizer: str, shape: tuple[int, ...], state_dtype_bytes: int) -> int:
    """Optimizer state of one parameter tensor of ``shape``."""
    n = 1
    for dim in shape:
        n *= dim
    if optimizer == "adamw":
        return 2 * n * state_dtype_bytes + FP32
    if optimizer == "adamw-8bit":
        return 2 * (n + ceil(n / BLOCK_8BIT) * FP32) + FP32
    if optimizer == "sgd":
        return 0
    if optimizer == "sgd-momentum":
        return n * state_dtype_bytes
    if optimizer == "adafactor":
        if len(shape) >= 2:
            rows = n // shape[-1]
            cols = n // shape[-2]
            return (rows + cols) * FP32 + FP32
        return n * FP32 + FP32
    raise ValueError(f"unknown optimizer {optimizer!r}")


def step_temporaries(optimizer: str, impl: str, trainable_shapes: list[tuple[int, ...]], dtype_bytes: int) -> int:
    """Peak extra bytes inside optimizer.step(), for parameters in the order the optimizer
    visits them.

    The for-loop AdamW builds ``exp_avg_sq.sqrt()`` and its quotient (two temporaries of the
    parameter's size) while the previous parameter's ``denom`` is still bound; the foreach form
    builds the sqrt list for every parameter at once (one copy of all trainable parameters).
    SGD steps in place."""
    if optimizer in ("sgd", "sgd-momentum") or not trainable_shapes:
        return 0
    sizes = []
    for shape in trainable_shapes:
        n = 1
        for dim in shape:
            n *= dim
        sizes.append(n * dtype_bytes)
    if impl == "foreach":
        return sum(sizes)
    return max(2 * size + (sizes[i - 1] if i else 0) for i, size in enumerate(sizes))
