"""estimate(model, plan, setup) -> Estimate: parameters and FLOPs of one training step.

Gradient physics (DESIGN.md §2): freezing stops updates, not gradient flow. A tensor needs
a gradient when a trainable parameter (or adapter) lies upstream of it and no stop-gradient
cuts the path; an op runs backward when its output receives a gradient from the loss. A
matmul's backward then costs one forward per gradient it must produce: dX when X needs a
gradient, dW when W trains. MoE experts run only on the tokens routed to them (k of E).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from costlens.api import Model
from costlens.errors import PlanError
from costlens.ir import FLOAT_DTYPES
from costlens.ops import costs
from costlens.plans import LORA_TARGETS, Plan, Setup, check_setup, select
from costlens.roles.types import ParamUse, Role
from costlens.shapes import eval_shape, numel

DEFAULT_SEQ = 2048


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

    @property
    def n_params(self) -> int:
        return max(self.n_experts, 1) * self.rank * (self.d_in + self.d_out)


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    adapter: int
    frozen: int
    trainable_by_role: Mapping[str, int]
    active_per_token: int


@dataclass(frozen=True)
class FlopCounts:
    forward: int
    backward_input: int
    backward_weight: int
    recompute: int = 0

    @property
    def backward(self) -> int:
        return self.backward_input + self.backward_weight

    @property
    def step(self) -> int:
        return self.forward + self.backward + self.recompute


@dataclass(frozen=True)
class Estimate:
    plan: Plan
    setup: Setup
    batch: int
    seq: int
    params: ParamCounts
    flops: FlopCounts
    assumptions: tuple[str, ...] = ()
    unsupported_ops: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


# --------------------------------------------------------------------------- plan -> sets

def trainable_keys(model: Model, plan: Plan) -> set[str]:
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
    adapters: list[Adapter] = []
    index_of = {n.name: i for i, n in enumerate(model.graph.nodes)}
    for target in plan.lora:
        if target not in LORA_TARGETS:
            raise PlanError(f"LoRA target {target!r} is not a linear role (choose from {', '.join(LORA_TARGETS)})")
        rank = plan.rank_for(target)
        for use in model.roles.params:
            if use.key not in select(model.roles.params, target, model.roles) or use.kind == "bias":
                continue
            if use.kind in ("norm", "token", "position") or use.tied_to:
                continue
            site = index_of[use.site]
            d_in, d_out = _linear_dims(model, site, use)
            adapters.append(Adapter(use.key, use.role, site, rank, d_in, d_out, use.n_experts))
    return adapters


def _linear_dims(model: Model, site: int, use: ParamUse) -> tuple[int, int]:
    shape = use.shape[1:] if use.n_experts else use.shape
    node = model.graph.nodes[site]
    if node.op == "Gemm" and node.attr("transB", 0):
        return shape[1], shape[0]
    out_shape = model.graph.shape(node.outputs[0])
    if out_shape and isinstance(out_shape[-1], int) and out_shape[-1] == shape[0] and shape[0] != shape[1]:
        return shape[1], shape[0]
    return shape[0], shape[1]


# --------------------------------------------------------------------------- gradient flow

def gradient_flow(model: Model, trainable_sites: set[int], cuts: set[str]):
    """(needs_grad per tensor, runs_backward per node)."""
    graph = model.graph
    needs: dict[str, bool] = {}
    for index, node in enumerate(graph.nodes):
        flag = index in trainable_sites or any(needs.get(x, False) for x in node.inputs if x and x not in cuts)
        for out in node.outputs:
            if out:
                dtype = graph.dtype(out)
                needs[out] = flag and (dtype is None or dtype in FLOAT_DTYPES)
    receives = {o for o in graph.outputs if needs.get(o)}
    runs_backward = [False] * len(graph.nodes)
    for index in range(len(graph.nodes) - 1, -1, -1):
        node = graph.nodes[index]
        if not any(out in receives for out in node.outputs if out):
            continue
        runs_backward[index] = True
        for x in node.inputs:
            if x and needs.get(x) and x not in cuts:
                receives.add(x)
    return needs, runs_backward


def stop_grad_cuts(model: Model, plan: Plan) -> set[str]:
    cuts: set[str] = set()
    for target in plan.stop_grad:
        if target != "attn":
            raise PlanError(f"--stop-grad {target!r}: only 'attn' (detach every attention output) is supported")
        for attention in model.roles.attentions:
            for site in attention.o_sites:
                cuts.add(_after_bias(model, model.graph.nodes[site].outputs[0]))
    return cuts


def _after_bias(model: Model, tensor: str) -> str:
    """Follow a linear's output through its bias add (the detach comes after the bias)."""
    consumers = [n for n in model.graph.nodes if tensor in n.inputs]
    if len(consumers) == 1 and consumers[0].op == "Add":
        others = [x for x in consumers[0].inputs if x != tensor]
        if others and all(x in model.graph.constants for x in others):
            return consumers[0].outputs[0]
    return tensor


# --------------------------------------------------------------------------- estimate

def resolve_seq(model: Model, setup: Setup) -> tuple[int, list[str]]:
    notes = []
    positions = [u for u in model.roles.params if u.kind == "position"]
    limit = positions[0].shape[0] if positions else None
    seq = setup.seq
    if seq is None:
        seq = min(DEFAULT_SEQ, limit) if limit else DEFAULT_SEQ
        notes.append(f"seq defaults to {seq}" + (" (the learned position table's length)" if limit and limit < DEFAULT_SEQ else ""))
    if limit is not None and seq > limit:
        raise PlanError(f"seq {seq} exceeds the model's learned position table ({limit} positions)")
    return seq, notes


def estimate(model: Model, plan: Plan, setup: Setup | None = None) -> Estimate:
    """Parameters (counts) and FLOPs (2 x MACs, matmuls only) of one training step."""
    setup = check_setup(setup or Setup())
    _refuse_unpriced(plan)
    seq, assumptions = resolve_seq(model, setup)
    bindings = {"batch": setup.batch, "seq": seq}
    trainable = trainable_keys(model, plan)
    adapters = lora_adapters(model, plan, bindings)
    index_of = {n.name: i for i, n in enumerate(model.graph.nodes)}
    trainable_sites = {index_of[u.site] for u in model.roles.params if u.key in trainable}
    adapter_at = {a.site: a for a in adapters}
    cuts = stop_grad_cuts(model, plan)
    needs, runs_backward = gradient_flow(model, trainable_sites | set(adapter_at), cuts)
    flops = _count_flops(model, bindings, trainable_sites, adapter_at, needs, runs_backward, cuts, setup)
    assumptions += _assumptions(model, setup)
    return Estimate(plan=plan, setup=setup, batch=setup.batch, seq=seq,
                    params=_count_params(model, trainable, adapters), flops=flops,
                    assumptions=tuple(assumptions), unsupported_ops=model.unknown_ops)


def _refuse_unpriced(plan: Plan) -> None:
    """Plan features whose costs are not modelled yet fail loudly instead of pricing as zero."""
    unpriced = [what for what, used in (("--stack-ffn", plan.stack_ffn > 0), ("--dropout", plan.dropout > 0),
                                        ("--lora-dropout", plan.lora_dropout > 0)) if used]
    if unpriced:
        raise PlanError(f"{', '.join(unpriced)}: not priced yet by this version of costlens")


def default_plans(model: Model) -> list[str]:
    """The comparison a user of this model most likely wants (issue 3)."""
    has_ffn = any(u.role is Role.FFN for u in model.roles.params)
    specs = ["full", "freeze-attn:freeze=attn", "ffn-only:train=ffn" if has_ffn else "experts-only:train=experts",
             "lora-attn-r8:lora=attn;rank=8"]
    if has_ffn:
        specs.append("lora-attn-ffn-r8:lora=attn,ffn;rank=8")
    if model.roles.routers:
        specs += ["lora-attn-router-experts:lora=attn,router,experts;rank=attn=8,router=4,experts=4",
                  "router-only:train=router"]
    return specs


def _count_params(model: Model, trainable: set[str], adapters: list[Adapter]) -> ParamCounts:
    roles = model.roles
    by_role = {role.value: 0 for role in Role}
    for use in roles.params:
        if use.key in trainable:
            by_role[use.role.value] += use.n_params
    adapter = sum(a.n_params for a in adapters)
    base_trainable = sum(by_role.values())
    experts = sum(u.n_params for u in roles.params if u.role is Role.EXPERTS)
    arch = roles.architecture
    inactive = experts - experts * (arch.top_k or 0) // arch.experts if arch.experts else 0
    return ParamCounts(
        total=roles.params_total + adapter, trainable=base_trainable + adapter, adapter=adapter,
        frozen=roles.params_total - base_trainable, trainable_by_role=MappingProxyType(by_role),
        active_per_token=roles.params_total - inactive,
    )


def _expert_scale(model: Model) -> dict[int, float]:
    """Per node: the share of tokens a dense-form expert matmul really processes (k / E)."""
    routers = {r.layer: r for r in model.roles.routers}
    index_of = {n.name: i for i, n in enumerate(model.graph.nodes)}
    scale = {}
    for use in model.roles.params:
        router = routers.get(use.layer)
        if use.role is Role.EXPERTS and use.kind != "expert_weight" and router and router.top_k:
            scale[index_of[use.site]] = router.top_k / router.n_experts
    return scale


def _count_flops(model, bindings, trainable_sites, adapter_at, needs, runs_backward, cuts, setup) -> FlopCounts:
    graph = model.graph
    scale = _expert_scale(model)
    weights = constant_derived(model)
    forward = backward_input = backward_weight = 0
    for index, node in enumerate(graph.nodes):
        if node.op not in ("MatMul", "Gemm"):
            continue
        a_shape = eval_shape(graph.shape(node.inputs[0]), bindings)
        out_shape = eval_shape(graph.shape(node.outputs[0]), bindings)
        flops = costs.node_matmul_flops(node, a_shape, out_shape)
        if flops is None:
            continue
        flops = round(flops * scale.get(index, 1.0))
        forward += flops
        if runs_backward[index]:
            for operand in node.inputs[:2]:
                if operand in weights:
                    backward_weight += flops if index in trainable_sites else 0
                elif needs.get(operand) and operand not in cuts:
                    backward_input += flops
        adapter = adapter_at.get(index)
        if adapter is not None:
            tokens = round(numel(out_shape) // out_shape[-1] * scale.get(index, 1.0))
            lora = costs.lora_flops(tokens, adapter.rank, adapter.d_in, adapter.d_out)
            forward += lora
            if runs_backward[index]:
                backward_weight += lora                                   # dA and dB
                backward_input += costs.matmul_flops(tokens, adapter.d_out, adapter.rank)  # d(xA)
                x = node.inputs[0]
                if needs.get(x) and x not in cuts:
                    backward_input += costs.matmul_flops(tokens, adapter.rank, adapter.d_in)  # dX via A
    return FlopCounts(forward=forward, backward_input=backward_input, backward_weight=backward_weight)


def constant_derived(model: Model) -> set[str]:
    """Tensors computed from constants alone (e.g. a transposed weight): weights, not data."""
    derived = set(model.graph.constants)
    for node in model.graph.nodes:
        if all(x in derived for x in node.inputs if x):
            derived.update(o for o in node.outputs if o)
    return derived


def _assumptions(model: Model, setup: Setup) -> list[str]:
    notes = ["FLOPs count matrix products only (as torch.utils.flop_counter); elementwise ops, norms, "
             "softmax and the loss are not counted"]
    if model.roles.routers:
        notes.append("experts run only on routed tokens: each expert matmul is priced at k/E of the tokens")
    return notes
