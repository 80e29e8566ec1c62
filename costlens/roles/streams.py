"""Which graph inputs each tensor depends on, and attention that mixes two streams.

costlens prices one stack of blocks over one token stream (decoder-only or encoder-only). An
encoder-decoder model (Whisper, BART, T5) has two: the decoder's queries attend to keys and
values computed from the encoder's input (cross-attention). Placing such a graph as one stack
would misread its layers and price a different model, so it is recognised from structure —
an attention core whose keys do not depend on an input its queries depend on — and refused
(issue 16 item 4). Self-attention, with or without a KV cache, has keys that depend on every
input its queries do (the same hidden states; a cache only adds inputs).
"""
from __future__ import annotations

from costlens.errors import StructureError
from costlens.roles.graphview import GraphView


def input_ancestry(view: GraphView) -> dict[str, frozenset[str]]:
    """Per data tensor, the graph inputs it is computed from (nodes are in topological order)."""
    ancestry: dict[str, frozenset[str]] = {name: frozenset({name}) for name in view.graph.inputs}
    empty: frozenset[str] = frozenset()
    for node in view.nodes:
        found = empty.union(*(ancestry.get(x, empty) for x in node.inputs if x))
        for out in node.outputs:
            if out:
                ancestry[out] = found
    return ancestry


def cross_attention_cores(view: GraphView, cores) -> list:
    """The cores whose keys miss an input their queries depend on (cross-attention)."""
    if not any(core.q and core.k for core in cores):
        return []
    ancestry = input_ancestry(view)
    crossing = []
    for core in cores:
        if not (core.q and core.k):
            continue
        queries, keys = ancestry.get(core.q, frozenset()), ancestry.get(core.k, frozenset())
        if queries and keys and not queries <= keys:
            crossing.append(core)
    return crossing


def refuse_two_streams(view: GraphView, cores) -> None:
    """StructureError naming what cannot be placed when some attention crosses two streams."""
    crossing = cross_attention_cores(view, cores)
    if not crossing:
        return
    ancestry = input_ancestry(view)
    first = crossing[0]
    queries = sorted(ancestry[first.q] - ancestry[first.k])
    keys = sorted(ancestry[first.k] - ancestry[first.q])
    raise StructureError(
        f"{view.graph.source}: an encoder-decoder model: {len(crossing)} of its {len(cores)} attention blocks "
        f"are cross-attention (queries from {', '.join(queries) or '?'}, keys and values from "
        f"{', '.join(keys) or 'constants'}); costlens prices one stack of blocks (decoder-only or encoder-only) "
        "and cannot place the encoder, the decoder and their cross-attention: "
        "refused rather than priced as a different model")
