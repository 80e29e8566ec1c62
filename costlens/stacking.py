"""Stacked FFN sublayers (seed 004): a plan-stage rewrite of the graph.

``--stack-ffn N`` inserts, after each block's last FFN sublayer, N copies of that sublayer
(its own norm, up/gate/down and residual add), with new parameters, optionally of another
width. The rewritten graph goes through the role locator again, so the copies are priced
by the same rules as everything else: no formula is written twice. Copies' constants are
named ``STACKED_PREFIX + ...`` so the ``stacked`` selector can find them.
"""
from __future__ import annotations

from dataclasses import replace

from costlens.errors import PlanError
from costlens.ir import Constant, Graph, Node, Tensor, frozen_map
from costlens.roles.graphview import GraphView
from costlens.roles.layers import residual_entry
from costlens.roles.types import Role, RoleMap

STACKED_PREFIX = "costlens.stacked/"


def stack_ffn(graph: Graph, roles: RoleMap, copies: int, width: int | None = None) -> Graph:
    """The graph with ``copies`` extra FFN sublayers after each block's last FFN sublayer."""
    if roles.architecture.norm_placement != "pre":
        raise PlanError("--stack-ffn: only pre-norm blocks are supported (this model normalizes after the residual)")
    view = GraphView(graph)
    last_units = {}
    for unit in sorted(roles.ffn_units, key=lambda u: u.down_site):
        if unit.role is Role.FFN and unit.layer is not None:
            last_units[unit.layer] = unit          # the deepest FFN sublayer of each block
    if len(last_units) != roles.architecture.layers:
        raise PlanError("--stack-ffn needs a dense FFN sublayer in every block (MoE blocks are not supported)")
    if width and width != roles.architecture.ffn and roles.architecture.ffn == roles.architecture.hidden:
        raise PlanError("--stack-ffn-width: the FFN width equals the hidden size; cannot tell the dims apart")
    nodes = list(graph.nodes)
    tensors = dict(graph.tensors)
    constants = dict(graph.constants)
    inserts: dict[int, list[Node]] = {}
    renames: dict[str, str] = {}
    parameters = {u.constant for u in roles.params}
    for layer, unit in sorted(last_units.items()):
        residual, branch = _sublayer(view, unit.down_site)
        old_width = roles.architecture.ffn
        stream = graph.nodes[residual].outputs[0]
        added: list[Node] = []
        current = stream
        for copy in range(copies):
            prefix = f"{STACKED_PREFIX}{layer}.{copy}/"
            clone, current = _clone(graph, view, branch, residual, current, prefix, tensors, constants, parameters,
                                    (old_width, width) if width and width != old_width else None)
            added += clone
        inserts[residual] = added
        renames[stream] = current
    rebuilt: list[Node] = []
    for index, node in enumerate(nodes):
        rebuilt.append(_rewire(node, renames))
        rebuilt += inserts.get(index, [])
    outputs = tuple(renames.get(o, o) for o in graph.outputs)
    return replace(graph, nodes=tuple(rebuilt), tensors=frozen_map(tensors), constants=frozen_map(constants),
                   outputs=outputs)


def _rewire(node: Node, renames: dict[str, str]) -> Node:
    if not any(x in renames for x in node.inputs):
        return node
    return replace(node, inputs=tuple(renames.get(x, x) for x in node.inputs))


def _sublayer(view: GraphView, down_site: int) -> tuple[int, list[int]]:
    """(the residual add closing the FFN sublayer, the nodes of its branch in order)."""
    skip = residual_entry(view, down_site)
    if skip is None:
        raise PlanError("--stack-ffn: could not find the residual add after an FFN")
    residual = next(i for i in view.consumer_nodes(skip)
                    if view.nodes[i].op == "Add" and i > down_site)
    branch_input = next(x for x in view.nodes[residual].inputs if x != skip)
    members: set[int] = set()
    frontier = [branch_input]
    while frontier:
        tensor = frontier.pop()
        index = view.producer.get(tensor)
        if tensor == skip or index is None or index in members:
            continue
        members.add(index)
        frontier.extend(x for x in view.nodes[index].inputs if x and x not in view.graph.constants)
    return residual, sorted(members)


def _clone(graph, view, branch, residual, stream, prefix, tensors, constants, parameters, resize):
    """Copy the branch and its residual add onto ``stream``; new names, new parameters (buffers
    such as exponents and epsilons stay shared)."""
    skip = next(x for x in graph.nodes[residual].inputs if view.producer.get(x) not in branch)
    mapping = {skip: stream}

    def name(tensor: str) -> str:
        if not tensor or tensor in mapping:
            return mapping.get(tensor, tensor)
        if tensor in graph.constants and tensor not in parameters:
            return tensor
        if tensor in graph.constants:
            const = graph.constants[tensor]
            new = prefix + tensor
            constants[new] = Constant(new, _resized(const.shape, resize), const.dtype)
            mapping[tensor] = new
            return new
        if view.producer.get(tensor) in branch or tensor in graph.nodes[residual].outputs:
            new = prefix + tensor
            info = graph.tensors.get(tensor)
            if info is not None:
                tensors[new] = Tensor(new, _resized(info.shape, resize) if info.shape else None, info.dtype)
            mapping[tensor] = new
            return new
        return tensor            # shared shape tensors and the like stay shared

    clones = []
    for index in branch + [residual]:
        node = graph.nodes[index]
        clones.append(replace(node, name=prefix + node.name, inputs=tuple(name(x) for x in node.inputs),
                              outputs=tuple(name(o) for o in node.outputs)))
    return clones, mapping[graph.nodes[residual].outputs[0]]


def _resized(shape, resize):
    if resize is None:
        return shape
    old, new = resize
    return tuple(new if d == old else d for d in shape)
