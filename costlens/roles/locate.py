"""locate_roles(graph) -> RoleMap: every parameter use gets exactly one role and a layer.

Order of the search: classify parameter sites (params.py); find attention cores and their
projections, routers and the LM head; group the remaining linears into FFN units around
their activations; split units into FFN / experts / shared experts by whether a router's
decision weighs their output; label layers from the residual stream (layers.py); finally
turn sites into ParamUse records, counting a deduplicated constant once per use.
"""
from __future__ import annotations

from collections import Counter

from costlens.errors import StructureError
from costlens.ir import Graph
from costlens.roles.blocks import ACTIVATION_OPS, BlockFinder
from costlens.roles.graphview import NORM_OPS, GraphView
from costlens.roles.layers import is_norm_output, is_post_norm, label_layers, residual_entry, stream_before_norm
from costlens.roles.params import ParamSite, SiteKind, classify_sites
from costlens.roles.streams import refuse_two_streams
from costlens.roles.summary import summarize
from costlens.roles.types import AttentionBlock, FFNUnit, ParamUse, Role, RoleMap, Router

# ops inside a head transform besides norms and activations: a bias add, casts, a softcap
HEAD_TRANSFORM_OPS = frozenset({"Add", "Cast", "Identity", "Mul", "Div", "Tanh"})


def locate_roles(graph: Graph, require_attention: bool = True) -> RoleMap:
    """Every parameter use with one role and a layer. A graph with no attention is refused
    unless ``require_attention`` is False (small test graphs, plain MLPs)."""
    view = GraphView(graph)
    sites = classify_sites(view)
    linear_sites = {s.site.node for group in sites.values() for s in group if s.kind is SiteKind.LINEAR}
    norm_sites = {s.site.node for group in sites.values() for s in group if s.kind is SiteKind.NORM}
    finder = BlockFinder(view, linear_sites)

    site_role: dict[int, tuple[Role, str]] = {}      # linear node -> (role, kind)
    cores = sorted(finder.attention_cores(), key=lambda c: c.score_node or 0)
    if not cores and require_attention:
        raise StructureError(f"{graph.source}: no attention found (no Q·Kᵀ → Softmax → ·V and no fused attention op)")
    refuse_two_streams(view, cores)
    projections = [finder.projections(core) for core in cores]
    for q, k, v, o in projections:
        _mark_attention(site_role, q, k, v, o)

    head_sites = [s for s in sorted(linear_sites - set(site_role)) if finder.reaches_output(s)]
    for site in head_sites:
        site_role[site] = (Role.LM_HEAD, "weight")
    head_stream, transforms, head_norms = _head_transform(view, head_sites, linear_sites - set(site_role))
    for site in transforms:
        site_role[site] = (Role.LM_HEAD, "transform")

    routers = _find_routers(finder, linear_sites, site_role)
    units = _find_ffn_units(finder, view, site_role)

    entries, tail = _layer_entries(view, cores, projections, head_stream, norm_sites)
    labels = label_layers(view, entries, tail)
    n_layers = len(cores)

    def layer_of(node: int) -> int | None:
        label = labels[node]
        return label if 0 <= label < n_layers else None

    routed_layers = {layer_of(r[0]) for r in routers}
    routing = set().union(*(finder.routing_tensors(site, topk) for site, topk, _, _ in routers)) if routers else set()
    ffn_units = [_classify_unit(finder, view, u, routing, routed_layers, layer_of) for u in units]
    for unit in ffn_units:
        _mark_unit(site_role, unit)
    _claim_expert_gates(finder, view, site_role, ffn_units, linear_sites)

    norm_role = _norm_roles(norm_sites, head_norms, labels, n_layers)
    params, buffers = _param_uses(view, sites, site_role, layer_of, norm_role)
    attentions = tuple(_attention_block(finder, view, core, proj, layer_of) for core, proj in zip(cores, projections))
    router_info = tuple(Router(layer_of(s), s, t, finder.out_features(s) or 0, k) for s, t, k, _ in routers)
    architecture = summarize(view, params, attentions, router_info, ffn_units, entries, norm_sites)
    return RoleMap(
        params=tuple(params), architecture=architecture, attentions=attentions, routers=router_info,
        ffn_units=tuple(ffn_units),
        node_layers=tuple(layer_of(i) for i in range(len(view.nodes))),
        buffers=tuple(sorted(buffers)),
        unmatched=tuple(p.key for p in params if p.role is Role.OTHER),
        warnings=graph.warnings,
    )


# --------------------------------------------------------------------------- marking

def _mark_attention(site_role, q, k, v, o) -> None:
    for site in set(q) | set(k) | set(v):
        parts = "".join(name for name, group in (("q", q), ("k", k), ("v", v)) if site in group)
        site_role[site] = (Role.ATTENTION, parts)
    for site in o:
        site_role.setdefault(site, (Role.ATTENTION, "o"))


def _find_routers(finder: BlockFinder, linear_sites, site_role):
    routers = []
    for site in sorted(linear_sites - set(site_role)):
        found = finder.router_of(site)
        if found is not None:
            topk, k = found
            site_role[site] = (Role.ROUTER, "router")
            routers.append((site, topk, k, finder.out_features(site)))
    return routers


def _find_ffn_units(finder: BlockFinder, view: GraphView, site_role):
    units, claimed = [], set(site_role)
    for index, node in enumerate(view.nodes):
        if node.op not in ACTIVATION_OPS:
            continue
        found = finder.ffn_unit_at(index, claimed)
        if found is None:
            continue
        first, ups, fused, down = found
        activation = ACTIVATION_OPS[node.op]
        if node.op == "Gelu" and node.attr("approximate", "none") == "tanh":
            activation = "gelu_tanh"
        elif node.op == "Tanh" and _cubed_behind(view, node.inputs[0]):
            activation = "gelu_tanh"      # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) written out
        units.append((first, ups, fused, down, activation))
        claimed.update((first, down, *ups))
    return units


def _cubed_behind(view: GraphView, tensor: str, depth: int = 4) -> bool:
    """Is a Pow (the x³ of a written-out tanh GELU) among the few ops before this tensor?"""
    frontier = [(tensor, 0)]
    while frontier:
        name, level = frontier.pop()
        node = view.producer_node(name)
        if node is None or level > depth:
            continue
        if node.op == "Pow":
            return True
        frontier.extend((x, level + 1) for x in view.data_inputs(view.producer[name]))
    return False


def _classify_unit(finder, view, unit, routing, routed_layers, layer_of) -> FFNUnit:
    first, ups, fused, down, activation = unit
    gated = bool(ups) or fused
    layer = layer_of(down)
    weighted_by_router = any(
        view.nodes[i].op == "Mul" and any(x in routing for x in view.nodes[i].inputs)
        for i in _consumers_through(view, view.nodes[down].outputs[0], {"Add", "Cast", "Reshape"})
    )
    three_d = any(_weight_rank(view, s) == 3 for s in (first, down, *ups))
    if weighted_by_router or three_d:
        role = Role.EXPERTS
    elif layer in routed_layers:
        role = Role.SHARED_EXPERTS
    else:
        role = Role.FFN
    gate_sites = (first,) if gated else ()
    up_sites = ups if gated else (first,)
    if fused:
        gate_sites, up_sites = (), (first,)
    return FFNUnit(layer, role, tuple(up_sites), tuple(gate_sites), down,
                   f"{activation} (gated)" if gated else activation)


def _consumers_through(view: GraphView, tensor: str, through: set[str], depth: int = 3) -> list[int]:
    found, frontier = [], [(tensor, 0)]
    while frontier:
        name, level = frontier.pop()
        for index in view.consumer_nodes(name):
            found.append(index)
            node = view.nodes[index]
            if level < depth and node.op in through and not any(
                    x != name and view.is_data(x) for x in node.inputs if x):
                frontier.extend((o, level + 1) for o in node.outputs if o)
    return found


def _weight_rank(view: GraphView, site: int) -> int | None:
    ranks = [len(view.graph.constants[c].shape) for c in view.constants_at.get(site, ())]
    return max(ranks) if ranks else None


def _mark_unit(site_role, unit: FFNUnit) -> None:
    fused = not unit.gate_sites and unit.activation.endswith("(gated)")
    for site in unit.gate_sites:
        site_role[site] = (unit.role, "gate")
    for site in unit.up_sites:
        site_role[site] = (unit.role, "gate_up" if fused else "up")
    site_role[unit.down_site] = (unit.role, "down")


def _claim_expert_gates(finder, view, site_role, units, linear_sites) -> None:
    """A d→1 linear whose sigmoid scales a unit's output (Qwen-MoE's shared-expert gate)."""
    downs = {u.down_site: u for u in units}
    for site in sorted(linear_sites - set(site_role)):
        for index in _consumers_through(view, view.nodes[site].outputs[0], {"Sigmoid", "Cast", "Softmax"}):
            node = view.nodes[index]
            if node.op != "Mul":
                continue
            for other in view.data_inputs(index):
                unit = downs.get(finder.trace_to_linear(other))
                if unit is not None:
                    site_role[site] = (unit.role, "gate_scale")


# --------------------------------------------------------------------------- layers

def _head_transform(view: GraphView, head_sites: list[int],
                    free_linears: set[int]) -> tuple[str | None, list[int], list[int]]:
    """(the stream tensor the head reads, the linears of a head transform before it, the norms
    inside that transform). BERT's MLM
    head runs dense → GELU → LayerNorm before the decoder: those linears belong to the head.
    The walk back from the head's input stops at a norm of the residual stream (an add of two
    streams), which ends the last layer. A walk that never meets one (it reaches the graph's
    input: a plain MLP, no residual stream) found the model's own layers, not a head transform."""
    if not head_sites:
        return None, [], []
    tensor = _before_views(view, view.data_inputs(head_sites[0])[0])
    transforms: list[int] = []
    norms: list[int] = []
    ends_at_stream = False
    for _ in range(12):
        index = view.producer.get(tensor)
        if index is None:
            break
        node = view.nodes[index]
        data = view.data_inputs(index)
        if node.op in NORM_OPS and data and _is_residual_sum(view, data[0]):
            ends_at_stream = True
            break
        if index in free_linears:
            transforms.append(index)
        elif len(data) != 1 or not (node.op in NORM_OPS or node.op in ACTIVATION_OPS or node.op in HEAD_TRANSFORM_OPS):
            break
        elif node.op in NORM_OPS:
            norms.append(index)
        tensor = _before_views(view, data[0])
    if not transforms or not ends_at_stream:
        return _before_views(view, view.data_inputs(head_sites[0])[0]), [], []
    return tensor, transforms, norms


def _norm_roles(norm_sites: set[int], head_norms: list[int], labels: list[int], n_layers: int) -> dict:
    """Norm sites whose use is not a plain NORM. A norm inside the head transform (BERT's
    cls.predictions.transform.LayerNorm, between the transform dense and the decoder) is part of
    the head: ``--train head`` trains it, as PEFT's modules_to_save=["cls"] does. A norm before the
    first block (BERT's embeddings LayerNorm, BLOOM's word_embeddings_layernorm) normalizes the
    embeddings: it stays a norm, with kind "embed_norm" so that ``embed`` selects it too (left
    trainable under a frozen embedding it would force a backward through every frozen block)."""
    roles = {site: (Role.LM_HEAD, "norm") for site in head_norms}
    if n_layers:
        roles.update({site: (Role.NORM, "embed_norm") for site in norm_sites
                      if labels[site] < 0 and site not in roles})
    return roles


def _is_residual_sum(view: GraphView, tensor: str) -> bool:
    node = view.producer_node(tensor)
    return node is not None and node.op == "Add" and len(view.data_inputs(view.producer[tensor])) == 2


def _layer_entries(view, cores, projections, head_input, norm_sites):
    entries = []
    for core, (q, k, v, o) in zip(cores, projections):
        entry = residual_entry(view, o[0]) if o else None
        if entry is None:
            first_input = min(q + k + v, default=None)
            entry = view.data_inputs(first_input)[0] if first_input is not None else core.q
        entries.append(entry)
    tail = None
    if head_input is not None:
        post_norm = is_post_norm(view, entries, norm_sites)
        tail = head_input
        if not post_norm and is_norm_output(view, head_input, norm_sites):
            tail = stream_before_norm(view, head_input)
    return entries, tail


def _before_views(view: GraphView, tensor: str, depth: int = 4) -> str:
    """Walk back through reshapes and casts (torch.onnx flattens the head's input to 2-D)."""
    for _ in range(depth):
        node = view.producer_node(tensor)
        data = view.data_inputs(view.producer[tensor]) if node is not None else []
        if node is None or node.op not in ("Reshape", "Cast", "Identity", "Flatten") or len(data) != 1:
            return tensor
        tensor = data[0]
    return tensor


# --------------------------------------------------------------------------- params

def _param_uses(view: GraphView, sites: dict[str, list[ParamSite]], site_role, layer_of, norm_role=None):
    params: list[ParamUse] = []
    buffers: set[str] = set()
    keyed: set[str] = set()          # constants that already have a use (was a scan of params per use)
    for name, group in sites.items():
        const = view.graph.constants[name]
        uses = [s for s in group if s.kind is not SiteKind.BUFFER]
        if not uses:
            buffers.add(name)
            continue
        token_use = next((u for u in uses if u.kind is SiteKind.EMBED_TOKEN), None)
        seen_nodes = Counter()
        for n, use in enumerate(uses):
            node_index = use.site.node
            seen_nodes[node_index] += 1
            if seen_nodes[node_index] > 1:
                continue   # the same constant twice into one node is one use
            role, kind = _role_of(use, site_role)
            if use.kind is SiteKind.NORM and norm_role and node_index in norm_role:
                role, kind = norm_role[node_index]
            tied = None
            count = const.n_elements
            if token_use is not None and use is not token_use and role is Role.LM_HEAD:
                tied, count = name, 0
            key = name if name not in keyed else f"{name}#{n}"
            keyed.add(name)
            params.append(ParamUse(
                key=key, constant=name, role=role, kind=kind, layer=layer_of(node_index), n_params=count,
                shape=const.shape, site=view.nodes[node_index].name, hint=view.nodes[node_index].scope,
                tied_to=tied, n_experts=const.shape[0] if role is Role.EXPERTS and len(const.shape) == 3 else 0,
                via=None if use.site.via is None else view.nodes[use.site.via].name,
            ))
    return params, buffers


def _role_of(use: ParamSite, site_role) -> tuple[Role, str]:
    kind = use.kind
    if kind is SiteKind.LINEAR:
        return site_role.get(use.site.node, (Role.OTHER, "weight"))
    if kind is SiteKind.BIAS:
        role, _ = site_role.get(use.linear_node, (Role.OTHER, "weight"))
        return role, "bias"
    fixed = {
        SiteKind.EMBED_TOKEN: (Role.EMBEDDING, "token"),
        SiteKind.EMBED_POSITION: (Role.EMBEDDING, "position"),
        SiteKind.NORM: (Role.NORM, "norm"),
        SiteKind.EXPERT_GATHER: (Role.EXPERTS, "expert_weight"),
        SiteKind.EXPERT_BIAS: (Role.EXPERTS, "bias"),
        SiteKind.FUSED_ATTENTION: (Role.ATTENTION, "qkv"),
        SiteKind.FUSED_MOE: (Role.EXPERTS, "expert_weight"),
        SiteKind.ATTENTION_SINK: (Role.ATTENTION, "sink"),
    }
    return fixed.get(kind, (Role.OTHER, "unknown"))


def _attention_block(finder, view, core, projection, layer_of) -> AttentionBlock:
    q, k, v, o = projection
    heads = kv_heads = head_dim = None
    node = view.nodes[core.score_node]
    if core.kind == "eager":
        q_shape = view.graph.shape(core.q)
        if q_shape and len(q_shape) == 4 and isinstance(q_shape[1], int) and isinstance(q_shape[3], int):
            heads, head_dim = q_shape[1], q_shape[3]
    else:
        heads = node.attr("num_heads")
        kv_heads = node.attr("kv_num_heads")
    if head_dim is None and heads and q:
        width = finder.out_features(q[0])
        packed = set(q) & set(k)
        # a packed projection holds q (heads) and k, v (kv heads each)
        parts = heads + 2 * (kv_heads or heads) if packed else heads
        head_dim = width // parts if width else None
    if kv_heads is None and head_dim and k and not set(k) & set(q):
        width = finder.out_features(k[0])
        kv_heads = width // head_dim if width else None
    elif kv_heads is None and set(k) & set(q):
        kv_heads = heads
    return AttentionBlock(
        layer=layer_of(core.score_node), kind=core.kind, score_node=core.score_node,
        softmax_node=core.softmax_node, context_node=core.context_node, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, q_sites=q, k_sites=k, v_sites=v, o_sites=o,
    )
