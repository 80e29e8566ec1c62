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

from costlens.frontends.source import load_graph
from costlens.model import Model, analyse
from costlens.errors import PlanError
from costlens.estimate import Estimate, estimate
from costlens.gradients import analyze, expert_token_share
from costlens.plans import Plan, Setup, check_setup, running_dtype

FLOP_TOLERANCE = 0.01


@dataclass(frozen=True)
class Comparison:
    """One quantity estimated and measured (bytes, FLOPs or parameters) and its tolerance."""

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
    """A plan's estimate beside a measured training step: each quantity compared, the peak phases,
    and which truth was measured (the real module, or the costlens executor)."""

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
    truth: str = ""          # what was measured, e.g. "real module (transformers 5.24 LlamaForCausalLM)"

    @property
    def truth_label(self) -> str:
        """``truth``, or what ``source`` measured when the path did not name it."""
        return self.truth or {"onnx": "costlens executor (ONNX graph)"}.get(self.source, self.source)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)


def _measurable(setup: Setup, device: str) -> None:
    """What the executor and the import-spec path run: fp32 eager steps (the real transformers
    module, validate_config, runs every recipe)."""
    if setup.precision != "fp32":
        raise PlanError("validate measures fp32 steps (mixed precision keeps fp32 weights under torch autocast, "
                        "which is not the recipe the estimate prices)")
    if setup.checkpointing or setup.attention != "eager":
        raise PlanError("validate runs eager attention without checkpointing on an ONNX graph or import spec "
                        "(a Hugging Face config, or an ONNX file with --source-config, runs every recipe)")
    if getattr(setup, "base_quant", None):
        raise PlanError(f"validate cannot measure --quant {setup.base_quant} (a bitsandbytes base on CUDA)")
    if setup.loss != "ce":
        raise PlanError(f"--loss {setup.loss}: the executor and import-spec paths compute the 'ce' loss")
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
    base = analyse(load_graph(path))
    notes = []
    if expert_token_share(base) and setup.moe_dispatch == "routed":
        setup = replace(setup, moe_dispatch="dense")
        notes.append("the exported graph runs every expert on every token: priced and measured as dense dispatch")
    progress("estimating")
    result = estimate(base, plan, setup)
    _preflight(result, device)
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


def _preflight(result: Estimate, device: str) -> None:
    from costlens.measure.preflight import check_fits
    check_fits(result.memory.peak, 4 * result.params.total, device)


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
    model = analyse(load_graph(source))
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
    _preflight(result, device)
    module = apply_plan(module, model, result)
    progress(f"measuring two training steps on {device} (batch {result.batch}, seq {result.seq})")
    measured = measure_step(module, result.batch, result.seq, model.roles.architecture.vocab, setup.optimizer,
                            setup.optimizer_impl, device=device)
    notes = ("experts priced with moe_dispatch=" + setup.moe_dispatch + ": it must match what the module runs",) \
        if model.roles.routers else ()
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return replace(_compare(result, measured, setup, device, "torch", tolerance, notes),
                   truth=f"torch module ({type(base).__name__})")


def apply_plan(module, model: Model, result: Estimate):
    """The plan on a torch module, by the parameter names the torch front end kept: frozen
    weights (requires_grad), LoRA as PEFT runs it (target_modules, target_parameters for 3-D
    expert tensors, per-module ranks), stop-gradients as forward hooks detaching the outputs."""
    by_key = {u.key: u for u in model.roles.params}
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):   # a tie has two names
        names.setdefault(id(parameter), []).append(name)
    needed = {by_key[k].constant for k in result.trainable_keys} | {by_key[a.key].constant for a in result.adapters}
    rename = _module_names(needed, {n for group in names.values() for n in group})
    by_key = {k: replace(u, constant=rename(u.constant)) for k, u in by_key.items()}
    trainable = {by_key[k].constant for k in result.trainable_keys}
    for parameter in module.parameters():
        parameter.requires_grad_(any(name in trainable for name in names[id(parameter)]))
    for attention in model.roles.attentions if result.plan.stop_grad else ():
        for site in attention.o_sites:
            use = next(u for u in model.roles.params if u.site == model.graph.nodes[site].name and u.kind == "o")
            module.get_submodule(rename(use.constant).rsplit(".", 1)[0]).register_forward_hook(
                lambda _module, _inputs, output: output.detach())
    if not result.adapters:
        return module
    import torch
    from peft import LoraConfig, get_peft_model
    from costlens.peft_config import named_targets_only
    try:
        from transformers.pytorch_utils import Conv1D      # GPT-2's linear, which PEFT wraps as a module
    except ImportError:                                    # a plain torch module without transformers
        Conv1D = torch.nn.Linear
    linear, tensors, ranks, alphas = [], [], {}, {}
    for adapter in result.adapters:
        name = by_key[adapter.key].constant
        layer = name.rsplit(".", 1)[0]
        # a 3-D expert tensor, or a weight whose module PEFT cannot wrap (a TopKRouter is no nn.Linear):
        # adapted as the parameter (PEFT's ParamWrapper; same adapter parameters as on a linear)
        by_parameter = adapter.n_experts or not isinstance(module.get_submodule(layer), (torch.nn.Linear, Conv1D))
        (tensors if by_parameter else linear).append(name if by_parameter else layer)
        # PEFT's get_pattern_key matches (.*\.)?(key)$ on the module name (a parameter's: module.param):
        # the full escaped name gives each adapter its own rank (a layer-scoped rank included)
        pattern = re.escape(name if by_parameter else layer)
        ranks[pattern] = adapter.rank
        if adapter.alpha != result.plan.alpha:     # a target's own alpha (PEFT's gate_up_proj at 2r takes 2 alpha)
            alphas[pattern] = adapter.alpha
    config = LoraConfig(r=result.plan.rank, lora_alpha=result.plan.alpha, lora_dropout=result.plan.lora_dropout,
                        bias="none", target_modules=linear, target_parameters=tensors, rank_pattern=ranks,
                        alpha_pattern=alphas, use_dora=result.plan.dora)
    # the plan priced is this list of full names; on transformers 5 PEFT would rewrite MoE configs by
    # their last name part (model.layers.0.mlp.gate_proj of a dense layer -> every layer's fused
    # experts at twice the rank), adapting another plan than the one priced: turned off for this call
    import warnings
    with named_targets_only(), warnings.catch_warnings():
        # PEFT 0.21 checks rank_pattern/alpha_pattern keys against targeted module names only, so the
        # exact key of a target_parameters tensor is reported "ignored" although its rank is applied;
        # every key here is the full name of an adapted module or tensor, so none can really miss
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match",
                                category=RuntimeWarning)
        wrapped = get_peft_model(module, config)
    for name, parameter in wrapped.base_model.model.named_parameters():
        if name in trainable:                     # base weights the plan trains beside the adapters
            parameter.requires_grad_(True)
    return wrapped


def _module_names(needed: set[str], module_names: set[str]):
    """name in the graph -> name in the module. An exported graph may prefix the module's
    names (the HF corpus wraps the model as ``model.``): the shortest suffix that names a
    parameter of the module is it. A trainable name the module lacks is a PlanError."""
    def rename(name: str) -> str:
        parts = name.split(".")
        for start in range(len(parts)):
            if ".".join(parts[start:]) in module_names:
                return ".".join(parts[start:])
        return name
    missing = sorted(name for name in needed if rename(name) not in module_names)
    if missing:
        raise PlanError(f"the measured module has no parameter named {missing[0]!r} "
                        f"({len(missing)} planned parameters unmatched): it is not the module of this graph")
    return rename


def _compare(result: Estimate, measured, setup: Setup, device: str, source: str, tolerance: float,
             notes: tuple[str, ...]) -> Validation:
    memory = result.memory
    comparisons = (
        Comparison("trainable params", result.params.trainable, measured.n_trainable_params, 0.0),
        Comparison("forward FLOPs", result.flops.forward, measured.forward_flops, FLOP_TOLERANCE),
        Comparison("step FLOPs", result.flops.step, measured.total_flops, FLOP_TOLERANCE),
        Comparison("weights bytes", memory.weights, measured.weights_bytes, tolerance),
        Comparison("gradient bytes", memory.gradients, measured.gradient_bytes, tolerance),
        Comparison("optimizer bytes", memory.optimizer, measured.optimizer_state_bytes, tolerance),
        Comparison("activation bytes", memory.activations, measured.saved_activation_bytes, tolerance),
        Comparison("peak bytes", memory.peak, measured.peak_bytes, tolerance),
    )
    if measured.allocator is not None:            # CUDA: the caching allocator's own peak, shown beside
        comparisons += (Comparison("peak bytes (CUDA allocator)", memory.peak, measured.allocator.step_bytes, None),)
    return Validation(result.plan, setup, result.batch, result.seq, device, source, comparisons, memory.peak_phase,
                      str(getattr(measured.peak_phase, "value", measured.peak_phase)), notes)


# --------------------------------------------------------------------------- the real transformers module

def validate_config(source, plan: Plan, setup: Setup, dims=None, device: str = "cpu", tolerance: float = 0.05,
                    progress: Callable[[str], None] = lambda message: None, estimate_from=None,
                    free_memory: int | None = None) -> Validation:
    """Price ``plan`` on a Hugging Face config (a config.json, a model folder, a hub id or a
    config object), shrunk to ``dims`` (hf_module.Dims) when given, and measure the real
    transformers module of the same (shrunk) config with the plan and the setup's recipe
    applied. ``estimate_from``: an ONNX file exported from that module, priced instead of the
    config (the corpus case; it must not be shrunk). Needs the torch extra."""
    from costlens.frontends.hf_config import read_config
    from costlens.frontends.source import SourceKind, classify, torch_source
    from costlens.measure.hf_module import (Dims, build_real_module, check_recipe,
                                            shrink_config, step_recipe, to_half_after_plan, truth_label)
    from costlens.measure.preflight import check_fits
    from costlens.measure.step import measure_step

    setup = check_setup(replace(setup, device=device))
    check_recipe(setup, device)
    if plan.stack_ffn:
        raise PlanError("--stack-ffn adds layers the real module does not have: validate it from an ONNX graph")
    dims = dims or Dims()
    found = classify(source)
    if found.kind not in (SourceKind.HF_CONFIG, SourceKind.HUB_ID, SourceKind.CONFIG_OBJECT):
        raise PlanError(f"{found.text}: the real module is built from a Hugging Face config (config.json, model "
                        "folder or hub id)")
    config = torch_source(found)[0] if found.kind is not SourceKind.HF_CONFIG else read_config(found.path)
    if dims.given:
        if estimate_from is not None:
            raise PlanError("a shrunk model (--tiny, --layers, ...) is priced from its config, not the ONNX file")
        config = shrink_config(config, dims)
    progress("tracing the config")
    traced = analyse(load_graph(config, dtype=running_dtype(setup.precision)))   # the dtype that runs
    by_name = estimate(traced, plan, setup)        # the plan on the module's own parameter names
    result = by_name
    if estimate_from is not None:                  # priced from the exported graph (its names differ:
        progress("loading the ONNX graph")         # folded transposes become val_N constants)
        result = estimate(analyse(load_graph(estimate_from)), plan, setup)
    check_fits(result.memory.peak, 4 * result.params.total, device, free_memory)
    progress("building the real transformers module (random weights)")
    module = build_real_module(config, setup, dropout=plan.dropout)
    module = to_half_after_plan(apply_plan(module, traced, by_name), setup)
    truth = truth_label(module)
    progress(f"measuring two training steps on {device} (batch {result.batch}, seq {result.seq})")
    measured = measure_step(module, result.batch, result.seq, config.vocab_size, setup.optimizer,
                            setup.optimizer_impl, device=device, recipe=step_recipe(setup))
    notes = _recipe_notes(setup, module)
    validation = _compare(result, measured, setup, device, "hf", tolerance, notes)
    return replace(validation, truth=truth)


def _recipe_notes(setup: Setup, module) -> tuple[str, ...]:
    notes = []
    if setup.attention == "fused":
        notes.append("attention 'fused' is measured with attn_implementation='sdpa' (torch picks the kernel)")
    config = getattr(module, "config", None)
    experts = getattr(config, "_experts_implementation", None) or getattr(config, "experts_implementation", None)
    has_experts = any(getattr(config, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts"))
    if experts and has_experts:
        notes.append(f"experts run transformers' {experts!r} implementation")
    if setup.precision == "fp16-autocast":
        notes.append("fp16 autocast on the CPU runs without a GradScaler (it holds one scalar)")
    if setup.base_quant:
        notes.append(f"base loaded by from_pretrained with bitsandbytes {setup.base_quant} (no "
                     "prepare_model_for_kbit_training); the dequantized weight copy is priced at the peak as a bound")
    if setup.optimizer == "adamw-8bit":
        notes.append("adamw-8bit runs bitsandbytes.optim.AdamW8bit (tensors under 4,096 elements keep fp32 moments)")
    return tuple(notes)


def corpus_config(onnx_path) -> Path | None:
    """The ARCH.config.json beside an ONNX file of the HF corpus (its index.json, schema
    costlens.hf_corpus/1, names the file under archs.ARCH.exporters.*.file), or None."""
    import json
    path = Path(onnx_path)
    index = path.parent / "index.json"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != "costlens.hf_corpus/1":
        return None
    for arch, entry in (data.get("archs") or {}).items():
        for exporter in (entry.get("exporters") or {}).values():
            if isinstance(exporter, dict) and exporter.get("file") == path.name:
                config = path.parent / f"{arch}.config.json"
                return config if config.is_file() else None
    return None
