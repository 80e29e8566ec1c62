"""`costlens plan` / `compare` output: the costlens.plan/1 document and its table.

The JSON is built in one place (``plan_document``); the table reads that document."""
from __future__ import annotations

from dataclasses import asdict

from tabulate import tabulate

from costlens.model import Model
from costlens.estimate import Estimate
from costlens.render import units
from costlens.render.parallel import parallel_entry, parallel_text

PLAN_SCHEMA = "costlens.plan/1"


def _layers(result: Estimate, model: Model) -> list[dict]:
    """Per layer (None: outside the blocks): which tensors train, which carry LoRA, saved bytes."""
    trainable = set(result.trainable_keys)
    adapted = {a.key for a in result.adapters}
    activation = dict(result.memory.activations_by_layer)
    layers = sorted({u.layer for u in model.roles.params}, key=lambda l: (l is None, l or 0))
    entries = []
    for layer in layers:
        uses = [u for u in model.roles.params if u.layer == layer]
        entries.append({
            "layer": layer,
            "trainable": [_display(u) for u in uses if u.key in trainable],
            "adapters": [_display(u) for u in uses if u.key in adapted],
            "trainable_params": sum(u.n_params for u in uses if u.key in trainable)
            + sum(a.n_params for a in result.adapters if a.key in {u.key for u in uses}),
            "activation_bytes": activation.get(layer, 0),
        })
    return entries


def _display(use) -> str:
    """The module path the exporter recorded and the tensor's kind (initializer names such as
    val_123 say nothing), or the parameter's key where there is no hint."""
    return f"{use.hint} ({use.kind})" if use.hint else use.key


def _plan_entry(result: Estimate, spec: str, model: Model) -> dict:
    params, flops, memory = result.params, result.flops, result.memory
    tokens = result.batch * result.seq
    return {
        "name": result.plan.name,
        "spec": spec,
        "params": {"total": params.total, "trainable": params.trainable, "adapter": params.adapter,
                   "frozen": params.frozen, "trainable_by_role": dict(params.trainable_by_role),
                   "active_per_token": params.active_per_token},
        "memory_bytes": {"weights": memory.weights, "gradients": memory.gradients, "optimizer": memory.optimizer,
                         "activations": memory.activations, "peak": memory.peak},
        "peak_phase": memory.peak_phase,
        "flops": {"forward": flops.forward, "backward_input": flops.backward_input,
                  "backward_weight": flops.backward_weight, "recompute": flops.recompute,
                  "backward": flops.backward, "step": flops.step, "per_token": flops.step // tokens,
                  "macs_step": flops.step // 2},
        "time": _time_entry(result.time),
        "layers": _layers(result, model),
        **({"parallel": parallel} if (parallel := parallel_entry(result)) else {}),
        "assumptions": list(result.assumptions),
        "unsupported_ops": dict(result.unsupported_ops),
    }


def _time_entry(time) -> dict | None:
    """plans[].time: the roofline (seconds; peak in FLOP/s of ``dtype``; traffic in bytes)."""
    if time is None:
        return None
    return {"gpu": time.gpu, "peak_flops": time.peak_flops, "mfu": time.mfu,
            "seconds_per_step": time.seconds_per_step, "dtype": time.dtype, "bound": time.bound,
            "compute_seconds": time.compute_seconds, "memory_seconds": time.memory_seconds,
            "traffic_bytes": time.traffic_bytes}


def _job_entry(job, result: Estimate) -> dict:
    """plans[].job: the whole job priced from this plan's step (costlens/jobcost.py)."""
    from dataclasses import asdict as fields_of
    from costlens.jobcost import price_job
    setup = result.setup
    dp_ranks = max(1, setup.gpus // (setup.tp * setup.ep))
    seconds = result.time.seconds_per_step if result.time else None
    return fields_of(price_job(job, result.batch, result.seq, seconds, setup.gpus, dp_ranks))


def plan_document(model: Model, results: list[tuple[str, Estimate]], derived: dict | None = None,
                  job=None) -> dict:
    """The costlens.plan/1 document. ``derived``: {setup key: "value, from which option"} of the
    defaults derived from other options; ``job``: a jobcost.Job priced per plan (plans[].job)."""
    document = _plan_document(model, results)
    document["setup"]["derived"] = dict(derived or {})
    if job is not None:
        document["setup"]["job"] = {"tokens": job.tokens, "grad_accum": job.grad_accum,
                                    "price_per_gpu_hour": job.price_per_gpu_hour, "price_source": job.price_source}
        for entry, (_, result) in zip(document["plans"], results):
            entry["job"] = _job_entry(job, result)
    return document


def _plan_document(model: Model, results: list[tuple[str, Estimate]]) -> dict:
    first = results[0][1]
    return {
        "schema": PLAN_SCHEMA,
        "model": {"source": model.graph.source, "architecture": asdict(model.roles.architecture),
                  "params_total": model.roles.params_total, "params_by_role": model.roles.params_by_role(),
                  "incomplete": model.incomplete, "unknown_ops": dict(model.unknown_ops)},
        "setup": {"batch": first.batch, "seq": first.seq, "optimizer": first.setup.optimizer,
                  "optimizer_impl": first.setup.optimizer_impl, "precision": first.setup.precision,
                  "attention": first.setup.attention, "loss": first.setup.loss,
                  "experts_impl": first.setup.experts_impl,
                  "checkpointing": first.setup.checkpointing, "gpu": first.setup.gpu, "mfu": first.setup.mfu, "gpus": first.setup.gpus,
                  "base_quant": first.setup.base_quant},
        "plans": [_plan_entry(result, spec, result.model or model) for spec, result in results],
    }


def plan_text(document: dict) -> str:
    """A costlens.plan/1 document as text: the setup, one row per plan (trainable parameters, memory
    in bytes by category and at the peak, step FLOPs, seconds per step with a GPU), then the notes."""
    rows = []
    timed = any(plan.get("time") for plan in document["plans"])
    for plan in document["plans"]:
        params, flops, memory = plan["params"], plan["flops"], plan["memory_bytes"]
        row = [plan["name"], units.params(params["trainable"]), units.share(params["trainable"], params["total"]),
               units.nbytes(memory["weights"]), units.nbytes(memory["gradients"]), units.nbytes(memory["optimizer"]),
               units.nbytes(memory["activations"]), f"{units.nbytes(memory['peak'])} ({plan['peak_phase']})",
               units.flops(flops["step"]), units.share(flops["backward"], flops["forward"])]
        if timed:
            row.append(_time_cell(plan["time"]))
        rows.append(row)
    setup = document["setup"]
    header = (f"Model: {document['model']['source']}\n"
              f"batch {setup['batch']}, seq {setup['seq']}, {setup['optimizer']} ({setup['optimizer_impl']}), "
              f"{setup['precision']}, "
              f"{setup['attention']} attention" + (f", {setup['loss']} loss" if setup.get("loss", "ce") != "ce" else "")
              + (f", {setup['experts_impl']} experts" if setup.get("experts_impl")
                 and document["model"]["params_by_role"].get("experts") else "")
              + (", checkpointing" if setup["checkpointing"] else "")
              + (f", {setup['base_quant']} base weights" if setup.get("base_quant") else "")
              + (f", {setup['gpu']} at {setup['mfu']:.0%} MFU" if setup["gpu"] else ""))
    derived = setup.get("derived") or {}
    if derived:
        header += "\nderived defaults: " + "; ".join(f"{key.replace('_', '-')} {why}" for key, why in derived.items())
    headers = ["plan", "trainable", "share", "weights", "grads", "optimizer", "activations", "peak",
               "step FLOPs", "bwd/fwd"] + (["time/step"] if timed else [])
    table = tabulate(rows, headers=headers, tablefmt="simple", colalign=("left",) + ("right",) * (len(headers) - 1))
    notes = []
    if document["model"]["incomplete"]:
        ops = ", ".join(f"{op} x{n}" for op, n in document["model"]["unknown_ops"].items())
        notes.append(f"INCOMPLETE: ops costlens does not know: {ops}")
    known_unknown = document["model"]["unknown_ops"]
    for plan in document["plans"]:
        # ops with a rule whose cost could not be evaluated (shapes unknown after inference)
        unpriced = {op: n - known_unknown.get(op, 0) for op, n in plan.get("unsupported_ops", {}).items()
                    if n > known_unknown.get(op, 0)}
        if unpriced:
            ops = ", ".join(f"{op} x{n}" for op, n in unpriced.items())
            notes.append(f"INCOMPLETE: {plan['name']}: not priced, their shapes are unknown: {ops}")
    per_rank = parallel_text(document)
    extra = [text for text in (_exact_counts(document), _time_basis(document), _job_text(document),
                               _validation_text(document)) if text]
    return "\n".join([header, "", table, *([""] + [per_rank] if per_rank else []),
                      *(line for text in extra for line in ("", text)), *notes])


def _time_cell(time: dict) -> str:
    return f"{units.seconds(time['seconds_per_step'])} ({time.get('dtype', 'bf16')}, {time.get('bound', 'compute')})"


def _exact_counts(document: dict) -> str:
    """Exact trainable parameter counts (the table rounds them), as PEFT's print_trainable_parameters
    prints them: ``params.total`` already holds the adapters."""
    lines = [f"  {plan['name']}: trainable params: {plan['params']['trainable']:,} || all params: "
             f"{plan['params']['total']:,} || trainable%: "
             f"{units.percent(plan['params']['trainable'], plan['params']['total'])}"
             for plan in document["plans"]]
    return "Trainable parameters (exact):\n" + "\n".join(lines)


def _time_basis(document: dict) -> str:
    """Which peak and which roofline term each time/step figure used."""
    timed = [plan for plan in document["plans"] if plan.get("time")]
    if not timed:
        return ""
    time = timed[0]["time"]
    if "dtype" not in time:
        return ""
    return (f"time/step: roofline max(step FLOPs / ({time['dtype']} peak {time['peak_flops'] / 1e12:g} TFLOP/s x "
            f"{time['mfu']:.0%} MFU), traffic / memory bandwidth); the traffic is a lower bound "
            "(weights read twice; gradients, optimizer state and saved activations written and read once)")


def _job_text(document: dict) -> str:
    job = document["setup"].get("job")
    if not job:
        return ""
    rows = []
    for plan in document["plans"]:
        cost = plan["job"]
        rows.append([plan["name"], f"{cost['steps']:,}", f"{cost['tokens_per_step']:,}",
                     "-" if cost["wall_hours"] is None else units.seconds(cost["wall_hours"] * 3600),
                     "-" if cost["gpu_hours"] is None else units.amount(cost["gpu_hours"]),
                     "-" if cost["cost"] is None else units.amount(cost["cost"])])
    price = (f", {job['price_per_gpu_hour']:g} per GPU-hour ({job['price_source']})"
             if job["price_per_gpu_hour"] is not None else "")
    title = (f"Job: {job['tokens']:,} tokens, grad-accum {job['grad_accum']}, {document['setup'].get('gpus', 1)} GPU(s)"
             + price + ("" if any(p["job"]["gpu_hours"] is not None for p in document["plans"])
                        else " (give --gpu for hours and cost)"))
    table = tabulate(rows, headers=["plan", "steps", "tokens/step", "wall time", "GPU-hours", "cost"],
                     tablefmt="simple", colalign=("left",) + ("right",) * 5, disable_numparse=True)
    return f"{title}\n{table}\n(training steps only, at the stated MFU: no communication, data loading or evaluation)"


def _validation_text(document: dict) -> str:
    """compare --validate: estimated vs measured per plan and quantity, with a verdict."""
    rows = []
    for plan in document["plans"]:
        for quantity, figures in (plan.get("validation") or {}).items():
            error = figures.get("error")
            rows.append([plan["name"], quantity, _figure(quantity, figures["estimated"]),
                         _figure(quantity, figures["measured"]), "-" if error is None else f"{error:+.2%}",
                         figures.get("verdict") or "-"])
    if not rows:
        return ""
    return "Validation (measured steps):\n" + tabulate(
        rows, headers=["plan", "quantity", "estimated", "measured", "error", "verdict"], tablefmt="simple",
        disable_numparse=True)


def _figure(quantity: str, value) -> str:
    if value is None:
        return "-"
    if "bytes" in quantity or quantity in ("peak", "weights", "gradients", "optimizer", "activations"):
        return units.nbytes(int(value))
    if "flops" in quantity.lower():
        return units.flops(int(value))
    return f"{value:,}" if isinstance(value, int) else f"{value:.6g}"
