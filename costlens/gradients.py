"""From a plan to the step's gradient physics on the graph.

Freezing stops updates, not gradient flow (DESIGN.md §2.1): a tensor needs a gradient when a
trainable parameter or adapter lies upstream of it and no stop-gradient cuts the path; a
node runs backward when its output receives a gradient from the loss. ``analyze`` computes
this once per plan; FLOPs (flops.py) and memory (memory.py) both read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from costlens.model import Model
from costlens.errors import PlanError, StructureError
from costlens.ir import FLOAT_DTYPES
from costlens.plans import LORA_TARGETS, Plan, lora_target_base, select
from costlens.roles.types import ParamUse, Role


# Parameter kinds LoRA never adapts: vectors and tables, not linear maps (PEFT targets linears),
# and a d -> 1 sigmoid gate scaling a unit's output (Qwen2-MoE's shared_expert_gate): rank-r
# factors of a width-1 map hold r·(d+1) > d parameters, and PEFT's shared-expert targets
# (shared_expert.gate_proj / up_proj / down_proj) do not name it.
NOT_ADAPTED = frozenset({"bias", "norm", "embed_norm", "token", "position", "sink", "gate_scale"})


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter on one parameter use (one per expert for a 3-D expert tensor)."""

    key: str
    role: Role
    site: int
    rank: int
    d_in: int
    d_out: int
    n_experts: int = 0
    dora: bool = False       # DoRA: a trained magnitude per output (linear adapters only)
    dropout: float = 0.0     # PEFT lora_dropout on the adapter's input
    fan_in_fan_out: bool = False   # the base weight is stored [in, out] (GPT-2's Conv1D)
    alpha: float = 16.0      # LoRA alpha of the adapter's target: output scale alpha / rank (no cost)

    @property
    def dora_weight_grad(self) -> bool:
        """PEFT's DoRA with dropout runs F.linear(x', transpose(W)) again, and for a Conv1D weight
        ``transpose`` wraps W.T in a fresh nn.Parameter, which requires a gradient: autograd makes
        a throwaway [in, out] weight gradient there, held until the graph is freed."""
        return self.dora and self.dropout > 0 and self.fan_in_fan_out

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The trained tensors the adapter adds: A [r, in], B [out, r] (per expert for a 3-D
        tensor) and DoRA's magnitude [out]."""
        experts = (self.n_experts,) if self.n_experts else ()
        return (experts + (self.rank, self.d_in), experts + (self.d_out, self.rank)) + \
            (((self.d_out,),) if self.dora else ())

    @property
    def n_params(self) -> int:
        """Trained elements of the adapter (A, B and DoRA's magnitude)."""
        return max(self.n_experts, 1) * self.rank * (self.d_in + self.d_out) + (self.d_out if self.dora else 0)


@dataclass(frozen=True)
class StepAnalysis:
    """Which parameters train, where adapters sit, what needs and receives gradients."""

    model: Model
    bindings: dict
    trainable: frozenset[str]             # ParamUse keys whose base weights train
    trainable_sites: frozenset[int]       # nodes where a trainable parameter meets data
    adapters: tuple[Adapter, ...]
    cuts: frozenset[str]                  # tensors detached by stop-gradient
    needs_grad: dict                      # tensor -> bool
    runs_backward: tuple[bool, ...]       # per node
    weights: frozenset[str]               # tensors computed from constants alone
    expert_share: dict                    # node -> share of tokens an expert matmul sees (k/E when routed)

    # cached_property writes the instance __dict__ directly, which a frozen dataclass allows;
    # both maps are asked for once per node by the FLOP and memory passes (was rebuilt each time)
    @cached_property
    def adapter_at(self) -> dict[int, Adapter]:
        """The LoRA adapter on a linear site (one weight per node)."""
        return {a.site: a for a in self.adapters if not a.n_experts}

    @cached_property
    def tensor_adapters_at(self) -> dict[int, tuple[Adapter, ...]]:
        """Adapters on 3-D expert tensors, by node: a fused MoE op can hold several (fc1, fc2)."""
        found: dict[int, tuple[Adapter, ...]] = {}
        for adapter in self.adapters:
            if adapter.n_experts:
                found[adapter.site] = found.get(adapter.site, ()) + (adapter,)
        return found

    def needs(self, tensor: str) -> bool:
        return bool(tensor) and self.needs_grad.get(tensor, False) and tensor not in self.cuts


def analyze(model: Model, plan: Plan, bindings: dict, routed: bool = True, input_grads: bool = False) -> StepAnalysis:
    """``input_grads``: the token embedding's output is made to require a gradient, as
    transformers' gradient_checkpointing_enable and PEFT do (``enable_input_require_grads``):
    a leaf, so every layer runs backward down to it although nothing below it trains."""
    trainable = trainable_keys(model, plan)
    adapters = lora_adapters(model, plan, bindings)
    index_of = {n.name: i for i, n in enumerate(model.graph.nodes)}
    trainable_sites = {index_of[u.site] for u in model.roles.params if u.key in trainable}
    # batched experts: the gathered expert matrices carry the weight's gradient into the product
    gathers = {index_of[u.via] for u in model.roles.params if u.via and (u.key in trainable or any(
        a.key == u.key for a in adapters))}
    cuts = stop_grad_cuts(model, plan)
    leaves = {model.graph.nodes[index_of[u.site]].outputs[0] for u in model.roles.params
              if input_grads and u.kind == "token" and u.key not in trainable}
    needs, runs_backward = gradient_flow(model, trainable_sites | gathers | {a.site for a in adapters}, cuts, leaves)
    return StepAnalysis(model, bindings, frozenset(trainable), frozenset(trainable_sites), tuple(adapters),
                        frozenset(cuts), needs, tuple(runs_backward), frozenset(constant_derived(model)),
                        expert_token_share(model) if routed else {})


def expert_token_share(model: Model) -> dict[int, float]:
    """Per node: the share of tokens a dense-form expert matmul really processes when each
    token is routed to its top-k of E experts (k / E)."""
    routers = {r.layer: r for r in model.roles.routers}
    index_of = {n.name: i for i, n in enumerate(model.graph.nodes)}
    share = {}
    for use in model.roles.params:
        router = routers.get(use.layer)
        # a gathered (batched) expert product already runs only the routed (token, expert) pairs
        if use.role is Role.EXPERTS and use.kind != "expert_weight" and not use.via and router and router.top_k:
            if router.n_experts <= 0:    # the router's width was not inferred (a broken graph)
                raise StructureError(f"the router of layer {router.layer} has no known number of experts "
                                     "(its output width is not inferred); routed experts cannot be priced")
            share[index_of[use.site]] = router.top_k / router.n_experts
    return share


def gradient_sites(model: Model, uses=None) -> dict[str, int]:
    """Node index where each parameter tensor's gradient first exists in backward: its last use in
    forward (a tied weight, GPT-2's wte = lm_head, gets it at the head and holds it from there).
    ``uses``: the ParamUses to consider (default: all)."""
    index_of = {n.name: i for i, n in enumerate(model.graph.nodes)}
    sites: dict[str, int] = {}
    for use in model.roles.params if uses is None else uses:
        sites[use.constant] = max(sites.get(use.constant, -1), index_of[use.site])
    return sites


def trainable_keys(model: Model, plan: Plan) -> set[str]:
    """ParamUse keys whose base weights train under ``plan`` (--train / --freeze selectors; none
    by default under LoRA); a tied tensor trains or freezes as one."""
    uses = model.roles.params
    if plan.train:
        chosen = set().union(*(select(uses, s, model.roles) for s in plan.train))
    else:
        chosen = set() if plan.lora else {u.key for u in uses}
    for selector in plan.freeze:
        chosen -= select(uses, selector, model.roles)
    # a tie is one tensor: training either use trains both
    by_key = {u.key: u for u in uses}
    for use in uses:
        if use.tied_to:
            token = next(u.key for u in uses if u.constant == use.tied_to and u.role is Role.EMBEDDING)
            if use.key in chosen or token in chosen:
                chosen |= {use.key, token}
    return {k for k in chosen if k in by_key}


def lora_adapters(model: Model, plan: Plan, bindings: dict[str, int]) -> list[Adapter]:
    """One Adapter per weight the plan's LoRA targets name (however many targets name it), with
    its rank and in/out widths in elements; refused (PlanError) on a role that is not linear."""
    adapters: list[Adapter] = []
    index_of = {n.name: i for i, n in enumerate(model.graph.nodes)}
    adapted: set[str] = set()
    for target in plan.lora:
        if lora_target_base(target) not in LORA_TARGETS:
            raise PlanError(f"LoRA target {target!r} is not a linear role (choose from {', '.join(LORA_TARGETS)})")
        rank = plan.rank_for(target)    # a ROLE.KIND target (experts.gate_up) gives each expert tensor its own
        chosen = select(model.roles.params, target, model.roles)
        for use in model.roles.params:
            # one adapter per weight, however many targets name it (a packed qkv under q and v)
            if use.key not in chosen or use.key in adapted or use.kind in NOT_ADAPTED or use.tied_to:
                continue
            adapted.add(use.key)
            site = index_of[use.site]
            d_in, d_out = _linear_dims(model, site, use)
            if plan.dora and use.n_experts:
                raise PlanError(f"DoRA on the 3-D expert tensor {use.constant!r}: PEFT runs DoRA on linear "
                                "layers only (target_parameters do not take use_dora)")
            adapters.append(Adapter(use.key, use.role, site, rank, d_in, d_out, use.n_experts, plan.dora,
                                    plan.lora_dropout, _stored_in_out(model, site, use, d_in, d_out),
                                    plan.alpha_for(target)))
    return adapters


def _stored_in_out(model: Model, site: int, use: ParamUse, d_in: int, d_out: int) -> bool:
    """The weight is a module's own [in, out] tensor multiplied as it is (Conv1D), not an
    nn.Linear [out, in] one reached through a transpose. An exporter's folded transpose (a
    ``val_N`` constant, no module path) also feeds MatMul directly: not a Conv1D."""
    node = model.graph.nodes[site]
    return node.op == "MatMul" and use.constant in node.inputs and use.shape[-2:] == (d_in, d_out) \
        and "." in use.constant


def _linear_dims(model: Model, site: int, use: ParamUse) -> tuple[int, int]:
    shape = use.shape[1:] if use.n_experts else use.shape
    node = model.graph.nodes[site]
    if node.op == "Gemm" and node.attr("transB", 0):
        return shape[1], shape[0]
    out_shape = model.graph.shape(node.outputs[0])
    if out_shape and isinstance(out_shape[-1], int) and out_shape[-1] == shape[0] and shape[0] != shape[1]:
        return shape[1], shape[0]
    return shape[0], shape[1]


def gradient_flow(model: Model, trainable_sites: set[int], cuts: set[str], leaves: set[str] = frozenset()):
    """(needs_grad per tensor, runs_backward per node). ``leaves``: tensors made to require a
    gradient (requires_grad_): they need one, but their producer does not run backward for it."""
    graph = model.graph
    needs: dict[str, bool] = {}
    flags = []
    for index, node in enumerate(graph.nodes):
        flag = index in trainable_sites or any(needs.get(x, False) for x in node.inputs if x and x not in cuts)
        flags.append(flag)
        for out in node.outputs:
            if out:
                dtype = graph.dtype(out)
                needs[out] = (flag or out in leaves) and (dtype is None or dtype in FLOAT_DTYPES)
    receives = {o for o in graph.outputs if needs.get(o)}
    runs_backward = [False] * len(graph.nodes)
    for index in range(len(graph.nodes) - 1, -1, -1):
        node = graph.nodes[index]
        if not flags[index] or not any(out in receives for out in node.outputs if out):
            continue
        runs_backward[index] = True
        for x in node.inputs:
            if x and needs.get(x) and x not in cuts:
                receives.add(x)
    return needs, runs_backward


def stop_grad_cuts(model: Model, plan: Plan) -> set[str]:
    """Tensors the plan's --stop-grad detaches (every attention output for "attn"): no gradient
    flows back through them."""
    cuts: set[str] = set()
    consumers_of: dict[str, list] = {}
    for target in plan.stop_grad:
        if target != "attn":
            raise PlanError(f"--stop-grad {target!r}: only 'attn' (detach every attention output) is supported")
        if not consumers_of:          # one pass over the graph, not one per attention site
            for node in model.graph.nodes:
                for x in dict.fromkeys(node.inputs):
                    consumers_of.setdefault(x, []).append(node)
        for attention in model.roles.attentions:
            for site in attention.o_sites:
                cuts.add(_after_bias(model, model.graph.nodes[site].outputs[0], consumers_of))
    return cuts


def _after_bias(model: Model, tensor: str, consumers_of: dict[str, list]) -> str:
    """Follow a linear's output through its bias add (the detach comes after the bias)."""
    consumers = consumers_of.get(tensor, [])
    if len(consumers) == 1 and consumers[0].op == "Add":
        others = [x for x in consumers[0].inputs if x != tensor]
        if others and all(x in model.graph.constants for x in others):
            return consumers[0].outputs[0]
    return tensor


def constant_derived(model: Model) -> set[str]:
    """Tensors computed from constants alone (e.g. a transposed weight): weights, not data."""
    derived = set(model.graph.constants)
    for node in model.graph.nodes:
        if all(x in derived for x in node.inputs if x):
            derived.update(o for o in node.outputs if o)
    return derived


