"""The graph IR: what every front end produces and every later stage reads.

Frozen dataclasses only. Nothing here says which front end built the graph: op kinds are
canonical ONNX names (``MatMul``, ``Softmax``; contrib ops as ``com.microsoft.Attention``),
shapes are tuples whose entries are ints or symbolic expressions in ``batch`` and ``seq``.
Weight values are never part of the IR: constants carry name, shape and dtype only, plus
the values of small integer constants (TopK's k, reshape targets) that structure needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Mapping, Union

Dim = Union[int, str]          # str: a symbolic expression such as "batch", "seq", "batch*seq"
Shape = tuple[Dim, ...]

BATCH = "batch"
SEQ = "seq"

FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "float8e4m3fn", "float8e5m2"})


@dataclass(frozen=True)
class Tensor:
    """A value flowing between nodes. ``shape`` is None when its rank is unknown."""

    name: str
    shape: Shape | None
    dtype: str


@dataclass(frozen=True)
class Constant:
    """An initializer (weight or buffer). ``external`` is the external-data location
    relative to the model's folder, or None when the bytes live inside the model file."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    external: str | None = None

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class Node:
    """One operation. ``inputs`` keeps "" for omitted optional inputs so positions hold.
    ``scope`` is the module path the exporter recorded (a hint, never trusted alone)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    scope: str = ""

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


@dataclass(frozen=True)
class Graph:
    """A whole model graph, nodes in topological order."""

    nodes: tuple[Node, ...]
    tensors: Mapping[str, Tensor]
    constants: Mapping[str, Constant]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    source: str
    # values of small integer constants (<= 64 elements), e.g. TopK's k
    small_values: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))
    warnings: tuple[str, ...] = ()

    def shape(self, tensor: str) -> Shape | None:
        info = self.tensors.get(tensor)
        if info is not None:
            return info.shape
        const = self.constants.get(tensor)
        return const.shape if const is not None else None

    def dtype(self, tensor: str) -> str | None:
        info = self.tensors.get(tensor)
        if info is not None:
            return info.dtype
        const = self.constants.get(tensor)
        return const.dtype if const is not None else None

    # The graph's index: built once per graph on first use (a Graph never changes), so no stage
    # rebuilds the same maps. cached_property writes the instance __dict__, which a frozen
    # dataclass allows; the maps are not fields, so equality and the graph cache ignore them.
    @cached_property
    def node_index(self) -> Mapping[str, int]:
        """Node name -> its position in ``nodes``."""
        return MappingProxyType({node.name: index for index, node in enumerate(self.nodes)})

    @cached_property
    def producer_index(self) -> Mapping[str, int]:
        """Tensor -> position of the node that outputs it (graph inputs and constants have none)."""
        return MappingProxyType({out: index for index, node in enumerate(self.nodes) for out in node.outputs if out})

    @cached_property
    def producers(self) -> Mapping[str, Node]:
        """Tensor -> the node that outputs it."""
        return MappingProxyType({out: self.nodes[index] for out, index in self.producer_index.items()})

    @cached_property
    def consumer_indices(self) -> Mapping[str, tuple[int, ...]]:
        """Tensor -> positions of the nodes that read it, in order, once per read (``Mul(x, x)``
        lists its node twice: a chain walk asking "is this the only reader?" must see both)."""
        readers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.inputs:
                if name:
                    readers.setdefault(name, []).append(index)
        return MappingProxyType({name: tuple(found) for name, found in readers.items()})


def frozen_map(items: Mapping) -> Mapping:
    """A read-only view, so dataclasses stay immutable all the way down."""
    return MappingProxyType(dict(items))
