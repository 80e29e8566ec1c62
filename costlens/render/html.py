"""The HTML report: a view-model built from a costlens.plan/1 document, rendered by jinja2.

The report reads only the JSON document (so a CI job can estimate once with ``--json`` and
render later); every figure is formatted here and the templates only lay it out. Fields a
document may lack (memory, time, per-layer data, validation) render as "n/a" or a note.

The page is one self-contained file: CSS and SVG inline, no script, no font or image from the
network. Autoescaping is on for every value, so a model whose names hold markup renders it as
text; undefined template variables are errors (StrictUndefined).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from costlens import gpus
from costlens.budgets import Verdict
from costlens.plans import Setup
from costlens.render import units
from costlens.render.check import format_value, seconds, verdict_line
from costlens.render.inspect import _architecture_line

# The templates live inside the package (costlens/templates/) so that an installed costlens
# finds them next to this code: `pip install costlens` ships them as package data
# ([tool.setuptools.package-data] in pyproject.toml); the repository's top-level templates/
# folder only points here. A path beside the code also works from a source checkout.
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

MEMORY_PARTS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer state"),
                ("activations", "activations"))
FLOP_PARTS = (("forward", "forward"), ("backward_input", "backward (input)"),
              ("backward_weight", "backward (weight)"), ("recompute", "recompute"))
NA = "n/a"


def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(document: dict, verdicts: tuple[Verdict, ...] = (), gpu: str | None = None) -> str:
    """The report page for a plan document; ``gpu`` names the memory line (else the document's)."""
    return environment().get_template("report.html.j2").render(report=report_view(document, verdicts, gpu))


# --------------------------------------------------------------------------- view-model

@dataclass(frozen=True)
class Segment:
    x: float
    width: float
    part: str           # CSS class: weights, gradients, ..., forward, backward_input, ...
    title: str


@dataclass(frozen=True)
class Bar:
    label: str
    y: float
    segments: tuple[Segment, ...]
    total: str
    total_x: float
    marker_x: float | None = None     # the step peak, where it differs from the stacked sum
    marker_title: str = ""


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int                          # x where bars start (labels sit left of it)
    bars: tuple[Bar, ...]
    legend: tuple[tuple[str, str], ...]
    ticks: tuple[tuple[float, str], ...]
    line_x: float | None = None        # the GPU's memory
    line_label: str = ""
    line_off_scale: bool = False       # the GPU is far larger than every plan: a label, no line


@dataclass(frozen=True)
class PlanRow:
    name: str
    spec: str
    trainable: str
    share: str
    adapter: str
    frozen: str
    peak: str
    peak_phase: str
    forward: str
    backward: str
    step: str
    seconds: str
    verdict: str                        # "pass", "fail" or "" (no budget)


@dataclass(frozen=True)
class LayerTable:
    per_layer: bool                     # False: the document has no per-layer data; rows are roles
    columns: tuple[str, ...]
    rows: tuple[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], ...]   # (label, ((text, tensors), ...))


@dataclass(frozen=True)
class Report:
    title: str
    source: str
    schema: str
    architecture: str
    params_total: str
    params_exact: str
    roles: tuple[tuple[str, str, str, str], ...]      # role, params, exact, share
    setup: tuple[tuple[str, str], ...]
    gpu: str
    plans: tuple[PlanRow, ...]
    memory_chart: Chart | None
    flops_chart: Chart
    flops_rows: tuple[tuple[str, ...], ...]
    layers: LayerTable
    validation: tuple[tuple[str, ...], ...]
    assumptions: tuple[tuple[str, str], ...]          # text, plans it applies to
    unsupported: tuple[tuple[str, str], ...]          # op, count
    warnings: tuple[str, ...]
    incomplete: bool
    verdicts: tuple[tuple[str, ...], ...]             # plan, limit, value, maximum, written, status, line
    n_failed: int


def report_view(document: dict, verdicts: tuple[Verdict, ...] = (), gpu: str | None = None) -> Report:
    model, setup, plans = document["model"], document.get("setup") or {}, document["plans"]
    accelerator = gpus.gpu(gpu or setup.get("gpu")) if (gpu or setup.get("gpu")) else None
    total = model["params_total"]
    failed = {v.plan for v in verdicts if not v.passed}
    judged = {v.plan for v in verdicts}
    rows = tuple(_plan_row(plan, setup, accelerator, failed, judged) for plan in plans)
    assumptions: dict[str, list[str]] = {}
    unsupported = dict(model.get("unknown_ops") or {})
    for plan in plans:
        for text in plan.get("assumptions", ()):
            assumptions.setdefault(text, []).append(plan["name"])
        unsupported.update(plan.get("unsupported_ops") or {})
    names = [plan["name"] for plan in plans]
    return Report(
        title=f"costlens report: {model['source']}", source=str(model["source"]),
        schema=str(document.get("schema", NA)), architecture=_architecture_line(model["architecture"]),
        params_total=units.params(total), params_exact=f"{total:,}",
        roles=tuple((role, units.params(n), f"{n:,}", units.share(n, total))
                    for role, n in model["params_by_role"].items() if n),
        setup=_setup_items(setup, accelerator), gpu=accelerator.name if accelerator else "",
        plans=rows, memory_chart=_memory_chart(plans, accelerator), flops_chart=_flops_chart(plans),
        flops_rows=tuple((p["name"], *(units.flops(p["flops"].get(key, 0)) for key, _ in FLOP_PARTS),
                          units.flops(p["flops"]["step"]), units.flops(p["flops"].get("per_token", 0)))
                         for p in plans),
        layers=_layer_table(document), validation=_validation_rows(document),
        assumptions=tuple((text, "all plans" if len(on) == len(names) else ", ".join(on))
                          for text, on in assumptions.items()),
        unsupported=tuple((op, str(n)) for op, n in sorted(unsupported.items())),
        warnings=tuple(str(w) for w in model.get("warnings") or ()), incomplete=bool(model.get("incomplete")),
        verdicts=tuple((v.plan, v.limit.value, format_value(v.limit, v.value), format_value(v.limit, v.maximum),
                        v.written, "pass" if v.passed else "fail", verdict_line(v)) for v in verdicts),
        n_failed=sum(not v.passed for v in verdicts),
    )


def _setup_items(setup: dict, accelerator) -> tuple[tuple[str, str], ...]:
    keys = ("batch", "seq", "optimizer", "optimizer_impl", "precision", "attention", "checkpointing", "mfu")
    items = [(key, NA if setup.get(key) is None else _text(setup[key])) for key in keys]
    gpu = NA if accelerator is None else (f"{accelerator.name} ({units.nbytes(accelerator.memory_bytes)}, "
                                          f"{accelerator.peak_flops / 1e12:g} TFLOP/s dense bf16)")
    return (*items, ("gpu", gpu))


def _text(value) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


def _seconds(plan: dict, setup: dict, accelerator) -> str:
    time = plan.get("time") or {}
    if time.get("seconds_per_step") is not None:
        return seconds(time["seconds_per_step"])
    if accelerator is None:
        return NA
    mfu = setup.get("mfu") or Setup.mfu          # the estimator's default utilization
    return f"{seconds(gpus.seconds_per_step(plan['flops']['step'], accelerator, mfu))} (at {mfu:.0%} MFU)"


def _plan_row(plan: dict, setup: dict, accelerator, failed: set, judged: set) -> PlanRow:
    params, flops, memory = plan["params"], plan["flops"], plan.get("memory_bytes") or {}
    return PlanRow(
        name=plan["name"], spec=plan.get("spec", ""), trainable=units.params(params["trainable"]),
        share=units.share(params["trainable"], params["total"]),
        adapter=units.params(params["adapter"]) if params.get("adapter") else "-",
        frozen=units.params(params.get("frozen", 0)),
        peak=units.nbytes(memory["peak"]) if memory.get("peak") is not None else NA,
        peak_phase=plan.get("peak_phase") or NA, forward=units.flops(flops["forward"]),
        backward=units.flops(flops["backward"]), step=units.flops(flops["step"]),
        seconds=_seconds(plan, setup, accelerator),
        verdict="fail" if plan["name"] in failed else "pass" if plan["name"] in judged else "")


# --------------------------------------------------------------------------- charts

CHART_WIDTH, LABEL_WIDTH, BAR_HEIGHT, BAR_GAP, TOP = 1100, 210, 22, 12, 28


def _bars(plans: list[dict], parts, values_of, scale: float, fmt) -> list[Bar]:
    span = CHART_WIDTH - LABEL_WIDTH - 110
    bars = []
    for row, plan in enumerate(plans):
        values = values_of(plan)
        x, segments = float(LABEL_WIDTH), []
        for key, label in parts:
            width = span * values.get(key, 0) / scale if scale else 0.0
            if values.get(key):
                segments.append(Segment(round(x, 1), round(width, 1), key, f"{plan['name']}: {label} {fmt(values[key])}"))
            x += width
        bars.append(Bar(plan["name"], TOP + row * (BAR_HEIGHT + BAR_GAP), tuple(segments),
                        fmt(sum(values.get(key, 0) for key, _ in parts)), round(x + 6, 1)))
    return bars


def _ticks(scale: float, fmt) -> tuple[tuple[float, str], ...]:
    span = CHART_WIDTH - LABEL_WIDTH - 110
    return tuple((round(LABEL_WIDTH + span * i / 4, 1), fmt(scale * i / 4)) for i in range(5))


def _memory_chart(plans: list[dict], accelerator) -> Chart | None:
    """Stacked steady parts and the step peak per plan, against the GPU's memory. A GPU more
    than twice the largest plan would squash the bars: its line is then marked off scale."""
    if not all((p.get("memory_bytes") or {}).get("peak") is not None for p in plans):
        return None
    totals = [max(sum(p["memory_bytes"].get(k, 0) for k, _ in MEMORY_PARTS), p["memory_bytes"]["peak"]) for p in plans]
    gpu_bytes = accelerator.memory_bytes if accelerator else 0
    on_scale = gpu_bytes <= 2 * max(totals)
    scale = max(totals + [gpu_bytes if on_scale else 0]) * 1.05 or 1
    span = CHART_WIDTH - LABEL_WIDTH - 110
    bars = []
    for bar, plan in zip(_bars(plans, MEMORY_PARTS, lambda p: p["memory_bytes"], scale, units.nbytes), plans):
        peak = plan["memory_bytes"]["peak"]
        peak_x = round(LABEL_WIDTH + span * peak / scale, 1)
        bars.append(Bar(bar.label, bar.y, bar.segments, f"peak {units.nbytes(peak)}", max(bar.total_x, peak_x + 6), peak_x,
                        f"{plan['name']}: step peak {units.nbytes(peak)} ({plan.get('peak_phase') or NA})"))
    line_x, line_label = None, ""
    if accelerator:
        line_label = f"{accelerator.name} {units.nbytes(accelerator.memory_bytes)}"
        line_x = round(LABEL_WIDTH + span * gpu_bytes / scale, 1) if on_scale else float(CHART_WIDTH - 4)
        if not on_scale:
            line_label += f" (off scale: {gpu_bytes / max(totals):.0f}x the largest plan) \u2192"
    return Chart(CHART_WIDTH, TOP + len(plans) * (BAR_HEIGHT + BAR_GAP) + 30, LABEL_WIDTH, tuple(bars),
                 tuple(MEMORY_PARTS), _ticks(scale, units.nbytes), line_x, line_label, not on_scale)


def _flops_chart(plans: list[dict]) -> Chart:
    scale = max(p["flops"]["step"] for p in plans) * 1.05 or 1
    bars = _bars(plans, FLOP_PARTS, lambda p: p["flops"], scale, units.flops)
    return Chart(CHART_WIDTH, TOP + len(plans) * (BAR_HEIGHT + BAR_GAP) + 30, LABEL_WIDTH, tuple(bars),
                 tuple(FLOP_PARTS), _ticks(scale, units.flops))


# --------------------------------------------------------------------------- per layer, validation

def _layer_table(document: dict) -> LayerTable:
    """Per layer and plan: trainable tensors and saved activations, from ``plans[].layers``;
    a document without them gets trainable parameters per role instead."""
    plans = document["plans"]
    columns = tuple(p["name"] for p in plans)
    if all(p.get("layers") for p in plans):
        labels = []
        for plan in plans:
            for layer in plan["layers"]:
                if layer.get("layer") not in labels:
                    labels.append(layer.get("layer"))
        rows = []
        for label in labels:
            cells = []
            for plan in plans:
                entry = next((e for e in plan["layers"] if e.get("layer") == label), {})
                tensors = tuple(str(t) for t in entry.get("trainable", ())) + \
                    tuple(f"{t} (LoRA)" for t in entry.get("adapters", ()))
                activation = entry.get("activation_bytes")
                text = f"{units.params(entry.get('trainable_params', 0))} trainable; activations " + \
                    (units.nbytes(activation) if activation is not None else NA)
                cells.append((text, tensors))
            rows.append(("outside layers" if label is None else f"layer {label}", tuple(cells)))
        return LayerTable(True, columns, tuple(rows))
    roles = [r for r, n in document["model"]["params_by_role"].items() if n]
    rows = [(role, tuple((units.params(p["params"]["trainable_by_role"].get(role, 0)), ()) for p in plans))
            for role in roles]
    rows.append(("LoRA adapters", tuple((units.params(p["params"].get("adapter", 0)), ()) for p in plans)))
    return LayerTable(False, columns, tuple(rows))


def _validation_rows(document: dict) -> tuple[tuple[str, ...], ...]:
    """plans[].validation: {quantity: {estimated, measured, error}} (error: relative, e.g. 0.03)."""
    rows = []
    for plan in document["plans"]:
        for quantity, entry in (plan.get("validation") or {}).items():
            if not isinstance(entry, dict):
                continue
            fmt = _formatter(quantity)
            error = entry.get("error")
            rows.append((plan["name"], str(quantity), fmt(entry.get("estimated")), fmt(entry.get("measured")),
                         f"{error:+.1%}" if isinstance(error, (int, float)) else NA))
    return tuple(rows)


def _formatter(quantity: str):
    def fmt(value):
        if not isinstance(value, (int, float)):
            return NA if value is None else str(value)
        if "bytes" in quantity or "memory" in quantity:
            return units.nbytes(int(value))
        if "flops" in quantity:
            return units.flops(int(value))
        if "param" in quantity:
            return units.params(int(value))
        return f"{value:g}"
    return fmt

