"""The architecture summary, derived from located roles and the graph (never from names)."""
from __future__ import annotations

from collections import Counter

from costlens.roles.graphview import GraphView
from costlens.roles.layers import is_post_norm
from costlens.roles.types import Architecture, FFNUnit, Role


def summarize(view: GraphView, params, attentions, routers, units, entries, norm_sites) -> Architecture:
    """The Architecture of located roles: widths read from the weights' shapes (elements), counts from
    the blocks found; the first attention, FFN (else expert) unit and router stand for every layer."""
    token = next((p for p in params if p.role is Role.EMBEDDING and p.kind == "token"), None)
    head = next((p for p in params if p.role is Role.LM_HEAD), None)
    first_attention = attentions[0] if attentions else None
    main_units = [u for u in units if u.role is Role.FFN] or [u for u in units if u.role is Role.EXPERTS]
    unit = main_units[0] if main_units else None
    router = routers[0] if routers else None
    vocab, hidden = _token_dims(view, token)
    if hidden is None and first_attention:
        hidden = _width(view, first_attention.q_sites, inputs=True)
    return Architecture(
        layers=len(attentions),
        hidden=hidden,
        heads=first_attention.heads if first_attention else None,
        kv_heads=first_attention.kv_heads if first_attention else None,
        head_dim=first_attention.head_dim if first_attention else None,
        ffn=_ffn_width(view, unit) if unit else _fused_moe_width(view, hidden),
        activation=unit.activation if unit else _fused_moe_activation(view),
        gated_ffn=bool(unit and unit.activation.endswith("(gated)")) or "swiglu" in (_fused_moe_activation(view) or ""),
        experts=router.n_experts if router else 0,
        top_k=router.top_k if router else None,
        shared_experts=any(u.role is Role.SHARED_EXPERTS for u in units),
        vocab=vocab if token else (_width(view, (_site_index(view, head.site),)) if head else None),
        norm=_norm_kind(view, norm_sites),
        norm_placement="post" if is_post_norm(view, entries, norm_sites) else "pre",
        positions=_positions(view, params),
        tied_embedding=any(p.tied_to for p in params),
        ffn_per_block=_ffn_per_block(units, routers),
    )


def _fused_moe(view: GraphView):
    return next((n for n in view.nodes if n.op.endswith("MoE")), None)


def _fused_moe_width(view: GraphView, hidden: int | None) -> int | None:
    """Expert width F from fc2's 3-D weight. onnxruntime's MoE stores fc2 as [E, D, F] (out, in,
    as nn.Linear); the older [E, F, D] layout is told apart only where D != F and D is known."""
    node = _fused_moe(view)
    if node is None or len(node.inputs) < 5 or node.inputs[4] not in view.graph.constants:
        return None
    shape = view.graph.constants[node.inputs[4]].shape
    if len(shape) != 3:
        return None
    if hidden is not None and shape[2] == hidden and shape[1] != hidden:
        return shape[1]
    return shape[2]


def _token_dims(view: GraphView, token) -> tuple[int | None, int | None]:
    """(vocab, hidden) of the token table from what its lookup emits: [..., hidden]. A builder
    that shares the table with a tied head stores it as the head's [hidden, vocab] matrix and
    looks rows up through a Transpose, so the constant's own shape can be the wrong way round."""
    if token is None or len(token.shape) != 2:
        return None, None
    index = next((i for i, n in enumerate(view.nodes) if n.name == token.site), None)
    shape = view.graph.shape(view.nodes[index].outputs[0]) if index is not None else None
    hidden = shape[-1] if shape and isinstance(shape[-1], int) else token.shape[1]
    if hidden not in token.shape:
        hidden = token.shape[1]
    vocab = token.shape[0] * token.shape[1] // hidden
    return vocab, hidden


def _fused_moe_activation(view: GraphView) -> str | None:
    node = _fused_moe(view)
    if node is None:
        return None
    kind = node.attr("activation_type", "relu")
    return f"{kind} (gated)" if kind == "swiglu" else kind


def _site_index(view: GraphView, name: str) -> int:
    return next(i for i, n in enumerate(view.nodes) if n.name == name)


def _width(view: GraphView, sites, inputs: bool = False) -> int | None:
    for site in sites:
        names = view.data_inputs(site) if inputs else view.nodes[site].outputs[:1]
        for name in names:
            shape = view.graph.shape(name)
            if shape and isinstance(shape[-1], int):
                return shape[-1]
    return None


def _ffn_width(view: GraphView, unit: FFNUnit | None) -> int | None:
    if unit is None:
        return None
    width = _width(view, unit.gate_sites or unit.up_sites)
    fused = not unit.gate_sites and unit.activation.endswith("(gated)")
    return width // 2 if fused and width else width


def _norm_kind(view: GraphView, norm_sites) -> str | None:
    ops = Counter(view.nodes[i].op for i in norm_sites)
    if not ops:
        return None
    op = ops.most_common(1)[0][0]
    if op.endswith("LayerNormalization") and "Simplified" not in op:
        return "layernorm"
    if "Simplified" in op or op == "RMSNormalization":
        return "rmsnorm"
    # decomposed: LayerNorm subtracts the mean, RMSNorm does not
    return "layernorm" if any(n.op == "Sub" for n in view.nodes) and _has_mean_sub(view) else "rmsnorm"


def _has_mean_sub(view: GraphView) -> bool:
    for node in view.nodes:
        if node.op == "Sub":
            producers = [view.producer_node(x) for x in node.inputs if x]
            if any(p is not None and p.op == "ReduceMean" for p in producers):
                return True
    return False


def _positions(view: GraphView, params) -> str:
    if any(p.role is Role.EMBEDDING and p.kind == "position" for p in params):
        return "learned"
    if any(n.op in ("Cos", "Sin") or n.op.endswith("RotaryEmbedding") or n.attr("do_rotary")
           for n in view.nodes) or _rotates_half(view):
        return "rotary"
    return "none"


def _rotates_half(view: GraphView) -> bool:
    """RoPE's rotate_half (cat(-x2, x1)) on data: what is left of rotary positions when a static
    export folded the cos / sin tables into constants."""
    for index, node in enumerate(view.nodes):
        if node.op != "Neg" or not view.data_inputs(index):
            continue
        source = view.producer_node(node.inputs[0])
        if source is not None and source.op in ("Slice", "Split") and any(
                view.nodes[c].op == "Concat" for c in view.consumer_nodes(node.outputs[0])):
            return True
    return False


def _ffn_per_block(units, routers) -> int:
    per_layer = Counter(u.layer for u in units if u.role is Role.FFN)
    for router in routers:
        per_layer[router.layer] += 1
    return max(per_layer.values(), default=0)
