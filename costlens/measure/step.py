"""One steady-state training step of a torch module, measured.

Owns ``measure_step`` and its ``StepMeasurement`` result. The step is the one costlens
estimates: ``zero_grad(set_to_none=True)``, forward on random ``input_ids`` [batch, seq],
cross-entropy over the vocabulary against the same ids, backward, ``optimizer.step()``.
Two steps run; the second is reported, because the first creates the optimizer state
lazily (DESIGN 2.8). Memory comes from ``StorageTracker`` (exact live storage bytes, any
device) and, on CUDA, also from the caching allocator's peak statistics. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` around the first step's forward, loss and
backward: FLOPs depend on shapes only (MoE: every token still reaches exactly top-k
experts), and counting them in the warm-up step keeps the measured step free of a second
dispatch mode. The optimizer step has no FLOP formula there (pointwise ops), so it adds none.
"""
from __future__ import annotations

import gc
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from costlens.errors import PlanError
from costlens.measure.tracker import MemCategory, MemoryProfile, Phase, StorageTracker, storages_of

OPTIMIZERS = ("adamw", "sgd", "sgd-momentum")
OPTIMIZER_IMPLS = ("for-loop", "foreach")
SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class AllocatorPeak:
    """CUDA caching-allocator figures of the measured step, in bytes (``memory_allocated``:
    block-rounded, includes every tensor of the process on that device)."""

    peak_bytes: int                        # max_memory_allocated over the step
    baseline_bytes: int                    # memory_allocated when the step began
    peak_phase: Phase
    peak_bytes_by_phase: dict[Phase, int]

    @property
    def above_baseline_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes


@dataclass(frozen=True)
class StepMeasurement:
    """The second (steady-state) training step; bytes, FLOPs (2 per multiply-add), counts."""

    device: str
    batch: int
    seq: int
    optimizer: str
    optimizer_impl: str
    memory: MemoryProfile                  # exact live storages; categories at the peak
    allocator: AllocatorPeak | None        # CUDA only
    n_params: int                          # every parameter, shared ones once
    n_trainable_params: int
    weights_bytes: int                     # storages of all parameters and buffers
    gradient_bytes: int                    # storages of the trainable parameters' .grad
    optimizer_state_bytes: int             # storages in optimizer.state (moments, buffers, step counters)
    saved_activation_bytes: int            # live after forward+loss minus live before forward
    forward_flops: int                     # forward and cross-entropy
    total_flops: int                       # forward + backward

    @property
    def backward_flops(self) -> int:
        return self.total_flops - self.forward_flops

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def peak_phase(self) -> Phase:
        return self.memory.peak_phase

    @property
    def by_category_at_peak(self) -> dict[MemCategory, int]:
        return self.memory.by_category_at_peak


def measure_step(module: torch.nn.Module, batch: int, seq: int, vocab: int, optimizer: str = "adamw",
                 optimizer_impl: str = "for-loop", lr: float = 1e-3, device: str = "cpu", seed: int = 0,
                 keep_logits: bool = False) -> StepMeasurement:
    """Train ``module`` for two steps and measure the second: bytes, FLOPs (2 per
    multiply-add), parameter counts. The module is moved to ``device`` and its weights change.

    Only parameters with ``requires_grad`` go to the optimizer. ``keep_logits``: hold the
    logits until the step ends, as a loop that keeps the model output does; by default only
    the loss is kept, so what stays alive after the loss is what autograd saved for backward.
    """
    _check_choices(optimizer, optimizer_impl, device)
    module = module.to(device)
    trainable = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, optimizer, optimizer_impl, lr)
    ids = torch.Generator().manual_seed(seed)   # one stream, so the two steps see different batches
    forward_flops, total_flops = _warmup_step(module, opt, ids, batch, seq, vocab, device)

    tracker = _tracker_with_state(module, opt, torch.device(device).type)
    watch = _AllocatorWatch(device) if device.startswith("cuda") else None
    with _gc_paused(), tracker:
        if watch:
            watch.start()
        saved_bytes = _measured_step(module, opt, ids, batch, seq, vocab, device, tracker, watch, keep_logits)
    tracker.classify(_grads(trainable), MemCategory.GRADIENTS)
    tracker.classify(_state_tensors(opt), MemCategory.OPTIMIZER)
    return StepMeasurement(
        device=device, batch=batch, seq=seq, optimizer=optimizer, optimizer_impl=optimizer_impl,
        memory=tracker.profile(), allocator=watch.result() if watch else None,
        n_params=sum(p.numel() for p in module.parameters()), n_trainable_params=sum(p.numel() for p in trainable),
        weights_bytes=storage_bytes([*module.parameters(), *module.buffers()]),
        gradient_bytes=storage_bytes(_grads(trainable)), optimizer_state_bytes=storage_bytes(_state_tensors(opt)),
        saved_activation_bytes=saved_bytes, forward_flops=forward_flops, total_flops=total_flops)


def make_optimizer(params: list[torch.nn.Parameter], name: str, impl: str, lr: float) -> torch.optim.Optimizer:
    foreach = impl == "foreach"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=foreach)
    momentum = SGD_MOMENTUM if name == "sgd-momentum" else 0.0
    return torch.optim.SGD(params, lr=lr, momentum=momentum, foreach=foreach)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared or tied ones once)."""
    seen = {}
    for tensor in tensors:
        for storage in storages_of(tensor) or ():
            seen[id(storage)] = storage.nbytes()   # storages stay alive (held by tensors) meanwhile
    return sum(seen.values())


# --------------------------------------------------------------------------- the two steps

def _warmup_step(module, opt, ids, batch, seq, vocab, device) -> tuple[int, int]:
    """Step 1: creates optimizer state (and CUDA workspaces); returns (forward, total) FLOPs."""
    opt.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        input_ids = _input_ids(ids, batch, seq, vocab, device)
        loss = _loss(module(input_ids), input_ids, vocab)
        forward_flops = counter.get_total_flops()
        loss.backward()
    opt.step()
    return forward_flops, counter.get_total_flops()


def _measured_step(module, opt, ids, batch, seq, vocab, device, tracker, watch, keep_logits) -> int:
    """Step 2 under the tracker; returns the bytes forward+loss left alive."""
    phase = partial(_phase, tracker, watch)
    with phase(Phase.ZERO_GRAD):
        opt.zero_grad(set_to_none=True)
    before_forward = tracker.live_bytes
    with phase(Phase.FORWARD):
        input_ids = _input_ids(ids, batch, seq, vocab, device)   # the embedding saves them for backward
        logits = module(input_ids)
    with phase(Phase.LOSS):
        loss = _loss(logits, input_ids, vocab)
        if not keep_logits:
            del logits
        del input_ids                   # autograd still holds them where backward needs them
        saved_bytes = tracker.live_bytes - before_forward
    with phase(Phase.BACKWARD):
        loss.backward()
    del loss
    with phase(Phase.OPTIMIZER):
        opt.step()
    return saved_bytes


def _loss(logits: torch.Tensor, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    # [b, s, V] -> [b*s, V] against the ids themselves (as tests/torch_plans.step_flops does)
    return F.cross_entropy(logits.reshape(-1, vocab), input_ids.reshape(-1))


def _input_ids(generator, batch, seq, vocab, device) -> torch.Tensor:
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return ids if device == "cpu" else ids.to(device)


# --------------------------------------------------------------------------- state and helpers

def _tracker_with_state(module, opt, device_type: str) -> StorageTracker:
    tracker = StorageTracker(device_type)
    tracker.register_existing([*module.parameters(), *module.buffers()], MemCategory.WEIGHTS)
    tracker.register_existing(_grads(module.parameters()), MemCategory.GRADIENTS)
    tracker.register_existing(_state_tensors(opt), MemCategory.OPTIMIZER)
    return tracker


def _grads(params) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


@contextmanager
def _gc_paused() -> Iterator[None]:
    # Storages held only by reference cycles die whenever the cyclic collector happens to
    # run; collecting first and pausing it makes the measured peak repeatable.
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def _phase(tracker: StorageTracker, watch: _AllocatorWatch | None, phase: Phase) -> Iterator[None]:
    with ExitStack() as stack:
        stack.enter_context(tracker.phase(phase))
        if watch:
            stack.enter_context(watch.phase(phase))
        yield


def _check_choices(optimizer: str, impl: str, device: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise PlanError(f"measure: unknown optimizer {optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if impl not in OPTIMIZER_IMPLS:
        raise PlanError(f"measure: unknown optimizer implementation {impl!r} "
                            f"(choose from {', '.join(OPTIMIZER_IMPLS)})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PlanError("measure: device 'cuda' asked for, but torch sees no CUDA device")


class _AllocatorWatch:
    """Per-phase peaks of the CUDA caching allocator: the peak counter is reset as each phase
    begins and read as it ends (after a synchronize, so queued kernels have allocated)."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.baseline_bytes = 0
        self.peaks: dict[Phase, int] = {}

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        self.baseline_bytes = torch.cuda.memory_allocated(self.device)

    @contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        torch.cuda.synchronize(self.device)
        self.peaks[phase] = max(self.peaks.get(phase, 0), torch.cuda.max_memory_allocated(self.device))

    def result(self) -> AllocatorPeak:
        phase = max(self.peaks, key=self.peaks.get)
        return AllocatorPeak(peak_bytes=self.peaks[phase], baseline_bytes=self.baseline_bytes,
                             peak_phase=phase, peak_bytes_by_phase=dict(self.peaks))
