"""Structural searches: attention, routers, the LM head and FFN units.

Structure decides; names never do. Attention is Q·Kᵀ → Softmax → ·V (or a fused attention
op); its q/k/v are the linears reached walking back from Q, K and V, its o-projection the
first linear after the context. A router is a linear whose output reaches TopK. An FFN unit
is an activation with the linear(s) that feed it and the linear it feeds (up/gate → act →
down). Every search works on node indices of ``GraphView``.
"""
from __future__ import annotations

from dataclasses import dataclass

from costlens.roles.graphview import NORM_OPS, GraphView

FUSED_ATTENTION_OPS = {
    # op: (q, k, v input slots); None = q/k/v come packed or the weights are inside
    "com.microsoft.Attention": None,
    "com.microsoft.MultiHeadAttention": (0, 1, 2),
    "com.microsoft.GroupQueryAttention": (0, 1, 2),
    "com.microsoft.PackedAttention": None,
    "com.microsoft.PackedMultiHeadAttention": (0, 1, 2),
    "Attention": (0, 1, 2),
}
# Between Q·Kᵀ and Softmax: scale, mask, softcap, and attention sinks (gpt-oss concatenates a
# learned logit per head, subtracts the row max, and slices the sink column off the probabilities).
SCORE_PATH_OPS = frozenset({"Add", "Div", "Mul", "Sub", "Where", "Cast", "Tanh", "Reshape", "Identity", "Concat"})
PROBS_PATH_OPS = frozenset({"Cast", "Dropout", "Identity", "Reshape", "Where", "Slice"})
# Between a projection and the attention core: head reshapes, RoPE, GQA repeats, splits.
QKV_PATH_OPS = frozenset({
    "Reshape", "Transpose", "Slice", "Split", "Concat", "Neg", "Mul", "Add", "Sub", "Unsqueeze",
    "Squeeze", "Expand", "Cast", "Identity", "Gather", "Tile", "Div", "com.microsoft.RotaryEmbedding",
    "RotaryEmbedding",
    # per-head QK norms (Qwen3, OLMo2, Gemma 3 q_norm / k_norm) as one op; never a fused add+norm,
    # which would lead back into the residual stream
    "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
    "com.microsoft.SimplifiedLayerNormalization", "com.microsoft.LayerNormalization",
})
OUT_PATH_OPS = frozenset({"Transpose", "Reshape", "Cast", "Dropout", "Identity", "Squeeze", "Unsqueeze"})
ROUTER_PATH_OPS = frozenset({"Softmax", "Sigmoid", "Cast", "Add", "Reshape", "Identity", "LogSoftmax", "Div", "Mul"})
# From a projection back to the linear of a low-rank chain: a norm (fused or written out), views
LOW_RANK_PATH_OPS = NORM_OPS | {"Mul", "Div", "Add", "Sub", "Sqrt", "Reciprocal", "Pow", "ReduceMean", "Cast",
                                "Reshape", "Transpose", "Split", "Slice", "Squeeze", "Unsqueeze", "Identity"}
# PhiMoE's sparsemixer between the router and its ArgMax passes: masking of far-off scores
# DeepSeek-V3's group-limited routing between the group top-k and the top-k over all experts:
# group scores summed, the kept groups scattered into a mask, the mask broadcast over the experts
GROUP_ROUTING_OPS = frozenset({"ReduceSum", "ScatterElements", "ScatterND", "Unsqueeze", "Expand", "Reshape", "Where",
                               "Not", "Equal", "Cast", "Mul", "Add", "ConstantOfShape", "Concat", "Shape", "Flatten",
                               "TopK", "Sub", "Greater", "Less"})
GROUP_ROUTING_DEPTH = 16
# From routed ids to the combine matrix that weighs each expert's output (dense dispatch)
COMBINE_PATH_OPS = frozenset({"Concat", "ScatterElements", "Transpose", "Unsqueeze", "Reshape", "Cast", "Identity"})
SPARSEMIXER_OPS = frozenset({"ReduceMax", "Abs", "Max", "Sub", "Div", "Greater", "Where", "ScatterElements"})
HEAD_PATH_OPS = frozenset({"Cast", "Reshape", "Add", "Transpose", "Identity", "Div", "Tanh", "Mul", "Squeeze"})
ACTIVATION_OPS = {
    "Gelu": "gelu", "Relu": "relu", "Sigmoid": "silu", "Erf": "gelu", "Tanh": "tanh",
    "com.microsoft.FastGelu": "gelu_tanh", "com.microsoft.BiasGelu": "gelu", "com.microsoft.QuickGelu": "gelu_quick",
    "Softplus": "softplus", "Mish": "mish", "Elu": "elu", "LeakyRelu": "leaky_relu", "HardSwish": "hard_swish",
    "Selu": "selu", "Celu": "celu",
}
FFN_INNER_OPS = frozenset({
    "Mul", "Add", "Sub", "Div", "Pow", "Tanh", "Erf", "Sigmoid", "Gelu", "Relu", "Split", "Slice", "Cast", "Reshape",
    "Identity", "Dropout", "Softplus", "Neg", "com.microsoft.FastGelu", "com.microsoft.BiasGelu",
    "com.microsoft.QuickGelu", "Mish", "Elu", "LeakyRelu", "HardSwish", "Clip", "Unsqueeze", "Squeeze",
})
# Elementwise ops an activation is written out with (several data inputs, one source linear).
WRITTEN_OUT_OPS = frozenset({"Add", "Mul", "Pow", "Tanh", "Erf", "Sigmoid", "Div", "Sub", "Neg", "Cast", "Clip"})
TRACE_BACK_OPS = frozenset({"Add", "Split", "Slice", "Reshape", "Cast", "Transpose", "Squeeze", "Unsqueeze",
                            "Identity", "Dropout", "Mul", "Div", "Gather", "Clip"})


@dataclass(frozen=True)
class AttentionCore:
    """One attention found in the graph: a Softmax between two activation x activation MatMuls
    (``kind`` "eager") or one fused op (``kind`` its op name without domain, e.g. "Attention")."""

    kind: str                   # "eager" or the fused op's name; node fields index graph.nodes
    score_node: int | None
    softmax_node: int | None
    context_node: int | None
    q: str | None
    k: str | None
    v: str | None
    output: str


class BlockFinder:
    """Searches over a view, given which nodes are linear parameter sites."""

    def __init__(self, view: GraphView, linear_sites: set[int]):
        self.view = view
        self.linear_sites = linear_sites

    # ------------------------------------------------------------------ helpers
    def out_features(self, site: int) -> int | None:
        out = self.view.nodes[site].outputs[0]
        shape = self.view.graph.shape(out)
        if shape and isinstance(shape[-1], int):
            return shape[-1]
        return None

    def walk_back_to_linears(self, tensor: str, allowed: frozenset, depth: int = 40) -> tuple[int, ...]:
        """Linear sites reached walking back from ``tensor`` through ``allowed`` ops (data only)."""
        found, frontier, seen = set(), [(tensor, 0)], set()
        while frontier:
            name, level = frontier.pop()
            index = self.view.producer.get(name)
            if index is None or index in seen or level > depth:
                continue
            seen.add(index)
            if index in self.linear_sites:
                found.add(index)
                continue
            if self.view.nodes[index].op not in allowed:
                continue
            frontier.extend((x, level + 1) for x in self.view.data_inputs(index))
        return tuple(sorted(found))

    def walk_forward_to_linear(self, tensor: str, allowed: frozenset, depth: int = 12) -> tuple[int, ...]:
        found, frontier, seen = set(), [(tensor, 0)], set()
        while frontier:
            name, level = frontier.pop()
            for index in self.view.consumer_nodes(name):
                if index in seen or level > depth:
                    continue
                seen.add(index)
                if index in self.linear_sites:
                    found.add(index)
                    continue
                if self.view.nodes[index].op in allowed:
                    frontier.extend((o, level + 1) for o in self.view.nodes[index].outputs if o)
        return tuple(sorted(found))

    # ------------------------------------------------------------------ attention
    def attention_cores(self) -> list[AttentionCore]:
        cores = []
        for index, node in enumerate(self.view.nodes):
            if node.op == "Softmax":
                core = self._eager_core(index)
            elif node.op in FUSED_ATTENTION_OPS:
                core = self._fused_core(index)
            else:
                continue
            if core is not None:
                cores.append(core)
        return cores

    def _eager_core(self, softmax: int) -> AttentionCore | None:
        score = self._matmul_of_two_data(self.view.nodes[softmax].inputs[0], SCORE_PATH_OPS, backward=True)
        if score is None:
            return None
        context = self._matmul_of_two_data(self.view.nodes[softmax].outputs[0], PROBS_PATH_OPS, backward=False)
        if context is None:
            return None
        q, k = self.view.nodes[score].inputs[:2]
        v = self.view.nodes[context].inputs[1]
        return AttentionCore("eager", score, softmax, context, q, k, v, self.view.nodes[context].outputs[0])

    def _matmul_of_two_data(self, tensor: str, allowed: frozenset, backward: bool, depth: int = 8) -> int | None:
        """The activation×activation MatMul next to a Softmax, through mask/scale ops."""
        frontier = [(tensor, 0)]
        while frontier:
            name, level = frontier.pop(0)
            if level > depth:
                continue
            indices = [self.view.producer.get(name)] if backward else self.view.consumer_nodes(name)
            for index in indices:
                if index is None:
                    continue
                node = self.view.nodes[index]
                if node.op == "MatMul" and index not in self.linear_sites and len(self.view.data_inputs(index)) == 2:
                    return index
                if node.op not in allowed or index in self.linear_sites:
                    continue
                nxt = self.view.data_inputs(index) if backward else [o for o in node.outputs if o]
                frontier.extend((x, level + 1) for x in nxt)
        return None

    def _fused_core(self, index: int) -> AttentionCore:
        node = self.view.nodes[index]
        slots = FUSED_ATTENTION_OPS[node.op]
        inputs = node.inputs + ("",) * 3
        q = k = v = None
        if slots is not None:
            q, k, v = (inputs[s] or None for s in slots)
        if node.op == "com.microsoft.Attention" or k is None:
            q = k = v = inputs[0] or None   # packed qkv (or weights inside the op)
        return AttentionCore(node.op.split(".")[-1], index, None, index, q, k, v, node.outputs[0])

    def with_low_rank(self, sites: tuple[int, ...]) -> tuple[int, ...]:
        """Add the down-projections of low-rank chains: DeepSeek's MLA computes q as
        q_b(norm(q_a(x))) and k, v from kv_b(norm(kv_a(x))). A projection whose input comes,
        through a norm and views only, from one other linear continues that linear."""
        found, frontier = set(sites), list(sites)
        while frontier:
            site = frontier.pop()
            data = self.view.data_inputs(site)
            if not data:
                continue
            behind = self._linears_behind(data[0], 12, set(), LOW_RANK_PATH_OPS)
            if behind and len(behind) == 1 and not behind <= found:
                found |= behind
                frontier.extend(behind)
        return tuple(sorted(found))

    def projections(self, core: AttentionCore) -> tuple[tuple[int, ...], ...]:
        """(q, k, v, o) linear sites of one attention core."""
        if core.kind == "Attention" and core.q is None:
            return (), (), (), ()
        q, k, v = (self.with_low_rank(self.walk_back_to_linears(t, QKV_PATH_OPS)) if t else ()
                   for t in (core.q, core.k, core.v))
        if core.kind == "Attention" and self.view.nodes[core.score_node].op == "com.microsoft.Attention":
            q = k = v = ()   # its weights are inputs of the op itself
        o = self.walk_forward_to_linear(core.output, OUT_PATH_OPS, depth=8)
        return q, k, v, o

    # ------------------------------------------------------------------ routers
    def router_of(self, site: int) -> tuple[int | None, int | None] | None:
        """(TopK node, k) when this linear's output reaches TopK within a few ops. PhiMoE's
        sparsemixer picks its k experts with k ArgMax passes over masked scores instead:
        (the first ArgMax, the number of them)."""
        frontier, seen, argmaxes = [(self.view.nodes[site].outputs[0], 0)], set(), []
        first_topk = None
        while frontier:
            name, level = frontier.pop(0)
            for index in self.view.consumer_nodes(name):
                if index in seen or level > (GROUP_ROUTING_DEPTH if first_topk else 4):
                    continue
                seen.add(index)
                node = self.view.nodes[index]
                if node.op == "TopK":
                    found = (index, self._k_of(index))
                    if self._over_all_experts(index, site):
                        return found
                    # group-limited routing (DeepSeek-V3): a top-k inside each group and a top-k of
                    # groups come first; the experts are picked by the top-k over every expert
                    first_topk = first_topk or found
                    frontier.extend((o, level + 1) for o in node.outputs[:1] if o)
                    continue
                if node.op.endswith("MoE") and node.inputs[1:2] == (name,):
                    return index, node.attr("k")
                if node.op == "ArgMax":
                    argmaxes.append(index)
                    continue
                if index not in self.linear_sites and (node.op in ROUTER_PATH_OPS or node.op in SPARSEMIXER_OPS
                                                       or (first_topk and node.op in GROUP_ROUTING_OPS)):
                    frontier.extend((o, level + 1) for o in node.outputs if o)
        if first_topk is not None:
            return first_topk
        if argmaxes and (self._picks_experts(argmaxes) or self._weighs_experts(argmaxes, site)):
            return min(argmaxes), len(argmaxes)
        return None

    def _k_of(self, topk: int) -> int | None:
        node = self.view.nodes[topk]
        k_value = self.view.graph.small_values.get(node.inputs[1]) if len(node.inputs) > 1 else None
        return k_value[0] if k_value else None

    def _over_all_experts(self, topk: int, site: int) -> bool:
        """Does this TopK choose among all of the router's outputs (its input's last axis is the
        router's width), rather than within a group or among groups? Unknown widths say yes."""
        width = self.out_features(site)
        shape = self.view.graph.shape(self.view.nodes[topk].inputs[0])
        return not width or not shape or not isinstance(shape[-1], int) or shape[-1] == width

    def _picks_experts(self, argmaxes: list[int]) -> bool:
        """Do these ArgMax indices select rows of an expert tensor (not, say, a sampled token)?"""
        outputs = {self.view.nodes[i].outputs[0] for i in argmaxes}
        for gathered in self.view.routed_gathers:
            producer = self.view.producer[gathered]
            frontier, seen = [self.view.nodes[producer].inputs[1]], set()
            while frontier:
                name = frontier.pop()
                if name in outputs:
                    return True
                index = self.view.producer.get(name)
                if index is None or index in seen:
                    continue
                seen.add(index)
                frontier.extend(self.view.data_inputs(index))
        return False

    def _weighs_experts(self, argmaxes: list[int], site: int, depth: int = 8) -> bool:
        """Dense dispatch (every expert on every token, costlens's trace of fused experts): do
        these ArgMax indices scatter the combine matrix [t, E] that weighs the products of a 3-D
        expert tensor [E, ., .] with E = the router's width?"""
        width = self.out_features(site)
        frontier = [(self.view.nodes[i].outputs[0], 0) for i in argmaxes]
        seen: set[int] = set()
        while frontier:
            name, level = frontier.pop()
            for index in self.view.consumer_nodes(name):
                node = self.view.nodes[index]
                if index in seen or level > depth or index in self.linear_sites:
                    continue
                seen.add(index)
                if node.op == "Mul" and width and any(self._is_expert_product(x, width) for x in node.inputs if x != name):
                    return True
                if node.op in COMBINE_PATH_OPS and not (node.op == "ScatterElements" and node.inputs[0] == name):
                    frontier.extend((o, level + 1) for o in node.outputs if o)
        return False

    def _is_expert_product(self, tensor: str, experts: int) -> bool:
        """Is ``tensor`` a linear's product with a 3-D constant of ``experts`` leading rows?"""
        index = self.view.producer.get(tensor)
        if index is None or index not in self.linear_sites:
            return False
        shapes = (self.view.graph.constants[c].shape for c in self.view.constants_at.get(index, ()))
        return any(len(shape) == 3 and shape[0] == experts for shape in shapes)

    def routing_tensors(self, site: int, topk: int | None, depth: int = 10) -> set[str]:
        """Tensors derived from a router's decision (combine weights), not crossing linears."""
        starts = [self.view.nodes[site].outputs[0]]
        if topk is not None:
            starts += [o for o in self.view.nodes[topk].outputs if o]
        found, frontier = set(starts), [(s, 0) for s in starts]
        while frontier:
            name, level = frontier.pop()
            if level >= depth:
                continue
            for index in self.view.consumer_nodes(name):
                if index in self.linear_sites or self.view.nodes[index].op in NORM_OPS:
                    continue
                for out in self.view.nodes[index].outputs:
                    if out and out not in found:
                        found.add(out)
                        frontier.append((out, level + 1))
        return found

    # ------------------------------------------------------------------ head
    def reaches_output(self, site: int) -> bool:
        """Whether the site's output flows to a graph output through HEAD_PATH_OPS nodes only
        (no other linear in between)."""
        # issue 12 (speed): one backward walk from the outputs, shared by every site; a forward
        # walk per site made role location quadratic in depth (residual Adds lead to the output)
        if getattr(self, "_head_reachable", None) is None:
            self._head_reachable = self._tensors_reaching_output()
        return self.view.nodes[site].outputs[0] in self._head_reachable

    def _tensors_reaching_output(self) -> set[str]:
        """Tensors from which a graph output is reached through non-linear HEAD_PATH_OPS nodes."""
        reached = set(self.view.graph.outputs)
        frontier = list(reached)
        while frontier:
            index = self.view.producer.get(frontier.pop())
            if index is None or index in self.linear_sites or self.view.nodes[index].op not in HEAD_PATH_OPS:
                continue
            for name in self.view.nodes[index].inputs:
                if name and name not in reached:
                    reached.add(name)
                    frontier.append(name)
        return reached

    # ------------------------------------------------------------------ FFN
    def trace_to_linear(self, tensor: str, depth: int = 10) -> int | None:
        """The one linear this tensor is computed from through views and elementwise ops. An
        activation written out (GPT-2's tanh-GELU: 0.5·x·(1 + tanh(c·(x + 0.044715·x³)))) mixes
        several branches of the same linear's output; branches of two different linears (a
        gated product) have no single source."""
        found = self._linears_behind(tensor, depth, set())
        return next(iter(found)) if found is not None and len(found) == 1 else None

    def _linears_behind(self, tensor: str, depth: int, seen: set[str],
                        through: frozenset | None = None) -> set[int] | None:
        """Linear sites behind a tensor when every path back ends at one (None if some path ends
        elsewhere). ``through``: ops passed with any number of data inputs (default: views and
        single-input ops, plus the elementwise ops an activation is written out with)."""
        index = self.view.producer.get(tensor)
        if index is None or depth < 0:
            return None
        if index in self.linear_sites:
            return {index}
        if tensor in seen:
            return set()
        seen.add(tensor)
        node = self.view.nodes[index]
        # a routed expert bias (gpt-oss) is a weight that joins the product, not a second source
        data = [x for x in self.view.data_inputs(index) if x not in self.view.routed_gathers]
        if through is not None:
            if not data or node.op not in through:
                return None
        elif not data or (node.op not in TRACE_BACK_OPS and not (node.op in WRITTEN_OUT_OPS and len(data) == 1)):
            return None
        elif len(data) > 1 and node.op not in WRITTEN_OUT_OPS:
            return None
        found: set[int] = set()
        for x in data:
            behind = self._linears_behind(x, depth - 1, seen, through)
            if behind is None:
                return None
            found |= behind
        return found

    def split_branch(self, tensor: str, depth: int = 6) -> str | None:
        """The Split/Slice output this tensor comes from on its way back to a linear, if any."""
        for _ in range(depth):
            index = self.view.producer.get(tensor)
            if index is None or index in self.linear_sites:
                return None
            if self.view.nodes[index].op in ("Split", "Slice"):
                return tensor
            data = self.view.data_inputs(index)
            if len(data) != 1:
                return None
            tensor = data[0]
        return None

    def ffn_unit_at(self, activation: int, claimed: set[int]):
        """(first linear, other linears multiplied in, fused gate_up?, down linear) around one
        activation, or None. The walk forward stops at the first linears (the down) and at
        adds of two different streams (a residual)."""
        node = self.view.nodes[activation]
        first = self.trace_to_linear(node.inputs[0])
        if first is None or first in claimed:
            return None
        own_branch = self.split_branch(node.inputs[0])
        ups: set[int] = set()
        fused = False
        downs: set[int] = set()
        frontier, seen = [(o, 0) for o in node.outputs if o], {activation}
        while frontier:
            name, level = frontier.pop()
            for index in self.view.consumer_nodes(name):
                if index in seen or level > 12:
                    continue
                seen.add(index)
                if index in self.linear_sites:
                    downs.add(index)
                    continue
                inner = self.view.nodes[index]
                if inner.op not in FFN_INNER_OPS:
                    continue
                others = [x for x in self.view.data_inputs(index) if x != name]
                if inner.op == "Add" and others and self.trace_to_linear(others[0]) != first:
                    continue   # a residual or an accumulation: the unit ended before this
                if inner.op == "Mul":
                    for other in others:
                        up = self.trace_to_linear(other)
                        if up is not None and up != first:
                            ups.add(up)
                        elif up == first and self.split_branch(other) not in (None, own_branch):
                            fused = True
                frontier.extend((o, level + 1) for o in inner.outputs if o)
        downs -= claimed
        if len(downs) != 1:
            return None
        return first, tuple(sorted(ups)), fused, next(iter(downs))
