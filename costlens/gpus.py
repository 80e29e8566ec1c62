"""Accelerators costlens knows: memory, dense peak FLOP/s per dtype and memory bandwidth, by name;
and the time of one step on one of them (a compute / memory-bandwidth roofline).

Memory is the board's capacity in bytes. Vendors write memory capacity as "80GB" but mean
binary units (HBM and GDDR come in 2^30-byte gigabytes): an H100 80GB holds 80 GiB, of which
the driver reports 81,559 MiB usable (the rest is reserved; a budget's headroom covers it).

Peaks are **dense** FLOP/s as the vendor's datasheet prints them. Datasheets print tensor-core
figures "with sparsity" (2x) first; those are halved here, and each comment names the printed
numbers. ``None`` means the chip has no such unit (Ampere has no fp8, Volta no bf16 or tf32).
Bandwidth is the datasheet's memory bandwidth in bytes/s (decimal: 3.35 TB/s = 3.35e12 B/s).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Mapping

from costlens.errors import PlanError

GiB = 2**30
TERA = 10**12
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")


@dataclass(frozen=True)
class Gpu:
    """One accelerator: what fits in it and how fast it multiplies and reads memory."""

    name: str
    memory_bytes: int            # board memory, bytes
    peak_flops: float            # dense bf16 (fp16 where no bf16) tensor FLOP/s, fp32 accumulate
    note: str = ""               # what the figures are, where not the obvious ones
    fp32_flops: float | None = None   # dense fp32 (CUDA cores, no tensor cores) FLOP/s
    tf32_flops: float | None = None   # dense tf32 tensor FLOP/s
    fp16_flops: float | None = None   # dense fp16 tensor FLOP/s, fp32 accumulate
    fp8_flops: float | None = None    # dense fp8 tensor FLOP/s
    bandwidth: float | None = None    # memory bandwidth, bytes/s
    custom: bool = False              # defined in a budget file, not the built-in table
    has_bf16: bool = True             # False: peak_flops is the fp16 figure (Volta)

    def peak(self, dtype: str) -> float | None:
        """Dense FLOP/s of ``dtype`` (one of DTYPES), or None where the chip has no such unit."""
        return {"fp32": self.fp32_flops, "tf32": self.tf32_flops, "bf16": self.peak_flops if self.has_bf16 else None,
                "fp16": self.fp16_flops, "fp8": self.fp8_flops}[dtype]


def _tflops(value: float | None) -> float | None:
    return None if value is None else value * TERA


def _board(name, memory_gib, bf16, note, fp32, tf32, fp16, fp8, bandwidth_tb_s) -> Gpu:
    """An entry in datasheet units: GiB, dense TFLOP/s, TB/s (bf16 None: no bf16 unit)."""
    return Gpu(name, memory_gib * GiB, (bf16 or fp16) * TERA, note, _tflops(fp32), _tflops(tf32),
               _tflops(fp16), _tflops(fp8), bandwidth_tb_s * TERA, has_bf16=bf16 is not None)


_TABLE = (
    # NVIDIA H100 datasheet, SXM column: FP32 67 TFLOPS; TF32 989, BF16 1,979, FP16 1,979, FP8 3,958
    # TFLOPS with sparsity -> 494.5 / 989.5 / 989.5 / 1,979 dense; GPU memory bandwidth 3.35 TB/s.
    _board("h100-80gb", 80, 989.5, "H100 SXM5", 67, 494.5, 989.5, 1979, 3.35),
    # Same datasheet, PCIe column: FP32 51; TF32 756, BF16 1,513, FP8 3,026 with sparsity; 2 TB/s.
    _board("h100-pcie-80gb", 80, 756.5, "H100 PCIe", 51, 378, 756.5, 1513, 2.0),
    # NVIDIA A100 datasheet: FP32 19.5; TF32 156, BF16 312, FP16 312 dense (x2 with sparsity); no FP8;
    # bandwidth 2,039 GB/s (80GB SXM) and 1,555 GB/s (40GB).
    _board("a100-80gb", 80, 312, "A100 SXM4 80GB", 19.5, 156, 312, None, 2.039),
    _board("a100-40gb", 40, 312, "A100 SXM4 40GB", 19.5, 156, 312, None, 1.555),
    # NVIDIA L4 datasheet: FP32 30.3; TF32 120, BF16 242, FP16 242, FP8 485 with sparsity; 300 GB/s.
    _board("l4", 24, 121, "L4", 30.3, 60, 121, 242.5, 0.300),
    # NVIDIA publishes no A10G datasheet (an AWS part on GA102, 24GB); these are the A10 datasheet's
    # FP32 31.2; TF32 62.5, BF16 125, FP16 125 dense (x2 with sparsity); 600 GB/s: an upper bound.
    _board("a10g", 24, 125, "A10G (A10 datasheet figures; upper bound)", 31.2, 62.5, 125, None, 0.600),
    # NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: FP32 82.6; peak TF32 Tensor 82.6,
    # BF16 and FP16 with FP32 accumulate 165.2, FP8 with FP32 accumulate 330.3 (each x2 with sparsity);
    # 1,008 GB/s GDDR6X.
    _board("rtx4090", 24, 165.2, "GeForce RTX 4090", 82.6, 82.6, 165.2, 330.3, 1.008),
    # NVIDIA V100 datasheet, SXM2 32GB: single precision 15.7 TFLOPS, Tensor Performance 125 (fp16);
    # Volta has no bf16, tf32 or fp8 units; 900 GB/s.
    _board("v100-32gb", 32, None, "V100 SXM2 32GB (no bf16 on Volta)", 15.7, None, 125, None, 0.900),
)

GPUS: Mapping[str, Gpu] = MappingProxyType({gpu.name: gpu for gpu in _TABLE})

# Short names people type; each points at exactly one table entry.
ALIASES: Mapping[str, str] = MappingProxyType({
    "h100": "h100-80gb", "h100-sxm": "h100-80gb", "h100-pcie": "h100-pcie-80gb",
    "a100": "a100-80gb", "a10": "a10g", "4090": "rtx4090", "v100": "v100-32gb",
})

_CUSTOM: dict[str, Gpu] = {}     # entries a budget file added ([gpu.NAME] tables), see register


def register(entry: Gpu) -> Gpu:
    """Add a custom accelerator (from a budget file); a built-in name cannot be redefined."""
    key = entry.name.strip().lower()
    if key in GPUS or key in ALIASES:
        raise PlanError(f"custom GPU {entry.name!r}: the name is a built-in accelerator; choose another")
    _CUSTOM[key] = replace(entry, name=key, custom=True)
    return _CUSTOM[key]


def gpu(name: str) -> Gpu:
    """The accelerator called ``name`` (case and surrounding blanks ignored), or PlanError."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in _CUSTOM:
        return _CUSTOM[key]
    if key not in GPUS:
        names = ", ".join([*GPUS, *ALIASES, *_CUSTOM])
        raise PlanError(f"unknown GPU {name!r} (known: {names}; `costlens gpus` lists them)")
    return GPUS[key]


# The matmul dtype each precision runs at. fp32 runs at the fp32 (CUDA-core) peak: torch's default
# float32 matmul precision is "highest" (torch.backends.cuda.matmul.allow_tf32 is False), so TF32
# tensor cores are used only when a script opts in; autocast and half weights run the matmuls in bf16/fp16.
PRECISION_DTYPE = {"fp32": "fp32", "bf16-autocast": "bf16", "bf16": "bf16", "bf16-mixed": "bf16",
                   "fp16-autocast": "fp16", "fp16-mixed": "fp16"}


def compute_dtype(precision: str, accelerator: Gpu) -> str:
    """The dtype whose peak prices a step at ``precision``: its matmul dtype, or fp32 where the chip
    has no unit for it (bf16 on Volta runs without tensor cores)."""
    dtype = PRECISION_DTYPE.get(precision, "bf16")
    # a custom entry may lack a figure: the next one it has (the output names the dtype used)
    return next((d for d in (dtype, "fp32", "bf16", "fp16") if accelerator.peak(d)), "bf16")


@dataclass(frozen=True)
class StepTime:
    """Seconds of one step on one accelerator: max(compute time, memory time) (a roofline)."""

    gpu: str
    peak_flops: float            # FLOP/s of the dtype the step's matmuls run in
    mfu: float                   # model-FLOPs utilization assumed for the compute term
    seconds_per_step: float      # max(compute_seconds, memory_seconds)
    dtype: str = "bf16"          # which peak: fp32 | tf32 | bf16 | fp16 | fp8
    compute_seconds: float = 0.0     # step FLOPs / (peak x mfu)
    memory_seconds: float = 0.0      # traffic bytes / bandwidth (0 when the bandwidth is unknown)
    traffic_bytes: int = 0           # lower bound of the bytes the step moves through memory
    bound: str = "compute"           # "compute" or "memory": which term sets the time


def time_step(step_flops: float, traffic_bytes: int, accelerator: Gpu, precision: str, mfu: float) -> StepTime:
    """The roofline time of a step of ``step_flops`` FLOPs moving ``traffic_bytes`` bytes, in seconds."""
    dtype = compute_dtype(precision, accelerator)
    compute = seconds_per_step(step_flops, accelerator, mfu, dtype)
    memory = traffic_bytes / accelerator.bandwidth if accelerator.bandwidth else 0.0
    return StepTime(accelerator.name, accelerator.peak(dtype), mfu, max(compute, memory), dtype, compute, memory,
                    int(traffic_bytes), "memory" if memory > compute else "compute")


def step_traffic_bytes(weights: int, gradients: int, optimizer: int, activations: int) -> int:
    """A lower bound of the bytes one step moves through device memory: every weight read in forward
    and again in backward, every gradient written then read by the optimizer, the optimizer state
    (and master copy) read and written, every saved activation written in forward and read in backward.
    Kernels re-read tiles and transients, so real traffic is higher: this bounds time from below."""
    return 2 * (weights + gradients + optimizer + activations)


def seconds_per_step(step_flops: float, accelerator: Gpu, mfu: float, dtype: str | None = None) -> float:
    """Seconds for ``step_flops`` at a model-FLOPs utilization ``mfu`` (0 < mfu <= 1) of the
    ``dtype`` peak (the compute term of the roofline; None: the half-precision tensor peak)."""
    if not 0.0 < mfu <= 1.0:
        raise PlanError(f"mfu must be in (0, 1], got {mfu}")
    peak = accelerator.peak_flops if dtype is None else accelerator.peak(dtype)
    if not peak:
        raise PlanError(f"GPU {accelerator.name!r} has no {dtype} peak")
    return step_flops / (peak * mfu)


def table_document(custom: tuple[Gpu, ...] = ()) -> dict:
    """The costlens.gpus/1 document: the built-in accelerators and ``custom`` ones (a budget file's),
    memory in bytes, peaks in FLOP/s, bandwidth in B/s."""
    return {"schema": "costlens.gpus/1",
            "aliases": dict(ALIASES),
            "gpus": [{"name": g.name, "memory_bytes": g.memory_bytes, "note": g.note, "custom": g.custom,
                      "peak_flops": {dtype: g.peak(dtype) for dtype in DTYPES},
                      "bandwidth_bytes_per_s": g.bandwidth} for g in (*GPUS.values(), *custom)]}
