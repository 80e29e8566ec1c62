"""Which storages autograd keeps for backward in one training step, and their sizes.

The per-op rules (ops/registry.py, read through ops/saved.py) name tensors; this module maps
them to storages (views share their base's storage), sizes them at the plan's batch and seq
and precision, and adds what the graph does not show: LoRA's inner products and dropped
copies, training dropout's masks, a fused attention kernel's statistics, routed MoE's
per-expert copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from costlens.gradients import StepAnalysis
from costlens.ir import FLOAT_DTYPES, Node
from costlens.ops.autocast import AUTOCAST_FP32, AUTOCAST_HALF, INT_BYTES, autocast_casts, autocast_dtypes
from costlens.ops.moe import INDEX_BYTES
from costlens.ops.saved import Extra, saved_by
from costlens.plans import Plan, Setup
from costlens.roles.dropout import dropout_points
from costlens.shapes import eval_shape, numel

VIEW_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Split",
                      "Expand", "Dropout"})


FLOAT_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8e4m3fn": 1, "float8e5m2": 1}
HALF_DTYPES = frozenset({"bfloat16", "float16"})


def runs_half(model) -> bool:
    """Whether most parameter elements of the model's graph are bf16 / fp16: a graph traced
    from a half model, or a half export, whose float32 tensors are the code's own upcasts."""
    by_dtype: dict[str | None, int] = {}
    for use in model.roles.params:
        dtype = model.graph.dtype(use.constant)
        by_dtype[dtype] = by_dtype.get(dtype, 0) + use.n_params
    half = sum(n for dtype, n in by_dtype.items() if dtype in HALF_DTYPES)
    return half * 2 > sum(by_dtype.values())


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor under a precision recipe (``Precision.of``)."""

    weight: int          # bytes per weight (and gradient)
    activation: int      # bytes per activation element
    state: int           # bytes per optimizer-state element
    master: int          # bytes of master copy per trainable parameter
    mixed: bool
    autocast: bool = False   # torch.autocast on fp32 weights: each op picks its own dtype

    @property
    def adapter(self) -> int:
        """Bytes per LoRA adapter element (and its gradient): PEFT keeps adapters fp32 on a pure
        bf16 base (``autocast_adapter_dtype``); "-mixed" casts every parameter to half."""
        return self.weight if self.master else 4

    @property
    def fp32_adapters_on_half_base(self) -> bool:
        """Pure half weights with PEFT's default fp32 adapters: PEFT casts each adapted input to
        fp32 first, so the adapter's products and what they keep are fp32."""
        return self.adapter == 4 and self.activation == 2 and not self.autocast

    @property
    def adapter_state(self) -> int:
        """Bytes per optimizer-state element of an adapter: the adapter's own dtype, or fp32."""
        return max(self.state, self.adapter)

    @staticmethod
    def of(name: str) -> "Precision":
        if name == "fp32":
            return Precision(4, 4, 4, 0, False)
        if name == "bf16":
            return Precision(2, 2, 2, 0, False)
        if name.endswith("-autocast"):
            # the HF Trainer's bf16=True / fp16=True: weights, gradients and AdamW stay fp32 with
            # no master copy; matmuls run on half copies of their operands (autocast_dtypes)
            return Precision(4, 2, 4, 0, True, True)
        return Precision(2, 2, 4, 4, True)      # bf16-mixed / fp16-mixed: half weights, fp32 master and state


class StorageContext:
    """The SavedContext the per-op rules read, over one StepAnalysis."""

    def __init__(self, analysis: StepAnalysis, precision: Precision, device: str = "cuda",
                 attention: str = "eager", experts_impl: str = "eager"):
        self.analysis = analysis
        self.attention = attention
        self.mask_bytes = 1 if device == "cuda" else precision.activation   # dropout masks
        self.graph = analysis.model.graph
        self.precision = precision
        self.device = device
        # torch._grouped_mm is on no autocast list: transformers runs it in the expert weights' dtype
        self.autocast_unlisted = frozenset(
            u.site for u in analysis.model.roles.params if u.n_experts) \
            if precision.autocast and experts_impl == "grouped_mm" else frozenset()
        self.autocast_bytes = autocast_dtypes(self.graph, analysis.weights, device, self.autocast_unlisted) \
            if precision.autocast else {}
        # A graph of a half model (traced in bf16, or an fp16 export) shows the fp32 islands its
        # code upcasts to: with half weights those dtypes are what runs; with fp32 weights every
        # float is fp32 and a cast between float dtypes returns its input (a view, no storage).
        half_graph = runs_half(analysis.model)
        self.graph_dtypes = half_graph and precision.weight == 2
        self.float_casts_are_views = half_graph and precision.weight == 4
        self.safe_softmax = safe_softmax_guards(self.graph)
        self.fused_inner = silu_sigmoid_outputs(self.graph) | rsqrt_sqrt_outputs(self.graph) | set(self.safe_softmax)
        self.consumers = self.graph.consumer_indices       # tensor -> reading node indices (the graph's index)
        self._index = self.graph.node_index
        self._producer = self.graph.producers
        self._receives: set[str] | None = None
        # a fused kernel writes its output [b, s, h, d]-ordered and returns the [b, h, s, d]
        # transpose of it, so HF's transpose(1, 2).reshape(b, s, h·d) after it is a view
        self.kernel_blocks = kernel_blocks(analysis.model, self._producer) if fused_kernel(attention) else ()
        self.kernel_outputs = {self.graph.nodes[block.context_node].outputs[0] for block in self.kernel_blocks}

    @cached_property
    def routed(self) -> dict[int, tuple[float, str, int]]:
        """``routed_expert_nodes`` of this analysis, computed once for the whole estimate."""
        return routed_expert_nodes(self.analysis)

    def needs(self, tensor: str) -> bool:
        return self.analysis.needs(tensor)

    def receives(self, tensor: str) -> bool:
        """It gets a gradient from the loss in backward (needs one and a consumer passes one back)."""
        if self._receives is None:
            analysis = self.analysis
            found = {o for o in self.graph.outputs if analysis.needs(o)}
            for index in range(len(self.graph.nodes) - 1, -1, -1):
                if analysis.runs_backward[index]:
                    found.update(x for x in self.graph.nodes[index].inputs if x and analysis.needs(x))
            self._receives = found
        return tensor in self._receives

    def is_weight(self, tensor: str) -> bool:
        return tensor in self.analysis.weights

    def trains(self, node: Node) -> bool:
        """Its weight needs a gradient: the weight trains, or LoRA re-parametrizes it (3-D experts)."""
        index = self._index[node.name]
        return index in self.analysis.trainable_sites or index in self.analysis.tensor_adapters_at

    def is_fused_inner(self, tensor: str) -> bool:
        return tensor in self.fused_inner

    def rows(self, tensor: str) -> int:
        shape = self.shape(tensor)
        return numel(shape) // shape[-1] if shape else 0

    def stat_bytes(self) -> int:
        return 4

    def act_bytes(self, op: str = "") -> int:
        """Bytes per element of an activation ``op`` produces (fp32 where autocast runs it in fp32)."""
        if self.precision.autocast and self.device != "cuda":
            return 2 if op in AUTOCAST_HALF else 4      # CPU autocast: only matmuls drop to half
        return 4 if self.precision.mixed and op in AUTOCAST_FP32 else self.precision.activation

    def fused_attention(self) -> bool:
        return fused_kernel(self.attention)

    def weight_bytes(self) -> int:
        return self.precision.weight

    def shape(self, tensor: str):
        return eval_shape(self.graph.shape(tensor), self.analysis.bindings)

    def element_bytes(self, tensor: str) -> int:
        dtype = self.graph.dtype(tensor) or "float32"
        if dtype in INT_BYTES:
            return INT_BYTES[dtype]
        if self.autocast_bytes:
            return self.autocast_bytes.get(tensor, 4)
        if self.graph_dtypes:
            return FLOAT_BYTES.get(dtype, self.precision.activation)
        producer = self.producer(tensor)
        if self.precision.mixed and producer is not None and producer.op in AUTOCAST_FP32:
            return 4
        return self.precision.activation

    def producer(self, tensor: str) -> Node | None:
        return self._producer.get(tensor)

    def storage(self, tensor: str) -> str:
        """The tensor whose storage this one shares (views), else itself."""
        current = self.safe_softmax.get(tensor, tensor)
        while True:
            node = self.producer(current)
            if node is not None and node.op == "Cast" and self._cast_is_view(node):
                current = node.inputs[0]
                continue
            if node is None or node.op not in VIEW_OPS or not node.inputs[0]:
                return current
            base = self.producer(node.inputs[0])
            if node.op == "Reshape" and base is not None and base.op in ("Transpose", "Expand") \
                    and not (base.op == "Transpose" and base.inputs[0] in self.kernel_outputs):
                return current            # reshaping a non-contiguous tensor copies it
            current = node.inputs[0]

    def _cast_is_view(self, node: Node) -> bool:
        """``x.to(dtype)`` returns ``x`` itself when x already has that dtype as it runs: with
        fp32 weights, a half graph's casts between float dtypes (HF's upcasts) do nothing."""
        source, target = self.graph.dtype(node.inputs[0]), self.graph.dtype(node.outputs[0])
        if source not in FLOAT_DTYPES or target not in FLOAT_DTYPES:
            return False
        return source == target or self.float_casts_are_views

    def bmm_copy_bytes(self, node: Node, tensor: str) -> int | None:
        """Bytes of the copy of ``tensor`` that a batched product keeps, or None when it keeps the
        tensor's own storage. torch.matmul runs a batched product as bmm on [batch·heads, m, k]
        reshapes of its operands: an operand with fewer batch elements than the output is
        expanded first (multi-query K / V: one head broadcast to all), and one whose batch dims
        a transpose has permuted (GPT-2's v = split(qkv) viewed [b, h, s, d]) cannot be viewed
        so; both are copied, at the output's batch size, and the copy is what bmm saves."""
        shape, out = self.shape(tensor), self.shape(node.outputs[0])
        other = [x for x in node.inputs[:2] if x != tensor]
        if node.op != "MatMul" or not shape or not out or len(shape) < 3 or len(out) < 3:
            return None
        if other and len(self.shape(other[0]) or ()) < 3:
            return None                  # a 3-D activation times a 2-D weight folds into one mm
        batch = numel(out[:-2])
        if batch == numel(shape[:-2]) and not self._batch_permuted(tensor):
            return None
        return batch * shape[-2] * shape[-1] * self.element_bytes(tensor)

    def _batch_permuted(self, tensor: str) -> bool:
        current = self.safe_softmax.get(tensor, tensor)
        while current != self.storage(current):
            node = self.producer(current)
            perm = node.attrs.get("perm") if node.op == "Transpose" else None
            if perm is not None and list(perm[:len(perm) - 2]) != list(range(len(perm) - 2)):
                return True
            current = node.inputs[0]
        return False

    def nbytes(self, tensor: str) -> int:
        shape = self.shape(tensor)
        return numel(shape) * self.element_bytes(tensor) if shape is not None else 0


def _users(graph) -> dict[str, list[Node]]:
    users: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for name in node.inputs:
            users.setdefault(name, []).append(node)
    return users


def safe_softmax_guards(graph) -> dict[str, str]:
    """Where(IsNaN(p), 0, p) over a softmax output p, the NaN guard torch.export writes for
    ``_safe_softmax`` (fully masked rows): torch runs it as one op that keeps its one output.
    Maps each guard's output to the softmax output whose storage stands for it."""
    producer = graph.producers
    found = {}
    for node in graph.nodes:
        if node.op != "Where" or len(node.inputs) < 3:
            continue
        condition = producer.get(node.inputs[0])
        softmax = producer.get(node.inputs[2])
        if condition is not None and condition.op == "IsNaN" and softmax is not None \
                and softmax.op == "Softmax" and condition.inputs[0] == node.inputs[2]:
            found[node.outputs[0]] = node.inputs[2]
    return found


def rsqrt_sqrt_outputs(graph) -> set[str]:
    """Sqrt outputs used only by a Reciprocal: torch runs 1 / sqrt(x) as one rsqrt, which keeps
    only its result."""
    users = _users(graph)
    return {n.outputs[0] for n in graph.nodes
            if n.op == "Sqrt" and [u.op for u in users.get(n.outputs[0], [])] == ["Reciprocal"]}


def silu_sigmoid_outputs(graph) -> set[str]:
    """Sigmoid outputs used only as x * sigmoid(x): torch runs that as one silu."""
    found = set()
    users = _users(graph)
    for node in graph.nodes:
        if node.op != "Sigmoid":
            continue
        x, y = node.inputs[0], node.outputs[0]
        uses = users.get(y, [])
        if uses and all(u.op == "Mul" and set(u.inputs) == {x, y} for u in uses):
            found.add(y)
    return found


# --------------------------------------------------------------------------- saved storages

@dataclass
class SavedStorage:
    """One storage autograd keeps for backward: its size in bytes and the node (index) whose
    backward is the last to read it, after which it is freed."""

    n_bytes: int
    release: int          # node index whose backward is the last to need it


def _add(saved: dict, key: str, n_bytes: int, release: int) -> None:
    if key in saved:
        saved[key].release = min(saved[key].release, release)
    else:
        saved[key] = SavedStorage(n_bytes, release)


def fused_kernel(attention: str) -> bool:
    """The attention core runs as one kernel that keeps no seq x seq tensor. "sdpa": torch
    picks its flash kernel for HF's call (causal, no mask tensor) on the CPU
    (``_scaled_dot_product_flash_attention_for_cpu``) as on CUDA."""
    return attention in ("fused", "sdpa")


def _unrepeated(producer: dict[str, Node], tensor: str) -> str:
    """K or V before HF's repeat_kv (unsqueeze, expand, reshape): SDPA with enable_gqa reads
    the kv heads as they are and never makes the repeated copy."""
    current, found = tensor, tensor
    while (node := producer.get(current)) is not None and node.op in ("Transpose", "Reshape", "Expand", "Unsqueeze"):
        current = node.inputs[0]
        if node.op == "Expand":
            found = current
    if found != tensor and producer.get(found) is not None and producer[found].op == "Unsqueeze":
        found = producer[found].inputs[0]
    return found


def kernel_blocks(model, producer: dict[str, Node] | None = None) -> tuple:
    """The attention blocks a fused kernel (flash / memory-efficient SDPA) runs: the written-out
    ones, except where K/V heads are broadcast (``_broadcast_kv_heads``: torch's math path).
    ``producer``: tensor -> producing node, when the caller has the map already."""
    graph = model.graph
    producer = producer if producer is not None else graph.producers
    return tuple(block for block in model.roles.attentions if block.kind == "eager"
                 and not _broadcast_kv_heads(graph, producer, graph.nodes[block.score_node]))


def _broadcast_kv_heads(graph, producer: dict[str, Node], score: Node) -> bool:
    """Fewer K heads than Q heads reach the score product with no repeat in between (Falcon's
    multi-query attention broadcasts its one K/V head): HF passes them to SDPA as they are,
    without enable_gqa, and torch then runs its math fallback, which keeps the scores, the
    probabilities and expanded copies of K and V as eager attention does (measured: the same
    step-2 peak as eager on the real Falcon module)."""
    q_shape, k_shape = graph.shape(score.inputs[0]), graph.shape(score.inputs[1])
    if not q_shape or not k_shape or len(q_shape) != 4 or len(k_shape) != 4:
        return False
    heads_q, heads_k = q_shape[1], k_shape[1]
    return isinstance(heads_q, int) and isinstance(heads_k, int) and heads_k < heads_q \
        and _unrepeated(producer, score.inputs[1]) == score.inputs[1]


def _fused_attention_nodes(analysis: StepAnalysis, ctx: StorageContext) -> dict[int, list]:
    """With a fused kernel (flash / memory-efficient SDPA) no seq x seq tensor is kept:
    the core saves q, k, v (the kv heads, unrepeated), its output and a per-row logsumexp."""
    replaced: dict[int, list] = {}
    graph, producer = analysis.model.graph, ctx._producer
    for block in ctx.kernel_blocks:     # others are priced as written (SDPA's math path)
        score, context = graph.nodes[block.score_node], graph.nodes[block.context_node]
        q, k = score.inputs[0], _unrepeated(producer, score.inputs[1])
        v, out = _unrepeated(producer, context.inputs[1]), context.outputs[0]
        for index in range(block.score_node, block.context_node + 1):
            replaced.setdefault(index, [])
        lse = (block.heads or 1) * analysis.bindings["batch"] * analysis.bindings["seq"] * 4
        replaced[block.context_node] = [q, k, v, out, Extra(f"lse@{context.name}", lse)]
    return replaced


def routed_expert_nodes(analysis: StepAnalysis) -> dict[int, tuple[float, str, int]]:
    """Nodes computing inside a dense-form expert unit, with the share of tokens routed
    execution gives each expert (k / E), the unit's name and how many experts it holds (E for a
    unit of 3-D expert tensors, 1 for one expert's linears). Empty unless dispatch is routed."""
    if not analysis.expert_share:
        return {}
    graph = analysis.model.graph
    producer = graph.producer_index
    inside: dict[int, tuple[float, str, int]] = {}
    three_d = {u.site: u.n_experts for u in analysis.model.roles.params if u.n_experts}
    index_of = graph.node_index
    stacked = {index_of[site]: n for site, n in three_d.items()}
    sites = param_sites(analysis)
    consumers = graph.consumer_indices
    for unit in analysis.model.roles.ffn_units:
        share = analysis.expert_share.get(unit.down_site)
        if share is None:
            continue
        copies = stacked.get(unit.down_site, 1)     # one unit holding E experts gathers E inputs
        first = set(unit.up_sites) | set(unit.gate_sites)
        members = first | {unit.down_site}
        for index in range(min(first) + 1, unit.down_site):     # between the unit's first linears and its down
            if any(producer.get(x) in members for x in graph.nodes[index].inputs if x):
                members.add(index)
        members.update(_expert_tail(graph, consumers, sites, unit.down_site))
        for index in members:
            inside[index] = (share, graph.nodes[unit.down_site].name, copies)
    return inside


def collect_saved(analysis: StepAnalysis, ctx: StorageContext, plan: Plan, setup: Setup) -> dict[str, SavedStorage]:
    """Storages autograd keeps, by key. With routed MoE dispatch each expert keeps its k/E share
    of what the dense-form graph shows, and a gathered copy of its input tokens instead of the
    shared input."""
    saved: dict[str, SavedStorage] = {}
    graph = analysis.model.graph
    fused = _fused_attention_nodes(analysis, ctx) if fused_kernel(setup.attention) else {}
    adapter_at = analysis.adapter_at
    routed = ctx.routed
    combines = {u.combine: u for u in routed_units(analysis, ctx, routed) if u.weights is not None}
    producer = graph.producer_index
    for index, node in enumerate(graph.nodes):
        if not analysis.runs_backward[index]:
            continue
        items = fused[index] if index in fused else saved_by(node, ctx)
        if index in adapter_at:
            items = items + _lora_saved(analysis, ctx, index, plan)
        items = autocast_casts(node, items, ctx)
        for adapter in analysis.tensor_adapters_at.get(index, ()):
            items = items + _merged_weight_saved(ctx, node, adapter)
        for item in items:
            if isinstance(item, Extra):
                _add(saved, item.key, item.n_bytes, index)
            elif item and not ctx.is_weight(item) and item not in graph.inputs:
                copy = None if index in fused else ctx.bmm_copy_bytes(node, item)
                if copy is not None:
                    _add(saved, f"bmm_copy@{item}@{node.name}", copy, index)
                    continue
                root = ctx.storage(item)
                made_in = routed.get(producer.get(root))
                unit = combines.get(index)
                if unit is not None and item == unit.weights:           # routing weights: one per pair
                    _add(saved, f"pair_weights@{unit.name}", _pair_weights_bytes(ctx, unit), index)
                elif made_in is not None:                        # made inside an expert: its routed share
                    _add(saved, root, round(ctx.nbytes(root) * made_in[0]), index)
                elif index in routed:                          # the unit's input: a gathered copy per expert
                    share, unit, copies = routed[index]
                    _add(saved, f"routed_input@{unit}", round(ctx.nbytes(root) * share * copies), index)
                else:
                    _add(saved, root, ctx.nbytes(root), index)
    for key, n_bytes, release in _dropout_saved(analysis, ctx, plan):
        _add(saved, key, n_bytes, release)
    units = routed_units(analysis, ctx, routed)
    for key, n_bytes, release in _routed_combine_saved(analysis, ctx, units, setup.experts_impl) \
            + _routed_index_saved(ctx, units, setup.experts_impl):
        _add(saved, key, n_bytes, release)
    return saved


def param_sites(analysis: StepAnalysis) -> set[int]:
    """Indices of the nodes where a parameter meets data."""
    index_of = analysis.model.graph.node_index
    return {index_of[u.site] for u in analysis.model.roles.params if u.site in index_of}


def _expert_tail(graph, consumers: dict, sites: set[int], down: int) -> list[int]:
    """Nodes after an expert unit's down product that still compute per expert: a bias added
    to (or a scale multiplied into) the down output, one parameter per expert (GPT-OSS's
    down_proj_bias). The combine product with the routing weights ends the chain."""
    tail, out = [], graph.nodes[down].outputs[0]
    while True:
        users = list(dict.fromkeys(consumers.get(out, ())))
        if len(users) != 1 or graph.nodes[users[0]].op not in ("Add", "Mul") or users[0] not in sites:
            return tail
        tail.append(users[0])
        out = graph.nodes[users[0]].outputs[0]


@dataclass(frozen=True)
class RoutedUnit:
    """One dense-form expert unit as routed execution runs it. ``out``: the experts' output
    before the routing weights ([E, T, D] for 3-D experts, [T, D] for one expert's linears);
    ``combine``: the node multiplying it by the routing weights ``weights``, None if not found."""

    name: str
    share: float          # k / E: the tokens each expert sees
    copies: int           # experts the unit holds (E for 3-D tensors, 1 for one expert's linears)
    tokens_in: str        # the unit's input [T, D]
    out: str
    first: int            # the unit's first node: its backward is the unit's last
    last: int             # the unit's last node (its down product, or the per-expert bias after it)
    combine: int | None
    weights: str | None
    bias_trains: bool     # a per-expert bias (gathered by expert id) trains

    def pairs(self, ctx: "StorageContext") -> int:
        """(token, expert) pairs this unit runs: T·k for 3-D experts, T·k/E for one expert."""
        return round(ctx.rows(self.out) * self.share)


def routed_units(analysis: StepAnalysis, ctx: "StorageContext", routed: dict) -> list[RoutedUnit]:
    """The routed expert units of ``routed`` (routed_expert_nodes), one per down product."""
    graph = analysis.model.graph
    sites = param_sites(analysis)
    by_unit: dict[str, list[int]] = {}
    for index, (_share, name, _copies) in routed.items():
        by_unit.setdefault(name, []).append(index)
    units = []
    for name, members in by_unit.items():
        share, _name, copies = routed[members[0]]
        first, last = min(members), max(members)
        out = graph.nodes[last].outputs[0]
        combine = next((i for i in dict.fromkeys(ctx.consumers.get(out, ())) if graph.nodes[i].op == "Mul"), None)
        weights = None if combine is None else next((x for x in graph.nodes[combine].inputs if x and x != out), None)
        biases = [i for i in members if graph.nodes[i].op == "Add" and i in sites]
        units.append(RoutedUnit(name, share, copies, graph.nodes[first].inputs[0], out, first, last, combine, weights,
                                any(i in analysis.trainable_sites for i in biases)))
    return units


def _routed_combine_saved(analysis: StepAnalysis, ctx: StorageContext, units: list[RoutedUnit], impl: str):
    """A loop over experts (one expert's linears, or 3-D experts run "eager") adds each expert's
    weighted output back with index_add, whose backward keeps that output (``derivatives.yaml``:
    the source gradient is shaped ``expand_as(source)``): the routed share of the experts'
    outputs. grouped_mm and batched_mm combine with a reshape and a sum instead."""
    graph = analysis.model.graph
    found = []
    for unit in units:
        if unit.copies > 1 and impl != "eager":
            continue
        weighted = graph.nodes[unit.combine].outputs[:1] if unit.combine is not None else []
        if any(ctx.needs(t) for t in [unit.out, *weighted]):     # the source needs a gradient
            found.append((f"routed_combine@{unit.name}", round(ctx.nbytes(unit.out) * unit.share), unit.last))
    return found


def _routed_index_saved(ctx: StorageContext, units: list[RoutedUnit], impl: str):
    """Index tensors routed 3-D experts keep (int64 unless said), with S = T·k pairs.
    eager (transformers' loop): ``torch.where(mask[e])`` gives each expert its (slot, token)
    pairs as views of one [n_e, 2] nonzero result, kept by the token gather, the routing-weight
    gather and index_add: [S, 2] in all. grouped_mm: the token gather keeps ``perm // k`` [S]
    (when the input needs a gradient), the routing-weight gather ``perm`` [S] (when the weights
    do), the un-permuting gather ``inv_perm`` [S] (when the weighted output does); both
    grouped products keep the group offsets [E] int32; a trained per-expert bias gathered by
    the sorted expert ids keeps those ids [S]."""
    found = []
    for unit in (u for u in units if u.copies > 1):
        pairs, key = unit.pairs(ctx), unit.name
        inputs, weights = ctx.needs(unit.tokens_in), unit.weights is not None and ctx.needs(unit.weights)
        weighted = unit.combine is not None and ctx.needs(ctx.graph.nodes[unit.combine].outputs[0])
        if impl == "eager":
            if inputs or weights or weighted:
                found.append((f"routed_pairs@{key}", pairs * 2 * INDEX_BYTES, unit.first))
            continue
        if impl == "batched_mm":           # its expert ids are a view of the router's top-k indices
            found += _gathered_expert_weights(ctx, unit)
            continue
        # (name, kept, released at): the combine side is done with when the unit's backward starts
        kept = [("routed_token_index", inputs, unit.first), ("routed_perm", weights, unit.last),
                ("routed_inv_perm", weighted, unit.last), ("routed_expert_ids", unit.bias_trains, unit.first)]
        found += [(f"{name}@{key}", pairs * INDEX_BYTES, release) for name, keep, release in kept if keep]
        if inputs or weighted or ctx.needs(unit.out):
            found.append((f"routed_offsets@{key}", unit.copies * 4, unit.first))
    return found


def _gathered_expert_weights(ctx: StorageContext, unit: RoutedUnit) -> list:
    """batched_mm gathers each pair's expert matrix (``gate_up_proj[expert_ids]``: [S, 2F, D])
    and multiplies with bmm, which keeps that gathered copy for dX when its input needs a
    gradient: one copy per 3-D expert weight of the unit, at the weights' dtype."""
    found = []
    for index in range(unit.first, unit.last + 1):
        node = ctx.graph.nodes[index]
        weight = next((x for x in node.inputs[1:] if x and ctx.is_weight(x) and len(ctx.shape(x) or ()) == 3), None)
        if node.op == "MatMul" and weight is not None and ctx.needs(node.inputs[0]):
            shape = ctx.shape(weight)
            found.append((f"gathered_weight@{weight}", unit.pairs(ctx) * numel(shape) // shape[0] *
                          ctx.precision.weight, index))
    return found


def _pair_weights_bytes(ctx: StorageContext, unit: RoutedUnit) -> int:
    """The routing weights the combine product keeps: one per (token, expert) pair, where the
    dense form shows a [T, E] combine matrix (mostly zeros)."""
    return unit.pairs(ctx) * ctx.element_bytes(unit.weights)


def _merged_weight_saved(ctx: StorageContext, node: Node, adapter) -> list:
    """LoRA on a 3-D expert tensor (PEFT ``target_parameters``) re-parametrizes the whole tensor
    as W + B·A in every forward; the product keeps the merged weight only to compute dX."""
    merged = adapter.n_experts * adapter.d_in * adapter.d_out * ctx.precision.weight
    return [Extra(f"lora_merged@{adapter.key}", merged)] if ctx.needs(node.inputs[0]) else []


def _lora_saved(analysis: StepAnalysis, ctx: StorageContext, index: int, plan: Plan) -> list:
    """PEFT: lora_B(lora_A(dropout(x))) * scale, x first cast to the adapter's dtype. A's matmul
    keeps x (or its dropped copy, and dropout its mask), B's keeps x·A. An adapter on a fused 3-D
    expert tensor (``target_parameters``) re-parametrizes the whole tensor as W + B·A in every
    forward: the merged full-size weight is what the expert matmuls keep for their backward."""
    adapter = analysis.adapter_at[index]
    node = analysis.model.graph.nodes[index]
    x = node.inputs[0]
    x_shape = ctx.shape(x)
    share = analysis.expert_share.get(index, 1.0)
    rows = round((numel(x_shape) // x_shape[-1] if x_shape else 0) * share)
    act = ctx.precision.activation
    # pure half base, fp32 adapters (PEFT's default): x is cast to fp32 first, so A keeps an fp32
    # x (or dropped x) and B an fp32 x·A; under autocast x stays fp32 through dropout, and A keeps
    # autocast's half copy of what it multiplies
    fp32_adapter = ctx.precision.fp32_adapters_on_half_base
    dropout_dtype = 4 if fp32_adapter or ctx.precision.autocast else act      # bytes dropout runs in
    items: list = [Extra(f"lora_xa@{node.name}", rows * adapter.rank * (4 if fp32_adapter else act))]
    if plan.lora_dropout > 0:        # A keeps the dropped copy; the mask is kept only if x needs a gradient
        items.append(Extra(f"lora_drop@{node.name}", rows * adapter.d_in * (2 if ctx.precision.autocast
                                                                             else dropout_dtype)))
        if ctx.needs(x):             # CUDA's fused dropout keeps a bool mask; the CPU path, the input's dtype
            mask = 1 if ctx.device == "cuda" else dropout_dtype
            items.append(Extra(f"lora_mask@{node.name}", rows * adapter.d_in * mask))
    elif fp32_adapter:
        items.append(Extra(f"lora_x32@{node.name}", rows * adapter.d_in * 4))
    else:
        items.append(x)      # routed experts: collect_saved turns it into the gathered tokens' copy
    if ctx.precision.autocast:   # autocast's cached half copies of the fp32 adapters: B's feeds dA,
        items.append(Extra(f"autocast@lora_B@{node.name}", adapter.d_out * adapter.rank * 2))
        if ctx.needs(x):         # A's feeds dX
            items.append(Extra(f"autocast@lora_A@{node.name}", adapter.rank * adapter.d_in * 2))
    return items + (_dora_saved(ctx, node, adapter, rows) if adapter.dora else [])


def _adds_a_bias(ctx: StorageContext, node: Node) -> bool:
    """The linear's product goes on to an Add of a weight: its bias (split off by the front end)."""
    return any(ctx.graph.nodes[i].op == "Add" and any(ctx.is_weight(x) for x in ctx.graph.nodes[i].inputs)
               for i in ctx.consumers.get(node.outputs[0], ()))


def _dora_saved(ctx: StorageContext, node: Node, adapter, rows: int) -> list:
    """PEFT's DoRA adds (m/‖W + s·BA‖ - 1)·(x W) + (m/‖W + s·BA‖)·s·B(A(x)) to the base output,
    the norm detached: the magnitude m's gradient needs both products, so the base output and
    B's output ([tokens, out] each) stay saved, with the per-output norm and scales (fp32 for
    PEFT's fp32 adapters; with a bias PEFT subtracts it from the base output first, a new tensor).
    B·A itself is made through an identity matrix and detached: not kept. With LoRA dropout the base product runs again, on the dropped input in the adapter's input
    dtype, as F.linear(x', W.to(x'.dtype)): it keeps the cast weight for dX when that is a new
    tensor (an fp32 copy of a half W for fp32 adapters; autocast's half copy of a frozen W)."""
    fp32_adapter = ctx.precision.fp32_adapters_on_half_base
    adapter_out = 4 if fp32_adapter else ctx.act_bytes("MatMul")
    base_bytes = adapter_out if adapter.dropout > 0 else ctx.element_bytes(node.outputs[0])
    if adapter.dropout <= 0 and ctx.precision.autocast and _adds_a_bias(ctx, node):
        base_bytes = 4       # result - bias: the half product minus the fp32 bias promotes to fp32
    items = [Extra(f"dora_base@{node.name}", rows * adapter.d_out * base_bytes),
             Extra(f"dora_lora@{node.name}", rows * adapter.d_out * adapter_out),
             Extra(f"dora_scales@{node.name}", 3 * adapter.d_out * ctx.precision.adapter)]  # ‖·‖, m/‖·‖ - 1, m/‖·‖
    cast_weight = 4 if fp32_adapter else 2 if ctx.precision.autocast else 0
    if adapter.dropout > 0 and cast_weight and ctx.needs(node.inputs[0]):
        items.append(Extra(f"dora_weight@{node.name}", adapter.d_in * adapter.d_out * cast_weight))
    return items


def _dropout_saved(analysis: StepAnalysis, ctx: StorageContext, plan: Plan):
    """Training-time dropout the inference graph no longer shows (GPT-2/BERT place it after the
    embeddings, on attention probabilities, on the attention output and on the FFN output):
    each keeps its mask where its input needs a gradient (CUDA's fused kernel: 1-byte bool; the
    CPU path multiplies by a noise tensor of the input's dtype); on attention probabilities the
    dropped copy is what P·V keeps, beside softmax's own output."""
    if plan.dropout <= 0:
        return []
    found = []
    for point in dropout_points(analysis.model.graph, analysis.model.roles):
        if not point.on_probabilities:
            found += _mask_after(analysis, ctx, point.node)
        elif ctx.needs(point.tensor):
            elements = ctx.nbytes(point.tensor) // ctx.element_bytes(point.tensor)
            found.append((f"drop_mask@{point.tensor}", elements * ctx.mask_bytes, point.node))
            found.append((f"drop_probs@{point.tensor}", elements * ctx.precision.activation, point.reader))
    return found


def _mask_after(analysis: StepAnalysis, ctx: StorageContext, index: int):
    out = analysis.model.graph.nodes[index].outputs[0]
    if not ctx.needs(out):
        return []
    shape = ctx.shape(out)
    return [(f"drop_mask@{out}", numel(shape) * ctx.mask_bytes if shape else 0, index)]
