"""Estimate vs measurement of the same plan: each figure beside the truth, with its error.

From an ONNX file alone, the graph runs as a trainable torch module (executor.py) with the
plan applied per parameter use; the exported graph of an MoE model computes every expert
for every token, so that is what is priced and measured (``moe_dispatch="dense"``). The step
is measured by ``measure_step`` (two steps, the second reported).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from costlens.api import Model, load
from costlens.errors import PlanError
from costlens.estimate import Estimate, estimate
from costlens.gradients import analyze
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
    if base.roles.routers and setup.moe_dispatch == "routed":
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
