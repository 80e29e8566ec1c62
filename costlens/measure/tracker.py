"""Exact live tensor-storage accounting for a region of torch code (any device).

Owns ``StorageTracker`` (a ``TorchDispatchMode``), the ``Phase`` and ``MemCategory`` enums
and the ``MemoryProfile`` result.

What is counted: every untyped storage that is the output of an aten op dispatched inside
the mode, plus the storages the caller registers as pre-existing, each exactly once (views
and in-place results share their input's storage) and at its full ``nbytes()`` (a slice
keeps its whole base alive), for as long as the storage lives. Since torch preserves one
Python object per storage for the storage's whole life, a weakref callback on that object
fires exactly when the C++ storage is freed -- also when autograd, not Python, held the
last reference. This follows torch/distributed/_tools/mem_tracker.py.

What is not seen: scratch buffers a kernel allocates and frees inside one op (the mode sees
op boundaries only), allocator rounding and caching (CPU figures are logical bytes; use the
CUDA allocator's own statistics for those), and tensors made outside the mode that were
never registered -- those are reported (``untracked_input_bytes``) when an op reads them.
The peak is exact at op granularity: memory only grows at an op's outputs, and every free is
booked before the next op runs.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class Phase(str, Enum):
    """The part of a training step the tracked code is in, as the caller names it: a peak is reported
    with its phase, and a storage's category follows from the phase it was made in."""

    OTHER = "other"               # outside any phase the caller named
    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"
    ZERO_GRAD = "zero_grad"


class MemCategory(str, Enum):
    """What a live storage's bytes are for, the categories the estimate's memory is split into."""

    WEIGHTS = "weights"           # parameters (and buffers), registered by the caller
    GRADIENTS = "gradients"       # .grad of parameters
    OPTIMIZER = "optimizer"       # optimizer state (moments, momentum buffers, step counters)
    ACTIVATIONS = "activations"   # made in the forward or loss phase and not classified otherwise
    TEMPORARIES = "temporaries"   # made in any other phase and not classified otherwise


_FORWARD_PHASES = frozenset({Phase.FORWARD, Phase.LOSS})
# torch.tensor(...) builds its data outside the dispatcher and hands it to lift_fresh: the
# input of these ops is a fresh tensor, not an untracked pre-existing one.
_LIFT_OPS = frozenset({torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default})


@dataclass(frozen=True)
class MemoryProfile:
    """Live tensor-storage bytes over a tracked region; every figure in bytes."""

    peak_bytes: int                                # most bytes live at once, baseline included
    peak_phase: Phase                              # phase in which the peak was first reached
    by_category_at_peak: dict[MemCategory, int]    # sums to peak_bytes
    baseline_bytes: int                            # live when the region began
    final_bytes: int                               # live when the region ended
    peak_bytes_by_phase: dict[Phase, int]          # each phase entered: most bytes live while in it
    by_category_at_phase_peak: dict[Phase, dict[MemCategory, int]]
    untracked_input_bytes: int                     # storages ops read that were neither made nor registered
    n_untracked_inputs: int
    n_unsupported_tensors: int                     # non-strided outputs (sparse, mkldnn): not counted


@dataclass
class _Storage:
    nbytes: int
    category: MemCategory
    watcher: weakref.ref | None = None   # kept alive so that its callback books the free


def storages_of(tensor: torch.Tensor) -> list[torch.UntypedStorage] | None:
    """The untyped storages behind a tensor (several for wrapper subclasses); None if it has
    no countable storage (sparse, mkldnn); [] on the meta device (no memory)."""
    if is_traceable_wrapper_subclass(tensor):
        inner_names, _ = tensor.__tensor_flatten__()
        inner = [getattr(tensor, name) for name in inner_names]
        found = [storages_of(t) for t in inner if isinstance(t, torch.Tensor)]
        return None if any(f is None for f in found) else [st for f in found for st in f]
    if tensor.layout != torch.strided:
        return None
    return [] if tensor.device.type == "meta" else [tensor.untyped_storage()]


class StorageTracker(TorchDispatchMode):
    """Use as ``with tracker:``; name phases with ``with tracker.phase("backward"):``;
    register pre-existing tensors before entering; read ``profile()`` afterwards."""

    def __init__(self, device_type: str | None = None) -> None:
        """``device_type`` ("cpu", "cuda"): count only storages there; None counts every device."""
        super().__init__()
        self._device_type = device_type
        self._serials = WeakIdKeyDictionary()        # storage -> serial; an entry dies with its storage
        self._records: dict[int, _Storage] = {}      # serial -> record, kept after death (for categories)
        self._live: dict[int, int] = {}              # serial -> nbytes of every storage alive now
        self._live_bytes = 0
        self._phase = Phase.OTHER
        self._phase_peak: dict[Phase, int] = {}
        self._phase_snapshot: dict[Phase, dict[int, int]] = {}
        self._unsnapped: Phase | None = None         # phase whose newest peak has no snapshot yet
        self._peak_bytes, self._peak_phase = -1, Phase.OTHER
        self._baseline_bytes = self._final_bytes = None
        self._untracked = WeakIdKeyDictionary()      # storages already reported as untracked
        self._untracked_bytes = self._n_untracked = self._n_unsupported = 0

    @property
    def live_bytes(self) -> int:
        """Bytes of all tracked storages alive now."""
        return self._live_bytes

    # ----------------------------------------------------------------- caller API

    def register_existing(self, tensors: Iterable[torch.Tensor], category: MemCategory | str) -> None:
        """Count storages made before the region (parameters, grads, optimizer state)."""
        category = MemCategory(category)
        for tensor in tensors:
            for storage in self._storages(tensor) or ():
                self._track(storage, category).category = category

    def classify(self, tensors: Iterable[torch.Tensor], category: MemCategory | str) -> None:
        """Re-tag the storages of tensors still alive (e.g. ``optimizer.state`` after the step).
        Retroactive: categories are read when the profile is made, so the peak snapshots use it."""
        category = MemCategory(category)
        for tensor in tensors:
            for storage in self._storages(tensor) or ():
                serial = self._serials.get(storage)
                if serial is not None:
                    self._records[serial].category = category

    @contextmanager
    def phase(self, phase: Phase | str) -> Iterator[StorageTracker]:
        previous = self._phase
        self._switch_phase(Phase(phase))
        try:
            yield self
        finally:
            self._switch_phase(previous)

    def profile(self) -> MemoryProfile:
        self._snapshot_pending()
        final = self._final_bytes if self._final_bytes is not None else self._live_bytes
        return MemoryProfile(
            peak_bytes=self._peak_bytes, peak_phase=self._peak_phase,
            by_category_at_peak=self._categorize(self._phase_snapshot.get(self._peak_phase, {})),
            baseline_bytes=self._baseline_bytes or 0, final_bytes=final,
            peak_bytes_by_phase=dict(self._phase_peak),
            by_category_at_phase_peak={p: self._categorize(s) for p, s in self._phase_snapshot.items()},
            untracked_input_bytes=self._untracked_bytes, n_untracked_inputs=self._n_untracked,
            n_unsupported_tensors=self._n_unsupported)

    # ----------------------------------------------------------------- the mode

    def __enter__(self) -> StorageTracker:
        self._baseline_bytes = self._live_bytes
        self._bump_peak()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        self._final_bytes = self._live_bytes
        self._snapshot_pending()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _LIFT_OPS:
            self._note_untracked(tree_leaves((args, kwargs)))
        out = func(*args, **kwargs)
        default = MemCategory.ACTIVATIONS if self._phase in _FORWARD_PHASES else MemCategory.TEMPORARIES
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track_output(leaf, default)
        return out

    # ----------------------------------------------------------------- bookkeeping

    def _storages(self, tensor: torch.Tensor) -> list[torch.UntypedStorage] | None:
        if self._device_type is not None and tensor.device.type != self._device_type:
            return []
        return storages_of(tensor)

    def _track_output(self, tensor: torch.Tensor, category: MemCategory) -> None:
        storages = self._storages(tensor)
        if storages is None:
            self._n_unsupported += 1
            return
        for storage in storages:
            if storage not in self._untracked:   # an in-place result on an untracked input
                self._track(storage, category)

    def _track(self, storage: torch.UntypedStorage, category: MemCategory) -> _Storage:
        serial = self._serials.get(storage)
        if serial is not None:                    # a view or an in-place result: same storage
            self._resize(serial, storage.nbytes())
            return self._records[serial]
        serial = len(self._records)               # serials are never reused, unlike id()
        record = _Storage(storage.nbytes(), category)
        record.watcher = weakref.ref(storage, partial(self._on_free, serial))
        self._serials[storage] = serial
        self._records[serial] = record
        self._live[serial] = record.nbytes
        self._live_bytes += record.nbytes
        self._bump_peak()
        return record

    def _resize(self, serial: int, nbytes: int) -> None:
        # resize_ (or an out= op) grows or shrinks a storage in place
        old = self._live.get(serial)
        if old is None or old == nbytes:
            return
        if nbytes < old:
            self._snapshot_pending()
        self._live[serial] = self._records[serial].nbytes = nbytes
        self._live_bytes += nbytes - old
        self._bump_peak()

    def _on_free(self, serial: int, _ref: weakref.ref) -> None:
        if serial not in self._live:
            return
        self._snapshot_pending()                  # a free ends a rise: keep the live set at the peak
        self._live_bytes -= self._live.pop(serial)

    def _note_untracked(self, leaves: list) -> None:
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                continue
            for storage in self._storages(leaf) or ():
                if storage not in self._serials and storage not in self._untracked:
                    self._untracked[storage] = True
                    self._untracked_bytes += storage.nbytes()
                    self._n_untracked += 1

    def _switch_phase(self, phase: Phase) -> None:
        # the pending snapshot belongs to the old phase; memory held on entry counts for the new one
        self._snapshot_pending()
        self._phase = phase
        self._bump_peak()

    def _bump_peak(self) -> None:
        if self._live_bytes > self._phase_peak.get(self._phase, -1):
            self._phase_peak[self._phase] = self._live_bytes
            self._unsnapped = self._phase         # copied lazily: only when something is freed
        if self._live_bytes > self._peak_bytes:
            self._peak_bytes, self._peak_phase = self._live_bytes, self._phase

    def _snapshot_pending(self) -> None:
        if self._unsnapped is not None:
            self._phase_snapshot[self._unsnapped] = dict(self._live)
            self._unsnapped = None

    def _categorize(self, live: dict[int, int]) -> dict[MemCategory, int]:
        totals = dict.fromkeys(MemCategory, 0)
        for serial, nbytes in live.items():
            totals[self._records[serial].category] += nbytes
        return totals
