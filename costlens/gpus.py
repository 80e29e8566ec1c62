"""Accelerators costlens knows: memory and dense tensor-core peak, by name.

Memory is the board's capacity in bytes. Vendors write memory capacity as "80GB" but mean
binary units (HBM and GDDR come in 2^30-byte gigabytes): an H100 80GB holds 80 GiB, of which
the driver reports 81,559 MiB usable (the rest is reserved; a budget's headroom covers it).

Peak FLOP/s is the **dense** bf16 tensor-core figure with fp32 accumulate (fp16 where the chip
has no bf16), as the vendor's datasheet prints it. Datasheets print sparse figures first ("with
sparsity", 2x); those are halved here, and each comment names the printed number.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from costlens.errors import PlanError

GiB = 2**30
TERA = 10**12


@dataclass(frozen=True)
class Gpu:
    """One accelerator: what fits in it and how fast it multiplies."""

    name: str
    memory_bytes: int        # board memory, bytes
    peak_flops: float        # dense bf16 (or fp16) tensor FLOP/s, fp32 accumulate
    note: str = ""           # what the figure is, where it is not the obvious one


_TABLE = (
    # NVIDIA H100 datasheet, SXM column: BF16 Tensor Core 1,979 TFLOPS with sparsity -> 989.5 dense.
    Gpu("h100-80gb", 80 * GiB, 989.5 * TERA, "H100 SXM5"),
    # Same datasheet, PCIe column: BF16 1,513 TFLOPS with sparsity -> 756.5 dense.
    Gpu("h100-pcie-80gb", 80 * GiB, 756.5 * TERA, "H100 PCIe"),
    # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity); 80GB and 40GB.
    Gpu("a100-80gb", 80 * GiB, 312 * TERA, "A100 SXM4 80GB"),
    Gpu("a100-40gb", 40 * GiB, 312 * TERA, "A100 SXM4 40GB"),
    # NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity -> 121 dense; 24GB GDDR6.
    Gpu("l4", 24 * GiB, 121 * TERA, "L4"),
    # NVIDIA publishes no A10G datasheet (an AWS part on GA102, 24GB); this is the A10 datasheet's
    # BF16 Tensor Core 125 TFLOPS (250 with sparsity), an upper bound for the A10G.
    Gpu("a10g", 24 * GiB, 125 * TERA, "A10G (A10 datasheet figure; upper bound)"),
    # NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: peak BF16 Tensor TFLOPS with
    # FP32 accumulate 165.2 (330.4 with sparsity); 24GB GDDR6X.
    Gpu("rtx4090", 24 * GiB, 165.2 * TERA, "GeForce RTX 4090"),
    # NVIDIA V100 datasheet, SXM2 32GB: Tensor Performance 125 TFLOPS (fp16; Volta has no bf16).
    Gpu("v100-32gb", 32 * GiB, 125 * TERA, "V100 SXM2 32GB; fp16 (no bf16 on Volta)"),
)

GPUS: Mapping[str, Gpu] = MappingProxyType({gpu.name: gpu for gpu in _TABLE})

# Short names people type; each points at exactly one table entry.
ALIASES: Mapping[str, str] = MappingProxyType({
    "h100": "h100-80gb", "h100-sxm": "h100-80gb", "h100-pcie": "h100-pcie-80gb",
    "a100": "a100-80gb", "a10": "a10g", "4090": "rtx4090", "v100": "v100-32gb",
})


def gpu(name: str) -> Gpu:
    """The accelerator called ``name`` (case and surrounding blanks ignored), or PlanError."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in GPUS:
        known = ", ".join([*GPUS, *ALIASES])
        raise PlanError(f"unknown GPU {name!r} (known: {known})")
    return GPUS[key]


def seconds_per_step(step_flops: float, accelerator: Gpu, mfu: float) -> float:
    """Seconds for one step at a model-FLOPs utilization ``mfu`` (0 < mfu <= 1) of the peak."""
    if not 0.0 < mfu <= 1.0:
        raise PlanError(f"mfu must be in (0, 1], got {mfu}")
    return step_flops / (accelerator.peak_flops * mfu)
