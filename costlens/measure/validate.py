"""Estimate vs measurement of the same plan: each figure beside the truth, with its error.

From an ONNX file alone, the graph runs as a trainable torch module (executor.py) with the
plan applied per parameter use; the exported graph of an MoE model computes every expert
for every token, so that is what is priced and measured (``moe_dispatch="dense"``). The step
is measured by ``measure_step`` (two steps, the second reported).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from costlens.api import Model, load
from costlens.errors import PlanError
from costlens.estimate import Estimate, estimate
from costlens.gradients import analyze, expert_token_share
from costlens.plans import Plan, Setup, check_setup

FLOP_TOLERANCE = 0.01


@dataclass(frozen=True)
class Comparison:
    quantity: str
    estimated: int
    measured: int
    tolerance: float | None   # relative; 0 means it must be exact; None: shown, not judged

    @property
    def error(self) -> float:
        if self.measured == 0:
            return 0.0 if self.estimated == 0 else float("inf")
        return (self.estimated - self.measured) / self.measured

    @property
    def ok(self) -> bool:
        if self.tolerance is None:
            return True
        return self.estimated == self.measured if self.tolerance == 0 else abs(self.error) <= self.tolerance


@dataclass(frozen=True)
class Validation:
    plan: Plan
    setup: Setup
    batch: int
    seq: int
    device: str
    source: str
    comparisons: tuple[Comparison, ...]
    estimated_phase: str
    measured_phase: str
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)


def _measurable(setup: Setup, device: str) -> None:
    if setup.precision != "fp32":
        raise PlanError("validate measures fp32 steps (mixed precision keeps fp32 weights under torch autocast, "
                        "which is not the recipe the estimate prices)")
    if setup.checkpointing or setup.attention != "eager":
        raise PlanError("validate runs eager attention without checkpointing")
    if setup.optimizer not in ("adamw", "sgd", "sgd-momentum"):
        raise PlanError(f"validate can run adamw, sgd or sgd-momentum, not {setup.optimizer}")
    if device not in ("cpu", "cuda"):
        raise PlanError(f"unknown device {device!r} (cpu or cuda)")


def validate_onnx(path: str | Path, plan: Plan, setup: Setup, device: str = "cpu", tolerance: float = 0.05,
                  progress: Callable[[str], None] = lambda message: None, inference: bool = False) -> Validation:
    """Price and measure one plan of an ONNX model. Needs the torch extra."""
    from costlens.measure.executor import GraphExecutor, initializer_values
    from costlens.measure.step import measure_step

    setup = check_setup(replace(setup, device=device))
    _measurable(setup, device)
    base = load(path)
    notes = []
    if expert_token_share(base) and setup.moe_dispatch == "routed":
        setup = replace(setup, moe_dispatch="dense")
        notes.append("the exported graph runs every expert on every token: priced and measured as dense dispatch")
    progress("estimating")
    result = estimate(base, plan, setup)
    model: Model = result.model
    analysis = analyze(model, plan, {"batch": result.batch, "seq": result.seq}, routed=False)
    progress("building the trainable module from the graph")
    module = GraphExecutor(model, initializer_values(path), analysis, plan)
    progress(f"measuring two training steps on {device} (batch {result.batch}, seq {result.seq})")
    measured = measure_step(module, result.batch, result.seq, model.roles.architecture.vocab, setup.optimizer,
                            setup.optimizer_impl, device=device)
    validation = _compare(result, measured, setup, device, "onnx", tolerance, tuple(notes))
    if inference:
        progress("measuring inference in onnxruntime (a fresh process)")
        validation = _with_inference(validation, path, model, result)
    return validation


def _with_inference(validation: Validation, path, model: Model, result: Estimate) -> Validation:
    """onnxruntime's peak resident set over its pre-session baseline, beside weights plus the
    forward pass's live-activation peak. Shown, not judged: the runtime's own arena and kernel
    overheads (tens of MB) dominate small models."""
    from costlens.measure.inference import measure_ort_inference
    from costlens.memory import inference_activation_peak

    analysis = analyze(model, Plan(name="inference", train=("all",)), {"batch": result.batch, "seq": result.seq},
                       routed=False)
    estimated = model.roles.params_total * 4 + inference_activation_peak(analysis)
    measured = measure_ort_inference(path, result.batch, result.seq, model.roles.architecture.vocab)
    row = Comparison(f"inference bytes ({measured.provider})", estimated, measured.session_bytes, None)
    note = "inference: onnxruntime's arena and kernel overheads are included in the measurement"
    return replace(validation, comparisons=validation.comparisons + (row,), notes=validation.notes + (note,))


def validate_torch(source: str, plan: Plan, setup: Setup, device: str = "cpu", tolerance: float = 0.05,
                   progress: Callable[[str], None] = lambda message: None) -> Validation:
    """Price a plan from the traced module and measure the real module (built by the import
    spec's factory with its own weights) with the plan applied by parameter name."""
    from costlens.frontends.torch_export import module_from_spec

    setup = check_setup(replace(setup, device=device))
    _measurable(setup, device)
    if plan.stack_ffn or plan.dropout:
        raise PlanError("--stack-ffn and --dropout change the model: validate them from its ONNX graph")
    if not isinstance(source, str) or ":" not in source or Path(source).exists():
        raise PlanError("validating a PyTorch source needs an import spec package.module:factory")
    progress("tracing the module")
    model = load(source)
    progress("building the module with weights on the CPU")
    module, _ = module_from_spec(source, device="cpu")
    return validate_module(model, module, plan, setup, device, tolerance, progress)


def validate_module(model: Model, module, plan: Plan, setup: Setup, device: str = "cpu", tolerance: float = 0.05,
                    progress: Callable[[str], None] = lambda message: None) -> Validation:
    """Price ``plan`` on ``model`` (the traced graph) and measure ``module`` (a torch module with
    the same parameter names, e.g. the routed-dispatch twin of a dense-traced MoE) with it applied."""
    from costlens.measure.step import measure_step

    setup = check_setup(replace(setup, device=device))
    result = estimate(model, plan, setup)
    module = apply_plan(module, model, result)
    progress(f"measuring two training steps on {device} (batch {result.batch}, seq {result.seq})")
    measured = measure_step(module, result.batch, result.seq, model.roles.architecture.vocab, setup.optimizer,
                            setup.optimizer_impl, device=device)
    notes = ("experts priced with moe_dispatch=" + setup.moe_dispatch + ": it must match what the module runs",) \
        if model.roles.routers else ()
    return _compare(result, measured, setup, device, "torch", tolerance, notes)


def apply_plan(module, model: Model, result: Estimate):
    """The plan on a torch module, by the parameter names the torch front end kept: frozen
    weights (requires_grad), LoRA as PEFT runs it (target_modules, target_parameters for 3-D
    expert tensors, per-module ranks), stop-gradients as forward hooks detaching the outputs."""
    by_key = {u.key: u for u in model.roles.params}
    trainable = {by_key[k].constant for k in result.trainable_keys}
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):   # a tie has two names
        names.setdefault(id(parameter), []).append(name)
    for parameter in module.parameters():
        parameter.requires_grad_(any(name in trainable for name in names[id(parameter)]))
    for attention in model.roles.attentions if result.plan.stop_grad else ():
        for site in attention.o_sites:
            use = next(u for u in model.roles.params if u.site == model.graph.nodes[site].name and u.kind == "o")
            module.get_submodule(use.constant.rsplit(".", 1)[0]).register_forward_hook(
                lambda _module, _inputs, output: output.detach())
    if not result.adapters:
        return module
    from peft import LoraConfig, get_peft_model
    targets = [by_key[a.key].constant for a in result.adapters]
    linear = [t.rsplit(".", 1)[0] for t, a in zip(targets, result.adapters) if not a.n_experts]
    tensors = [t for t, a in zip(targets, result.adapters) if a.n_experts]
    ranks = {**{re.escape(m): a.rank for m, a in zip(linear, [a for a in result.adapters if not a.n_experts])},
             **{t.rsplit(".", 1)[-1]: a.rank for t, a in zip(tensors, [a for a in result.adapters if a.n_experts])}}
    config = LoraConfig(r=result.plan.rank, lora_alpha=result.plan.alpha, lora_dropout=result.plan.lora_dropout,
                        bias="none", target_modules=linear, target_parameters=tensors, rank_pattern=ranks)
    wrapped = get_peft_model(module, config)
    for name, parameter in wrapped.base_model.model.named_parameters():
        if name in trainable:                     # base weights the plan trains beside the adapters
            parameter.requires_grad_(True)
    return wrapped


def _compare(result: Estimate, measured, setup: Setup, device: str, source: str, tolerance: float,
             notes: tuple[str, ...]) -> Validation:
    memory = result.memory
    comparisons = (
        Comparison("trainable params", result.params.trainable, measured.n_trainable_params, 0.0),
        Comparison("forward FLOPs", result.flops.forward, measured.forward_flops, FLOP_TOLERANCE),
        Comparison("step FLOPs", result.flops.forward + result.flops.backward, measured.total_flops, FLOP_TOLERANCE),
        Comparison("weights bytes", memory.weights, measured.weights_bytes, tolerance),
        Comparison("gradient bytes", memory.gradients, measured.gradient_bytes, tolerance),
        Comparison("optimizer bytes", memory.optimizer, measured.optimizer_state_bytes, tolerance),
        Comparison("activation bytes", memory.activations, measured.saved_activation_bytes, tolerance),
        Comparison("peak bytes", memory.peak, measured.peak_bytes, tolerance),
    )
    return Validation(result.plan, setup, result.batch, result.seq, device, source, comparisons, memory.peak_phase,
                      str(getattr(measured.peak_phase, "value", measured.peak_phase)), notes)
