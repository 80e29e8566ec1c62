"""Which constants are parameters, and what kind of use each parameter site is.

A float constant is a parameter where it meets data as a weight: the matrix of a MatMul or
Gemm, the table of an embedding lookup, the scale or shift of a normalization, the bias
added to a linear's output, or the weights of a fused attention / MoE op. It is a buffer
(not a parameter) where it only meets data after mixing with shape-derived values (RoPE
tables, position-sliced masks) or where it is a scalar (epsilons, exponents, scales).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from costlens.roles.graphview import LINEAR_OPS, NORM_OPS, GraphView, UseSite

ELEMENTWISE = frozenset({"Add", "Mul", "Sub", "Div"})
# Ops where a constant table mixes into data without being a weight of the model.
MIXING_OPS = ELEMENTWISE | {"Where", "Max", "Min", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"}
# What each input slot of a fused op holds, where it is a constant. Slots not listed hold
# activations. (onnxruntime contrib-op schemas; ONNX RotaryEmbedding opset 23.)
FUSED_SLOTS: dict[str, dict[int, "SiteKind"]] = {}
FUSED_MOE = frozenset({"com.microsoft.MoE", "com.microsoft.QMoE", "com.microsoft.SparseMoE"})


class SiteKind(Enum):
    """What a constant is where it meets data: which decides whether it is a parameter (and its role)
    or a buffer that gets no gradient."""

    LINEAR = "linear"              # weight of a matmul
    BIAS = "bias"                  # added to a linear's output
    EMBED_TOKEN = "token"
    EMBED_POSITION = "position"
    NORM = "norm"
    EXPERT_GATHER = "expert_gather"  # rows of an expert tensor picked by routed indices
    EXPERT_BIAS = "expert_bias"      # an [E, out] bias picked by routed indices
    FUSED_ATTENTION = "fused_attention"
    FUSED_MOE = "fused_moe"
    ATTENTION_SINK = "attention_sink"   # gpt-oss: a learned logit per head concatenated to the scores
    BUFFER = "buffer"
    UNKNOWN = "unknown"


FUSED_SLOTS.update({
    "com.microsoft.Attention": {1: SiteKind.FUSED_ATTENTION, 2: SiteKind.FUSED_ATTENTION},
    "com.microsoft.MultiHeadAttention": {3: SiteKind.FUSED_ATTENTION},
    # cos/sin caches are tables; head_sink is learned; q/k norm weights are norms
    "com.microsoft.GroupQueryAttention": {7: SiteKind.BUFFER, 8: SiteKind.BUFFER, 11: SiteKind.ATTENTION_SINK,
                                          14: SiteKind.NORM, 15: SiteKind.NORM},
    "com.microsoft.RotaryEmbedding": {2: SiteKind.BUFFER, 3: SiteKind.BUFFER},
    "RotaryEmbedding": {1: SiteKind.BUFFER, 2: SiteKind.BUFFER},
})


@dataclass(frozen=True)
class ParamSite:
    """One use site of a constant and its kind; ``linear_node`` indexes graph.nodes."""

    site: UseSite
    kind: SiteKind
    linear_node: int | None = None   # for BIAS: the linear it belongs to; for LINEAR: the site itself


def classify_sites(view: GraphView) -> dict[str, list[ParamSite]]:
    """Every float constant with at least one use site, each site classified."""
    return {name: [classify(view, s) for s in sites] for name, sites in view.use_sites.items()}


def classify(view: GraphView, site: UseSite) -> ParamSite:
    """The kind of one use site, from the op it meets and the input slot: a scalar, a table mixed with
    positions, or a constant no gradient reaches is a BUFFER, never a parameter; UNKNOWN when no rule fits."""
    node = view.nodes[site.node]
    const = view.graph.constants[site.constant]
    others = [x for i, x in enumerate(node.inputs) if i != site.slot and x and view.is_data(x)]
    if const.n_elements == 1:
        return ParamSite(site, SiteKind.BUFFER)       # epsilons, scales, mask fill values
    if not any(out in view.live for out in node.outputs if out):
        return ParamSite(site, SiteKind.BUFFER)       # only steers a selection: no gradient reaches it
    if site.positional:
        if node.op == "Add" and others and _last_dim(view, site) is not None and "Where" not in site.path_ops:
            return ParamSite(site, SiteKind.EMBED_POSITION)
        return ParamSite(site, SiteKind.BUFFER)
    if node.op in LINEAR_OPS:
        if node.op == "Gemm" and site.slot == 2:
            return ParamSite(site, SiteKind.BIAS, linear_node=site.node)
        return ParamSite(site, SiteKind.LINEAR, linear_node=site.node)
    if site.via is not None:
        return ParamSite(site, SiteKind.LINEAR, linear_node=site.node)
    if node.op in ("Gather", "GatherND") and site.slot == 0 and node.outputs[0] in view.routed_gathers:
        if len(const.shape) == 2:
            return ParamSite(site, SiteKind.EXPERT_BIAS)        # gpt-oss: [E, out] biases picked per pair
        return ParamSite(site, SiteKind.EXPERT_GATHER)
    if node.op == "Gather" and site.slot == 0:
        return ParamSite(site, SiteKind.EMBED_TOKEN)
    if node.op in NORM_OPS and site.slot >= 1:
        return ParamSite(site, SiteKind.NORM)
    if node.op in FUSED_SLOTS:
        return ParamSite(site, FUSED_SLOTS[node.op].get(site.slot, SiteKind.UNKNOWN))
    if node.op in FUSED_MOE and site.slot >= 2:
        # com.microsoft.MoE: fc1, fc2, fc3 weights at slots 2, 4, 6 and their [E, out] biases at 3, 5, 7
        return ParamSite(site, SiteKind.EXPERT_BIAS if site.slot in (3, 5, 7) else SiteKind.FUSED_MOE)
    if node.op in ELEMENTWISE and _is_vector(const.shape):
        linear = _linear_producer(view, others[0]) if (node.op == "Add" and len(others) == 1) else None
        if linear is not None:
            return ParamSite(site, SiteKind.BIAS, linear_node=linear)
        return ParamSite(site, SiteKind.NORM)
    if node.op == "Concat" and _is_vector(const.shape) and _reaches_softmax(view, site.node):
        return ParamSite(site, SiteKind.ATTENTION_SINK)    # a learned logit per head beside the scores
    if node.op == "Add" and len(others) == 1 and _adds_to_expert_product(view, const.shape, others[0]):
        return ParamSite(site, SiteKind.EXPERT_BIAS)        # dense-dispatch experts: h[E, t, out] + b[E, 1, out]
    if node.op in ELEMENTWISE and others and _adds_to_token_embedding(view, node, others):
        return ParamSite(site, SiteKind.EMBED_POSITION)   # a static export's sliced position table
    if node.op in MIXING_OPS:
        # Learned elementwise weights are per-feature vectors (norm scales, biases). A table
        # with several non-1 dims meeting data elementwise is a function of positions that a
        # static export folded: a causal mask, RoPE cos / sin, position-sliced biases.
        return ParamSite(site, SiteKind.BUFFER)
    return ParamSite(site, SiteKind.UNKNOWN)


def _reaches_softmax(view: GraphView, index: int, depth: int = 3) -> bool:
    frontier = [(index, 0)]
    while frontier:
        node_index, level = frontier.pop()
        for out in view.nodes[node_index].outputs:
            for consumer in view.consumer_nodes(out):
                op = view.nodes[consumer].op
                if op == "Softmax":
                    return True
                if level < depth and op in ("Sub", "Cast", "Add"):
                    frontier.append((consumer, level + 1))
    return False


def _adds_to_token_embedding(view: GraphView, node, others: list[str]) -> bool:
    """An Add of a constant table to the output of a token-embedding lookup (through views)."""
    if node.op != "Add" or len(others) != 1:
        return False
    tensor = others[0]
    for _ in range(4):
        producer = view.producer_node(tensor)
        if producer is None:
            return False
        if producer.op == "Gather":
            return producer.inputs[0] in view.graph.constants
        data = view.data_inputs(view.producer[tensor])
        if producer.op not in ("Reshape", "Cast", "Identity", "Mul") or len(data) != 1:
            return False
        tensor = data[0]
    return False


def _adds_to_expert_product(view: GraphView, shape: tuple[int, ...], tensor: str) -> bool:
    """Is ``tensor`` the product of data with a 3-D expert tensor [E, in, out] (or [E, out, in])
    and ``shape`` an [E, out] table, one bias row per expert? The expert count and the output
    width must both match: a position table of the same rank does not."""
    index = _linear_producer(view, tensor)
    out_shape = view.graph.shape(tensor)
    if index is None or len(shape) != 2 or not out_shape or out_shape[-1] != shape[-1]:
        return False
    return any(len(view.graph.constants[name].shape) == 3 and view.graph.constants[name].shape[0] == shape[0]
               for name in view.constants_at.get(index, ()))


def _is_vector(shape: tuple[int, ...]) -> bool:
    """One dim larger than 1 (a per-feature scale or shift, however broadcast)."""
    return sum(1 for d in shape if d != 1) == 1


def _last_dim(view: GraphView, site: UseSite) -> int | None:
    shape = view.graph.constants[site.constant].shape
    return shape[-1] if shape else None


def _linear_producer(view: GraphView, tensor: str) -> int | None:
    index = view.producer.get(tensor)
    if index is not None and view.nodes[index].op in LINEAR_OPS:
        return index
    return None
