"""Bytes of optimizer state per trainable parameter, and the optimizer step's temporaries.

AdamW keeps two moments (exp_avg, exp_avg_sq) shaped like the parameter, plus a 0-d ``step``
tensor per parameter tensor (float32, as torch.optim keeps it). SGD with momentum keeps one
buffer; plain SGD none. 8-bit AdamW (bitsandbytes 0.50 ``AdamW8bit``, blockwise) keeps two
uint8 moments plus one fp32 absmax per 256-element block each for a tensor of at least 4,096
elements (``min_8bit_size``), and two fp32 moments for a smaller one; its step counter is a
Python int (no tensor); the two 256-entry fp32 quantization maps are one pair per optimizer,
shared by every tensor (``shared_state_bytes``). Adafactor (torch.optim.Adafactor) keeps a row and a
column second-moment vector per matrix and a full one per vector, no first moment.
Mixed precision adds an fp32 master copy of each trainable parameter.
"""
from __future__ import annotations

from math import ceil

FP32 = 4
BLOCK_8BIT = 256            # bitsandbytes' blockwise optimizer state: one absmax per 256 elements
MIN_8BIT_SIZE = 4096        # AdamW8bit's min_8bit_size: smaller tensors keep fp32 moments
QMAP_BYTES = 2 * 256 * FP32  # the signed and unsigned 8-bit dynamic maps (qmap1, qmap2), fp32


def state_bytes(optimizer: str, shape: tuple[int, ...], state_dtype_bytes: int) -> int:
    """Optimizer state of one parameter tensor of ``shape``."""
    n = 1
    for dim in shape:
        n *= dim
    if optimizer == "adamw":
        return 2 * n * state_dtype_bytes + FP32
    if optimizer == "adamw-8bit":
        if n < MIN_8BIT_SIZE:
            return 2 * n * FP32
        return 2 * (n + ceil(n / BLOCK_8BIT) * FP32)
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


def shared_state_bytes(optimizer: str, shapes: list[tuple[int, ...]]) -> int:
    """Optimizer state held once per optimizer, not per tensor: AdamW8bit's two quantization maps,
    present as soon as one tensor keeps 8-bit moments."""
    if optimizer != "adamw-8bit":
        return 0
    return QMAP_BYTES if any(_numel(shape) >= MIN_8BIT_SIZE for shape in shapes) else 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def step_temporaries(optimizer: str, impl: str, trainable_shapes: list[tuple[int, ...]], dtype_bytes: int) -> int:
    """Peak extra bytes inside optimizer.step(), for parameters in the order the optimizer
    visits them.

    The for-loop AdamW builds ``exp_avg_sq.sqrt()`` and its quotient (two temporaries of the
    parameter's size) while the previous parameter's ``denom`` is still bound; the foreach form
    builds the sqrt list for every parameter at once (one copy of all trainable parameters).
    SGD steps in place, and so does AdamW8bit: one bitsandbytes kernel per tensor updates the
    moments and the parameter (its CPU fallback's fp32 scratch lives inside that one op)."""
    if optimizer in ("sgd", "sgd-momentum", "adamw-8bit") or not trainable_shapes:
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
