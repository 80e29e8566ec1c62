"""Where a training run applies dropout that the inference graph no longer shows.

GPT-2 and BERT (and PEFT-free models with a ``*_dropout`` > 0 in their config) drop after the
embeddings, on the attention probabilities, after the attention output projection and after the
FFN's down projection. The places are found from the roles, once, and read by the estimator
(storages.py: the masks and dropped copies autograd keeps) and by the executor (measure/executor.py:
where it calls ``F.dropout``), so the two cannot place dropout differently.
"""
from __future__ import annotations

from dataclasses import dataclass

from costlens.ir import Graph
from costlens.roles.types import RoleMap


@dataclass(frozen=True)
class DropoutPoint:
    """One dropout: the output of node ``node`` (a graph node index) is dropped.
    ``reader``: for attention probabilities, the node that multiplies the dropped copy by V
    (it keeps that copy for backward, beside softmax's own output); None elsewhere."""

    node: int
    tensor: str
    reader: int | None = None

    @property
    def on_probabilities(self) -> bool:
        """Whether this drops an attention block's softmax output."""
        return self.reader is not None


def dropout_points(graph: Graph, roles: RoleMap) -> tuple[DropoutPoint, ...]:
    """Every training-time dropout of a model with ``roles`` on ``graph``, in the order: per
    attention block its probabilities then its output projections; each FFN's down projection;
    the token embedding's gather."""
    points = []
    for block in roles.attentions:
        if block.softmax_node is not None:
            points.append(DropoutPoint(block.softmax_node, graph.nodes[block.softmax_node].outputs[0],
                                       block.context_node))
        points += [DropoutPoint(site, graph.nodes[site].outputs[0]) for site in block.o_sites]
    points += [DropoutPoint(u.down_site, graph.nodes[u.down_site].outputs[0]) for u in roles.ffn_units]
    token = next((u for u in roles.params if u.kind == "token"), None)
    if token is not None:
        index = next(i for i, n in enumerate(graph.nodes) if n.name == token.site)
        points.append(DropoutPoint(index, graph.nodes[index].outputs[0]))
    return tuple(points)
