"""The HTML report: a view-model built from a costlens.plan/1 document, rendered by jinja2.

The report reads only the JSON document (so a CI job can estimate once with ``--json`` and
render later); every figure is formatted here and the templates only lay it out. Fields a
document may lack (memory, time, per-layer data, validation) render as "n/a" or a note.

The page is one self-contained file: CSS and SVG inline, no script, no font or image from the
network. Autoescaping is on for every value, so a model whose names hold markup renders it as
text; undefined template variables are errors (StrictUndefined).
"""
from __future__ import annotations

import math
import re
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
    """The jinja2 environment over TEMPLATES: autoescaped (a model's names may hold markup) and strict
    (an undefined variable is an error, not an empty cell)."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(document: dict, verdicts: tuple[Verdict, ...] = (), gpu: str | None = None) -> str:
    """The report page for a plan document; ``gpu`` names the memory line (else the document's)."""
    return environment().get_template("report.html.j2").render(report=report_view(document, verdicts, gpu))


# --------------------------------------------------------------------------- view-model

@dataclass(frozen=True)
class Segment:
    """One part of a stacked bar; ``x`` and ``width`` in SVG user units (pixels of the chart)."""

    x: float
    width: float
    part: str           # CSS class: weights, gradients, ..., forward, backward_input, ...
    title: str


@dataclass(frozen=True)
class Bar:
    """One plan's stacked bar; positions (``y``, ``total_x``, ``marker_x``) in SVG pixels, ``total``
    the label at its end (the formatted sum, or the step peak on the memory chart)."""

    label: str
    y: float
    segments: tuple[Segment, ...]
    total: str
    total_x: float
    marker_x: float | None = None     # the step peak, where it differs from the stacked sum
    marker_title: str = ""


@dataclass(frozen=True)
class Chart:
    """A horizontal stacked-bar chart (memory or FLOPs per plan); sizes and positions in SVG pixels,
    ``ticks`` as (x, label)."""

    width: int
    height: int
    left: int                          # x where bars start (labels sit left of it)
    bars: tuple[Bar, ...]
    legend: tuple[tuple[str, str], ...]
    ticks: tuple[tuple[float, str], ...]
    line_x: float | None = None        # the GPU's memory
    line_label: str = ""
    line_off_scale: bool = False       # the GPU is far larger than every plan: a label, no line
    note: str = ""                     # why a bar's stack passes its peak tick, where one does


@dataclass(frozen=True)
class PlanRow:
    """One plan's row of the summary table, every figure already formatted (params, bytes, FLOPs, seconds)."""

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
    fits: str = ""                      # with a GPU: "fits (62%)" or "does not fit (+3.1 GiB)"; "" without
    job: tuple[str, str, str] = ()      # with a job: steps, GPU-hours, cost


@dataclass(frozen=True)
class LayerTable:
    """Trainable parameters and saved activation bytes per layer and plan (without per-layer data:
    trainable parameters per role), each cell formatted as (text, tensor names)."""

    per_layer: bool                     # False: the document has no per-layer data; rows are roles
    columns: tuple[str, ...]
    rows: tuple[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], ...]   # (label, ((text, tensors), ...))


@dataclass(frozen=True)
class Report:
    """The view-model of the report page: every figure formatted as text, so the templates only lay it out."""

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
    job: str = ""                                     # the job priced (tokens, accumulation, price), if any


def report_view(document: dict, verdicts: tuple[Verdict, ...] = (), gpu: str | None = None) -> Report:
    """The Report of a costlens.plan/1 document and its budget verdicts; ``gpu`` (else the document's
    setup.gpu) draws the memory line and the fits column."""
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
        n_failed=sum(not v.passed for v in verdicts), job=_job_line(setup),
    )


def _job_line(setup: dict) -> str:
    job = setup.get("job")
    if not job:
        return ""
    price = (f", {job['price_per_gpu_hour']:g} per GPU-hour ({job['price_source']})"
             if job.get("price_per_gpu_hour") is not None else ", no price given")
    return f"{job['tokens']:,} tokens, gradient accumulation {job['grad_accum']}, {setup.get('gpus', 1)} GPU(s){price}"


def _setup_items(setup: dict, accelerator) -> tuple[tuple[str, str], ...]:
    keys = ("batch", "seq", "optimizer", "optimizer_impl", "precision", "attention", "loss", "experts_impl",
            "checkpointing", "mfu")
    items = [(key, NA if setup.get(key) is None else _text(setup[key])) for key in keys]
    if "base_quant" in setup:        # None: the base weights are not quantized
        items.append(("base weights", f"quantized {setup['base_quant']}" if setup["base_quant"] else "not quantized"))
    dtype = gpus.compute_dtype(str(setup.get("precision") or "bf16-mixed"), accelerator) if accelerator else None
    gpu = NA if accelerator is None else (f"{accelerator.name} ({units.nbytes(accelerator.memory_bytes)}, "
                                          f"{accelerator.peak(dtype) / 1e12:g} TFLOP/s dense {dtype}, the "
                                          f"precision's matmul peak)")
    derived = [(f"{key} (derived)", str(why)) for key, why in (setup.get("derived") or {}).items()]
    return (*items, ("gpu", gpu), *derived)


def _text(value) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


def _seconds(plan: dict, setup: dict, accelerator) -> str:
    time = plan.get("time") or {}
    if time.get("seconds_per_step") is not None:
        basis = f" ({time['dtype']} peak, {time['bound']}-bound)" if time.get("dtype") and time.get("bound") else ""
        return seconds(time["seconds_per_step"]) + basis
    if accelerator is None:
        return NA
    mfu = setup.get("mfu") or Setup.mfu          # the estimator's default utilization
    dtype = gpus.compute_dtype(str(setup.get("precision") or "fp32"), accelerator)
    step = gpus.seconds_per_step(plan['flops']['step'], accelerator, mfu, dtype)
    return f"{seconds(step)} (at {mfu:.0%} MFU of the {dtype} peak; compute only)"


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
        verdict="fail" if plan["name"] in failed else "pass" if plan["name"] in judged else "",
        fits=_fits(plan, accelerator), job=_job_cells(plan))


def _fits(plan: dict, accelerator) -> str:
    """Whether the plan's step peak (per rank, on a parallel layout) fits the GPU's memory."""
    if accelerator is None:
        return ""
    peak = ((plan.get("parallel") or {}).get("per_rank_bytes") or {}).get("peak")
    peak = peak if peak is not None else (plan.get("memory_bytes") or {}).get("peak")
    if peak is None:
        return NA
    if peak <= accelerator.memory_bytes:
        return f"fits ({peak / accelerator.memory_bytes:.0%})"
    return f"does not fit (+{units.nbytes(peak - accelerator.memory_bytes)})"


def _job_cells(plan: dict) -> tuple[str, str, str]:
    job = plan.get("job")
    if not job:
        return ()
    return (f"{job['steps']:,}", NA if job.get("gpu_hours") is None else units.amount(job["gpu_hours"]),
            NA if job.get("cost") is None else units.amount(job["cost"]))


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


BYTE_UNITS = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))
FLOP_UNITS = ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP"), (1, "FLOP"))


def nice_ticks(largest: float, unit_table) -> tuple[float, tuple[tuple[float, str], ...]]:
    """(axis end, ((value, label), ...)): ticks at 1-2-5 steps of the unit the largest value is shown
    in (2 GiB, 4 GiB, ...; never 32.95 GiB), about four of them, the axis ending on the last tick."""
    largest = max(largest, 1.0)
    scale, suffix = next(((s, u) for s, u in unit_table if largest >= s), unit_table[-1])
    raw = largest / scale / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    count = math.ceil(largest / scale / step - 1e-9)
    ticks = tuple((i * step * scale, f"{i * step:g} {suffix}" if i else "0") for i in range(count + 1))
    return ticks[-1][0], ticks


def _ticks(scale: float, ticks) -> tuple[tuple[float, str], ...]:
    span = CHART_WIDTH - LABEL_WIDTH - 110
    return tuple((round(LABEL_WIDTH + span * value / scale, 1), label) for value, label in ticks)


def _memory_chart(plans: list[dict], accelerator) -> Chart | None:
    """Stacked steady parts and the step peak per plan, against the GPU's memory. A GPU more
    than twice the largest plan would squash the bars: its line is then marked off scale."""
    if not all((p.get("memory_bytes") or {}).get("peak") is not None for p in plans):
        return None
    totals = [max(sum(p["memory_bytes"].get(k, 0) for k, _ in MEMORY_PARTS), p["memory_bytes"]["peak"]) for p in plans]
    gpu_bytes = accelerator.memory_bytes if accelerator else 0
    on_scale = gpu_bytes <= 2 * max(totals)
    scale, ticks = nice_ticks(max(totals + [gpu_bytes if on_scale else 0]), BYTE_UNITS)
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
    past = [p["name"] for p in plans
            if sum(p["memory_bytes"].get(k, 0) for k, _ in MEMORY_PARTS) > p["memory_bytes"]["peak"]]
    note = (f"{', '.join(past)}: the stacked parts pass the peak tick because they are never all alive at once "
            "(saved activations are freed during backward, before the optimizer step; the tick is the largest "
            "live total)") if past else ""
    return Chart(CHART_WIDTH, TOP + len(plans) * (BAR_HEIGHT + BAR_GAP) + 30, LABEL_WIDTH, tuple(bars),
                 tuple(MEMORY_PARTS), _ticks(scale, ticks), line_x, line_label, not on_scale, note)


def _flops_chart(plans: list[dict]) -> Chart:
    scale, ticks = nice_ticks(max(p["flops"]["step"] for p in plans), FLOP_UNITS)
    bars = _bars(plans, FLOP_PARTS, lambda p: p["flops"], scale, units.flops)
    return Chart(CHART_WIDTH, TOP + len(plans) * (BAR_HEIGHT + BAR_GAP) + 30, LABEL_WIDTH, tuple(bars),
                 tuple(FLOP_PARTS), _ticks(scale, ticks))


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
        rows = [(label, tuple(_layer_cell(plan, label) for plan in plans)) for label in labels]
        return LayerTable(True, columns, tuple(_fold_layers(rows)))
    roles = [r for r, n in document["model"]["params_by_role"].items() if n]
    rows = [(role, tuple((units.params(p["params"]["trainable_by_role"].get(role, 0)), ()) for p in plans))
            for role in roles]
    rows.append(("LoRA adapters", tuple((units.params(p["params"].get("adapter", 0)), ()) for p in plans)))
    return LayerTable(False, columns, tuple(rows))


def _layer_cell(plan: dict, label) -> tuple[str, tuple[str, ...]]:
    """(text, tensor names) of one plan's layer ``label``."""
    entry = next((e for e in plan["layers"] if e.get("layer") == label), {})
    tensors = tuple(str(t) for t in entry.get("trainable", ())) + \
        tuple(f"{t} (LoRA)" for t in entry.get("adapters", ()))
    activation = entry.get("activation_bytes")
    text = f"{units.params(entry.get('trainable_params', 0))} trainable; activations " + \
        (units.nbytes(activation) if activation is not None else NA)
    return text, tensors


def _without_index(cells: tuple, label) -> tuple:
    """The cells with the layer's own index in each tensor name written ``*`` (layers.3.q -> layers.*.q):
    what identical layers share."""
    if not isinstance(label, int):
        return cells
    own = re.compile(rf"(?<![0-9]){label}(?![0-9])")
    return tuple((text, tuple(own.sub("*", name) for name in tensors)) for text, tensors in cells)


def _fold_layers(rows: list) -> list:
    """Runs of consecutive layers whose cells are identical in every plan (up to the layer index in
    tensor names) become one row, "layers 0\u201331 \u00d732", instead of 32 repeated rows."""
    folded = []      # [first, last, cells, cells without index]
    for label, cells in rows:
        shared = _without_index(cells, label)
        last = folded[-1] if folded else None
        if (isinstance(label, int) and last and isinstance(last[1], int) and label == last[1] + 1
                and shared == last[3]):
            last[1] = label
        else:
            folded.append([label, label, cells, shared])
    return [(_layer_label(first, end), cells if first == end else shared) for first, end, cells, shared in folded]


def _layer_label(first, end) -> str:
    if first is None:
        return "outside layers"
    return f"layer {first}" if first == end else f"layers {first}–{end} ×{end - first + 1}"


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
                         f"{error:+.1%}" if isinstance(error, (int, float)) else NA, str(entry.get("verdict") or "-")))
    return tuple(rows)


def _formatter(quantity: str):
    name = quantity.lower()          # "step FLOPs", "peak bytes", "trainable parameters"

    def fmt(value):
        if not isinstance(value, (int, float)):
            return NA if value is None else str(value)
        if "bytes" in name or "memory" in name:
            return units.nbytes(int(value))
        if "flop" in name:
            return units.flops(int(value))
        if "param" in name:
            return f"{int(value):,}"           # exact: a parameter count is judged to the unit
        return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
    return fmt

