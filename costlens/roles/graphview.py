"""Indexes over a Graph that the structural searches share.

``GraphView`` answers: who produces / consumes a tensor, which tensors carry data (depend
on a graph input through anything but Shape-like ops), and where each constant meets data
("use sites"). Everything is computed once, in one pass over the topological order.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from costlens.ir import FLOAT_DTYPES, Graph, Node

# Ops whose outputs describe a tensor's shape, not its values: data does not flow through.
SHAPE_OPS = frozenset({"Shape", "Size"})

# Ops that only move, cast or select data: walking through them keeps "the same tensor".
VIEW_OPS = frozenset({
    "Reshape", "Transpose", "Cast", "Identity", "Unsqueeze", "Squeeze", "Flatten", "Expand",
    "Dropout", "Slice", "Gather", "Split", "Concat", "Tile", "CastLike",
})

LINEAR_OPS = frozenset({"MatMul", "Gemm", "Einsum", "FusedMatMul", "com.microsoft.FusedMatMul"})

NORM_OPS = frozenset({
    "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
    "com.microsoft.SimplifiedLayerNormalization", "com.microsoft.SkipLayerNormalization",
    "com.microsoft.SkipSimplifiedLayerNormalization", "com.microsoft.LayerNormalization",
    "GroupNormalization", "BatchNormalization", "InstanceNormalization",
})


@dataclass(frozen=True)
class UseSite:
    """Where a constant (possibly after weight-only ops such as Transpose) meets data."""

    constant: str
    node: int              # index of the node in graph.nodes
    slot: int              # which input of that node carries the constant-derived tensor
    path_ops: tuple[str, ...]   # ops between the constant and the site
    positional: bool       # the path mixed in shape-derived values (positions): a table, not a weight
    rank: int | None       # rank of the constant-derived tensor entering the site
    via: int | None = None  # the Gather that picked rows of a 3-D expert tensor by routed ids (batched experts)


class GraphView:
    """A Graph with its producer and consumer indexes and its data / dynamic tensor sets, built once
    so that every structural search asks the same questions without rescanning the nodes."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes = graph.nodes
        self.producer = graph.producer_index        # the graph's own index, built once per graph
        self.consumers = graph.consumer_indices
        self.data = self._data_tensors()
        self.dynamic = self._dynamic_tensors()

    # ------------------------------------------------------------------ flows
    def _data_tensors(self) -> set[str]:
        """Tensors whose values depend on a graph input's values (not just its shape)."""
        data = set(self.graph.inputs)
        for node in self.nodes:
            if node.op in SHAPE_OPS or node.op == "ConstantOfShape":
                continue
            if any(name in data for name in node.inputs if name):
                data.update(o for o in node.outputs if o)
        return data

    def _dynamic_tensors(self) -> set[str]:
        """Tensors that depend on a graph input in any way (values or shape)."""
        dynamic = set(self.graph.inputs)
        for node in self.nodes:
            if any(name in dynamic for name in node.inputs if name):
                dynamic.update(o for o in node.outputs if o)
        return dynamic

    def is_data(self, tensor: str) -> bool:
        return tensor in self.data

    def producer_node(self, tensor: str) -> Node | None:
        index = self.producer.get(tensor)
        return None if index is None else self.nodes[index]

    def consumer_nodes(self, tensor: str) -> list[int]:
        return self.consumers.get(tensor, [])

    def data_inputs(self, index: int) -> list[str]:
        return [name for name in self.nodes[index].inputs if name and name in self.data]

    # ------------------------------------------------------------------ constants
    @cached_property
    def use_sites(self) -> dict[str, list[UseSite]]:
        """For every float constant, the nodes where it (or a weight-only view of it) meets data."""
        sites: dict[str, list[UseSite]] = {}
        for name, const in self.graph.constants.items():
            if const.is_float and const.n_elements > 0:
                found = self._sites_of(name, len(const.shape))
                if found:
                    sites[name] = found
        return sites

    def _sites_of(self, constant: str, rank: int) -> list[UseSite]:
        found: list[UseSite] = []
        # (tensor, ops so far, positional so far, rank of tensor)
        stack = [(constant, (), False, rank)]
        seen = set()
        while stack:
            tensor, path, positional, cur_rank = stack.pop()
            for index in self.consumer_nodes(tensor):
                node = self.nodes[index]
                slot = node.inputs.index(tensor)
                if (index, tensor) in seen:
                    continue
                seen.add((index, tensor))
                if any(self.is_data(x) for x in node.inputs if x):
                    matmul = self._routed_gather_use(index, slot, rank)
                    if matmul is not None:
                        # batched experts: W[ids] @ x. The product is where the weight works;
                        # the gather only picks each (token, expert) pair's matrix.
                        m_index, m_slot = matmul
                        found.append(UseSite(constant, m_index, m_slot, path + (node.op,), positional, rank, index))
                        continue
                    found.append(UseSite(constant, index, slot, path, positional, cur_rank))
                    continue
                # still constant-derived: follow it, noting shape-derived (position) inputs
                mixes_positions = node.op not in ("Reshape", "Expand") and any(
                    x in self.dynamic and x != tensor for x in node.inputs if x)
                for out in node.outputs:
                    if out:
                        stack.append((out, path + (node.op,), positional or mixes_positions, self._rank(out)))
        return sorted(found, key=lambda s: s.node)

    def _routed_gather_use(self, index: int, slot: int, rank: int) -> tuple[int, int] | None:
        """(MatMul node, slot) where the rows a Gather / GatherND picked out of a 3-D expert tensor
        by routed expert ids are multiplied with data, or None."""
        node = self.nodes[index]
        if node.op not in ("Gather", "GatherND") or slot != 0 or rank != 3 or len(node.inputs) < 2:
            return None
        if not self.from_topk(node.inputs[1]):
            return None
        tensor = node.outputs[0]
        for _ in range(4):
            consumers = self.consumer_nodes(tensor)
            if len(consumers) != 1:
                return None
            nxt = self.nodes[consumers[0]]
            if nxt.op in ("MatMul", "Einsum", "com.microsoft.FusedMatMul"):
                return consumers[0], nxt.inputs.index(tensor)
            if nxt.op not in ("Transpose", "Reshape", "Cast", "Squeeze", "Unsqueeze", "Identity"):
                return None
            tensor = nxt.outputs[0]
        return None

    def from_topk(self, tensor: str, depth: int = 8) -> bool:
        """Do these indices come from a routing decision (TopK, or ArgMax as PhiMoE's sparsemixer
        picks one expert per pass) rather than from token ids?"""
        frontier, seen = [(tensor, 0)], set()
        while frontier:
            name, level = frontier.pop()
            index = self.producer.get(name)
            if index is None or index in seen or level > depth:
                continue
            seen.add(index)
            node = self.nodes[index]
            if node.op in ("TopK", "ArgMax"):
                return True
            frontier.extend((x, level + 1) for x in self.data_inputs(index))
        return False

    @cached_property
    def live(self) -> frozenset[str]:
        """Tensors on a floating-point path to a graph output: what a gradient from the loss can
        reach. Index outputs (TopK's indices, ArgMax) and comparisons cut the path, so a constant
        that only steers a selection (DeepSeek-V3's e_score_correction_bias) gets no gradient."""
        live = set(self.graph.outputs)
        for node in reversed(self.nodes):
            if any(out in live and self._is_float(out) for out in node.outputs if out):
                live.update(x for x in node.inputs if x and self._is_float(x))
        return frozenset(live)

    def _is_float(self, tensor: str) -> bool:
        dtype = self.graph.dtype(tensor)
        return dtype is None or dtype in FLOAT_DTYPES

    @cached_property
    def routed_gathers(self) -> frozenset[str]:
        """Outputs of Gather / GatherND picking rows of a constant by routed expert ids: expert
        weights and biases, not activations, whatever the gather's index input is."""
        found = set()
        for node in self.nodes:
            if node.op in ("Gather", "GatherND") and len(node.inputs) > 1 and node.inputs[0] not in self.dynamic \
                    and self.from_topk(node.inputs[1]):      # rows of a constant (or a view of one)
                found.add(node.outputs[0])
        return frozenset(found)

    def _rank(self, tensor: str) -> int | None:
        shape = self.graph.shape(tensor)
        return None if shape is None else len(shape)

    @cached_property
    def constants_at(self) -> dict[int, list[str]]:
        """Per node: the float constants that meet data there."""
        found: dict[int, list[str]] = {}
        for name, sites in self.use_sites.items():
            for site in sites:
                found.setdefault(site.node, []).append(name)
        return found
