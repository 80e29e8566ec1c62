"""Bytes each collective carried on this rank, counted by a dispatch mode.

c10d ops (``c10d::allreduce_``, ``c10d::_allgather_base_``, ``c10d::_reduce_scatter_base_``,
``c10d::broadcast_``, their list and coalesced forms: what DDP's reducer, FSDP2 and
``torch.distributed`` calls dispatch) and functional collectives (``_c10d_functional::*``: what
DTensor redistributions dispatch). A figure is the full buffer of the collective: an all-reduce's
tensor, an all-gather's gathered output, a reduce-scatter's unreduced input, a broadcast's tensor.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# op name -> (collective, index of the argument whose bytes are the full buffer, scale by group size)
_C10D = {
    "c10d::allreduce_": ("all_reduce", 0), "c10d::allreduce_coalesced_": ("all_reduce", 0),
    "c10d::allgather_": ("all_gather", 0), "c10d::_allgather_base_": ("all_gather", 0),
    "c10d::allgather_coalesced_": ("all_gather", 0), "c10d::allgather_into_tensor_coalesced_": ("all_gather", 0),
    "c10d::reduce_scatter_": ("reduce_scatter", 1), "c10d::_reduce_scatter_base_": ("reduce_scatter", 1),
    "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "c10d::broadcast_": ("broadcast", 0),
}
_FUNCTIONAL = {
    "_c10d_functional::all_reduce": "all_reduce", "_c10d_functional::all_reduce_": "all_reduce",
    "_c10d_functional::all_reduce_coalesced": "all_reduce", "_c10d_functional::all_reduce_coalesced_": "all_reduce",
    "_c10d_functional::all_gather_into_tensor": "all_gather",
    "_c10d_functional::all_gather_into_tensor_coalesced": "all_gather",
    "_c10d_functional::reduce_scatter_tensor": "reduce_scatter",
    "_c10d_functional::reduce_scatter_tensor_coalesced": "reduce_scatter",
    "_c10d_functional::broadcast": "broadcast", "_c10d_functional::broadcast_": "broadcast",
}


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))


class CollectiveCounter(TorchDispatchMode):
    """``with CollectiveCounter() as counter:``; then ``counter.bytes`` and ``counter.calls``
    (collective name -> full-buffer bytes, number of calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Counter = Counter()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _C10D:
            kind, index = _C10D[name]
            self._add(kind, _nbytes(args[index]))
        elif name in _FUNCTIONAL:
            kind = _FUNCTIONAL[name]
            scale = args[1] if kind == "all_gather" else 1        # (input, group_size, group_name)
            self._add(kind, _nbytes(args[0]) * scale)
        return func(*args, **kwargs)

    def _add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += nbytes
        self.calls[kind] += 1
