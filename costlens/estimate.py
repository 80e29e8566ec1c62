"""estimate(model, plan, setup) -> Estimate: parameters, memory and FLOPs of one step.

The stage ties the others together: the gradient analysis (gradients.py) feeds the FLOP
count (flops.py) and the memory simulation (memory.py); parameters are counted here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from costlens.model import Model
from costlens.errors import PlanError
from costlens.flops import FlopCounts, count_flops
from costlens.gpus import StepTime  # noqa: F401  (the roofline time lives in gpus.py; re-exported)
from costlens.gradients import Adapter, StepAnalysis, analyze
from costlens.memory import MemoryBytes, estimate_memory
from costlens.plans import Plan, Setup, check_setup
from costlens.roles.types import Role

DEFAULT_SEQ = 2048


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (elements, not bytes) of the model under a plan; adapters (LoRA, DoRA, ...) are
    new parameters, so ``total = trainable + frozen`` and ``adapter`` is part of ``trainable``."""

    total: int                              # the base model's parameters plus the adapters'
    trainable: int                          # base weights that train plus all adapter parameters
    adapter: int
    frozen: int                             # base weights that do not train
    trainable_by_role: Mapping[str, int]    # Role value -> parameters of its base weights that train (no adapters)
    active_per_token: int                   # base parameters less the experts a token is not routed to (E - top_k)


@dataclass(frozen=True)
class Estimate:
    """One training step of ``plan`` under ``setup``: parameter counts, memory (bytes by category),
    FLOPs (2 x MACs) and, with a GPU, the roofline time (seconds); ``assumptions`` say what was assumed."""

    plan: Plan
    setup: Setup
    batch: int                                  # sequences per step
    seq: int                                    # tokens per sequence (resolved: setup.seq or the default)
    params: ParamCounts
    memory: MemoryBytes
    flops: FlopCounts
    time: StepTime | None = None
    assumptions: tuple[str, ...] = ()
    unsupported_ops: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))   # op -> nodes not priced
    trainable_keys: tuple[str, ...] = ()        # parameter uses whose base weights train
    adapters: tuple[Adapter, ...] = ()
    model: Model | None = None                  # the model priced (with stacked sublayers, if any)


def resolve_seq(model: Model, setup: Setup) -> tuple[int, list[str]]:
    """The step's sequence length in tokens and the notes that explain a default: ``setup.seq``, else
    DEFAULT_SEQ capped at a learned position table's length (a longer seq would index past it)."""
    notes = []
    positions = [u for u in model.roles.params if u.kind == "position"]
    limit = positions[0].shape[0] if positions else None
    seq = setup.seq
    if seq is None:
        seq = min(DEFAULT_SEQ, limit) if limit else DEFAULT_SEQ
        capped = " (the learned position table's length)" if limit and limit < DEFAULT_SEQ else ""
        notes.append(f"seq defaults to {seq}{capped}")
    if limit is not None and seq > limit:
        raise PlanError(f"seq {seq} exceeds the model's learned position table ({limit} positions)")
    return seq, notes


def estimate(model: Model, plan: Plan, setup: Setup | None = None) -> Estimate:
    """Parameters (counts), memory (bytes) and FLOPs (2 x MACs, matmuls only) of one step."""
    setup = check_setup(setup or Setup())
    model = with_stacked_ffn(model, plan)
    seq, assumptions = resolve_seq(model, setup)
    analysis = analyze(model, plan, {"batch": setup.batch, "seq": seq}, routed=setup.moe_dispatch == "routed",
                       input_grads=setup.checkpointing)
    flops = count_flops(analysis, setup.checkpointing, setup.attention)
    memory = with_shared_state(estimate_memory(analysis, plan, setup), analysis, setup)
    if setup.base_quant:       # QLoRA: frozen linears stored quantized (costlens/quant.py, issue 16)
        from costlens.quant import quantize_base
        from costlens.storages import Precision
        precision = Precision.of(setup.precision)
        memory = quantize_base(memory, analysis, setup, precision.weight, precision.activation, plan)
    return Estimate(
        plan=plan, setup=setup, batch=setup.batch, seq=seq,
        params=_count_params(analysis), memory=memory, flops=flops,
        time=step_time(flops, setup, memory), assumptions=tuple(assumptions + _assumptions(analysis, setup)),
        unsupported_ops=_unsupported(model, flops), trainable_keys=tuple(sorted(analysis.trainable)),
        adapters=analysis.adapters, model=model,
    )


def with_shared_state(memory: MemoryBytes, analysis: StepAnalysis, setup: Setup) -> MemoryBytes:
    """``memory`` with the optimizer state held once per optimizer (optimizers.shared_state_bytes,
    e.g. AdamW8bit's quantization maps), which lives through every phase of the step."""
    from costlens.memory import trainable_shapes
    from costlens.optimizers import shared_state_bytes
    shared = shared_state_bytes(setup.optimizer, trainable_shapes(analysis))
    if not shared:
        return memory
    return replace(memory, optimizer=memory.optimizer + shared, peak=memory.peak + shared)


def _unsupported(model: Model, flops: FlopCounts) -> Mapping[str, int]:
    """Ops without a rule, and ops whose cost could not be evaluated: the result is incomplete."""
    counts = dict(model.unknown_ops)
    for op in flops.unpriced:
        counts[op] = counts.get(op, 0) + 1
    return MappingProxyType(counts)


def step_time(flops: FlopCounts, setup: Setup, memory: MemoryBytes | None = None) -> StepTime | None:
    """Roofline seconds per step at the peak of the precision's matmul dtype (costlens/gpus.py)."""
    if setup.gpu is None:
        return None
    from costlens.gpus import gpu, step_traffic_bytes, time_step
    traffic = step_traffic_bytes(memory.weights, memory.gradients, memory.optimizer, memory.activations) if memory else 0
    return time_step(flops.step, traffic, gpu(setup.gpu), setup.precision, setup.mfu)


def with_stacked_ffn(model: Model, plan: Plan) -> Model:
    """The model with the plan's extra FFN sublayers inserted (seed 004), roles located anew."""
    if plan.stack_ffn <= 0:
        if plan.stack_ffn_width:
            raise PlanError("--stack-ffn-width needs --stack-ffn N")
        return model
    from costlens.roles import locate_roles
    from costlens.stacking import stack_ffn
    graph = stack_ffn(model.graph, model.roles, plan.stack_ffn, plan.stack_ffn_width)
    return replace(model, graph=graph, roles=locate_roles(graph))


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


def _count_params(analysis: StepAnalysis) -> ParamCounts:
    roles = analysis.model.roles
    by_role = {role.value: 0 for role in Role}
    for use in roles.params:
        if use.key in analysis.trainable:
            by_role[use.role.value] += use.n_params
    adapter = sum(a.n_params for a in analysis.adapters)
    base_trainable = sum(by_role.values())
    experts = sum(u.n_params for u in roles.params if u.role is Role.EXPERTS)
    arch = roles.architecture
    inactive = experts - experts * (arch.top_k or 0) // arch.experts if arch.experts else 0
    return ParamCounts(
        total=roles.params_total + adapter, trainable=base_trainable + adapter, adapter=adapter,
        frozen=roles.params_total - base_trainable, trainable_by_role=MappingProxyType(by_role),
        active_per_token=roles.params_total - inactive,
    )


def _assumptions(analysis: StepAnalysis, setup: Setup) -> list[str]:
    notes = ["FLOPs count matrix products only (as torch.utils.flop_counter); elementwise ops, norms, "
             "softmax and the loss are not counted",
             f"optimizer {setup.optimizer} ({setup.optimizer_impl}), precision {setup.precision}, "
             f"{setup.attention} attention" + (", activation checkpointing" if setup.checkpointing else ""),
             "steady state (second step): optimizer state exists, gradients freed by zero_grad(set_to_none=True); "
             "the training loop keeps the loss, not the logits (as the Hugging Face Trainer)"]
    if analysis.model.roles.routers:
        notes.append("experts run only on routed tokens: each expert matmul is priced at k/E of the tokens")
    if setup.precision.endswith("mixed"):
        notes.append("mixed precision: half-precision weights and gradients, fp32 master weights and optimizer "
                     "state; softmax, log-softmax and norms run in fp32 (autocast)")
    return notes


__all__ = ["Adapter", "Estimate", "FlopCounts", "MemoryBytes", "ParamCounts", "StepTime", "default_plans",
           "estimate", "resolve_seq"]
