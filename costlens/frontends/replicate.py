"""Shallow trace + replication: a deep stack of identical blocks from a two-block trace.

Tracing grows with depth although the blocks are identical: ``torch.export`` takes 5 s on
LLaMA-3-8B and 13 s on LLaMA-3-70B here, against 1-1.6 s for two blocks. So a model is traced with two blocks and its graph rebuilt with L:
block 1's nodes are copied L-2 times, each copy reading the previous copy's outputs where
block 1 reads block 0's, sharing what block 1 shares with block 0 (RoPE tables, masks, shape
values), with its own parameters (``layers.1.`` renamed ``layers.i.``); the nodes after the
stack read the last copy. ``replicate_blocks`` refuses (``ReplicationError``) unless block 0
and block 1 are the same graph up to this renaming — then the caller traces the full model.
That the result equals a full trace is checked in tests/test_frontend_hf.py.
"""
from __future__ import annotations

from dataclasses import replace

from costlens.ir import Constant, Graph, Node, Tensor, frozen_map


class ReplicationError(Exception):
    """Blocks 0 and 1 of the shallow graph differ: replication would not be a full trace."""


def _in_block(scope: str, prefix: str) -> bool:
    return scope == prefix or scope.startswith(prefix + ".")


def _members(nodes, prefix: str) -> list[int]:
    members = [i for i, n in enumerate(nodes) if _in_block(n.scope, prefix)]
    if not members:
        raise ReplicationError(f"no node has the scope {prefix!r}")
    return members


def replicate_blocks(graph: Graph, container: str, layers: int, first: int = 0) -> Graph:
    """``graph`` (traced with blocks ``container.0`` .. ``container.{first+1}``) with ``layers``
    blocks: blocks ``first`` and ``first+1`` are the template pair, block ``first+1`` is copied
    for layers ``first+2`` .. ``layers-1`` (``first`` > 0: a stack whose first blocks differ,
    such as DeepSeek-V3's dense layers before its MoE layers; those are traced as they are).

    Nodes of no module (scope "") between the blocks are shared values such as symbolic
    sizes; they stay where they are. Any other module's node there is refused."""
    if layers <= first + 2:
        return graph
    nodes = graph.nodes
    b0, b1 = _members(nodes, f"{container}.{first}"), _members(nodes, f"{container}.{first + 1}")
    if len(b0) != len(b1) or b0[-1] > b1[0]:
        raise ReplicationError("blocks 0 and 1 are not two runs of the same length, one after the other")
    members = set(b0) | set(b1)
    strays = [nodes[i].scope for i in range(b0[0], b1[-1] + 1) if i not in members and nodes[i].scope]
    if strays:
        raise ReplicationError(f"blocks interleave with nodes of other modules: {strays[:3]}")
    mapping = _match_blocks(graph, b0, b1, f"{container}.{first}.", f"{container}.{first + 1}.")
    produced0 = {o for i in b0 for o in nodes[i].outputs if o}
    produced1 = {o for i in b1 for o in nodes[i].outputs if o}
    inverse = {v: k for k, v in mapping.items()}

    def name_in(layer: int, tensor1: str) -> str:
        """The tensor of block ``layer`` that corresponds to block 1's ``tensor1``."""
        if layer == first + 1:
            return tensor1
        if layer == first:
            return inverse[tensor1]
        return f"{tensor1}@{layer}"

    prefix1 = f"{container}.{first + 1}."
    tensors = dict(graph.tensors)
    constants = dict(graph.constants)
    copies: list[Node] = []
    for layer in range(first + 2, layers):
        prefix = f"{container}.{layer}."

        def rename(x: str) -> str:
            if not x:
                return x
            if x in produced1:
                return name_in(layer, x)
            if x in produced0:                 # block 1 reads block 0: copy i reads copy i-1
                return name_in(layer - 1, mapping[x])
            if x.startswith(prefix1) and x in graph.constants:
                return prefix + x[len(prefix1):]
            return x

        for i in b1:
            node = nodes[i]
            for x in node.inputs:
                if x.startswith(prefix1) and x in graph.constants and rename(x) not in constants:
                    const = graph.constants[x]
                    constants[rename(x)] = Constant(rename(x), const.shape, const.dtype, const.external)
            for out in node.outputs:
                if out and out in graph.tensors:
                    info = graph.tensors[out]
                    tensors[rename(out)] = Tensor(rename(out), info.shape, info.dtype)
            copies.append(replace(node, name=f"{node.name}@{layer}", inputs=tuple(rename(x) for x in node.inputs),
                                  outputs=tuple(rename(o) for o in node.outputs),
                                  scope=f"{container}.{layer}" + node.scope[len(prefix1) - 1:]))

    def tail(x: str) -> str:
        if x in produced1:
            return name_in(layers - 1, x)
        if x in produced0:
            return name_in(layers - 2, mapping[x])
        return x

    end = b1[-1] + 1
    rest = [replace(n, inputs=tuple(tail(x) for x in n.inputs)) for n in nodes[end:]]
    return replace(
        graph, nodes=tuple(nodes[:end]) + tuple(copies) + tuple(rest), tensors=frozen_map(tensors),
        constants=frozen_map(constants), outputs=tuple(tail(o) for o in graph.outputs),
    )


def _match_blocks(graph: Graph, b0: list[int], b1: list[int], prefix0: str, prefix1: str) -> dict[str, str]:
    """Template block tensor -> next block tensor, after checking the blocks are the same graph."""
    nodes = graph.nodes
    mapping: dict[str, str] = {}
    produced0 = {o for i in b0 for o in nodes[i].outputs if o}
    for i, j in zip(b0, b1):
        a, b = nodes[i], nodes[j]
        if a.op != b.op or dict(a.attrs) != dict(b.attrs) or len(a.inputs) != len(b.inputs) \
                or len(a.outputs) != len(b.outputs):
            raise ReplicationError(f"blocks differ at {a.name} ({a.op}) / {b.name} ({b.op})")
        for x0, x1 in zip(a.inputs, b.inputs):
            if not _same_input(graph, x0, x1, mapping, produced0, prefix0, prefix1):
                raise ReplicationError(f"blocks differ at an input of {a.name}: {x0!r} / {x1!r}")
        for o0, o1 in zip(a.outputs, b.outputs):
            if graph.shape(o0) != graph.shape(o1) or graph.dtype(o0) != graph.dtype(o1):
                raise ReplicationError(f"blocks differ in the shape of {o0!r} / {o1!r}")
            if o0:
                mapping[o0] = o1
    return mapping


def _same_input(graph, x0, x1, mapping, produced0, prefix0, prefix1) -> bool:
    if x0 in mapping:                                   # made inside block 0
        return mapping[x0] == x1
    if x0 == x1:                                        # shared: graph input, table, scalar
        return True
    if x1 in produced0:                                 # block 1 reads the stream block 0 made
        return True
    c0, c1 = graph.constants.get(x0), graph.constants.get(x1)
    if c0 is not None and c1 is not None and x0.startswith(prefix0) and x1 == prefix1 + x0[len(prefix0):]:
        return c0.shape == c1.shape and c0.dtype == c1.dtype
    return False
