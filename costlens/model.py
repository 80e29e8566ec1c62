"""The model every stage after loading works on: its graph IR, its located roles, and the ops
costlens could not price. Core of the pipeline (load -> **Model** -> plan -> estimate -> ...):
it imports the IR, the roles and the op registry, never a front end or the façade."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from costlens.ir import Graph, frozen_map
from costlens.ops.registry import known
from costlens.roles import RoleMap, locate_roles


@dataclass(frozen=True)
class Model:
    """A loaded model: its graph, its located roles, and what costlens could not price
    (``unknown_ops``: op name -> node count; any entry marks every estimate incomplete)."""

    graph: Graph
    roles: RoleMap
    unknown_ops: Mapping[str, int]
    # the attention the source runs when none is chosen (plans.ATTENTION_IMPLS) and why, as
    # frontends/attention_default.py finds it: Setup(attention=model.default_attention); None when
    # the source names an implementation costlens does not price (the reason in the why)
    default_attention: str | None = "eager"
    default_attention_why: str = ""

    @property
    def incomplete(self) -> bool:
        """Whether some op has no cost rule, so FLOPs and saved tensors are lower bounds."""
        return bool(self.unknown_ops)


def analyse(graph: Graph) -> Model:
    """The Model of a graph: the role of every parameter located, unknown ops listed."""
    return Model(graph=graph, roles=locate_roles(graph), unknown_ops=unknown_ops(graph))


def unknown_ops(graph: Graph) -> Mapping[str, int]:
    """Ops of the graph without a cost rule (ops/registry.py), by name with their counts: the
    estimate is incomplete while any is left, never silently priced at zero."""
    unknown = Counter(node.op for node in graph.nodes if not known(node.op))
    return frozen_map(dict(sorted(unknown.items())))
