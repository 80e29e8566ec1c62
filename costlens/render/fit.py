"""`costlens fit` output: the costlens.fit/1 document (built in one place), its text table and
its HTML page (the report's chart macro and CSS, reused: memory bars against the usable limit)."""
from __future__ import annotations

from tabulate import tabulate

from costlens.fit import FitResult, Probe
from costlens.render import units

FIT_SCHEMA = "costlens.fit/1"


def _probe_entry(probe: Probe, chosen: Probe | None) -> dict:
    result, memory, setup = probe.result, probe.result.memory, probe.result.setup
    return {
        "plan": probe.name, "spec": probe.spec, "batch": result.batch, "seq": result.seq,
        "precision": setup.precision, "optimizer": setup.optimizer, "checkpointing": setup.checkpointing,
        "fits": probe.fits, "chosen": probe is chosen,
        "peak_bytes": probe.peak_bytes, "peak_phase": memory.peak_phase,   # per rank under --gpus
        "memory_bytes": {"weights": memory.weights, "gradients": memory.gradients, "optimizer": memory.optimizer,
                         "activations": memory.activations, "peak": memory.peak},
        "trainable_params": result.params.trainable, "step_flops": result.flops.step,
        "seconds_per_step": result.time.seconds_per_step if result.time else None,
    }


def _job_entry(job, probe: Probe) -> dict:
    """probes[].job: the whole job priced from this probe's step (costlens/jobcost.py; hours, money)."""
    from dataclasses import asdict

    from costlens.jobcost import price_job
    result, setup = probe.result, probe.result.setup
    seconds = result.time.seconds_per_step if result.time else None
    return asdict(price_job(job, result.batch, result.seq, seconds, setup.gpus, max(1, setup.gpus // (setup.tp * setup.ep))))


def fit_document(model, fit: FitResult, recipe=None, job=None) -> dict:
    """The costlens.fit/1 document (docs/schema.md); ``job``: a jobcost.Job priced per probe
    (``probes[].job``, ``answer.job`` and ``setup.job``), as ``costlens plan --tokens`` prices a plan."""
    best, base = fit.best, (fit.best or fit.probes[0]).result.setup
    document = {
        "schema": FIT_SCHEMA,
        "model": {"source": model.graph.source, "params_total": model.roles.params_total},
        "search": fit.search,
        "limit": {"memory_bytes": fit.memory_bytes, "headroom": fit.headroom, "usable_bytes": fit.usable_bytes,
                  "gpu": fit.gpu},
        "setup": {"batch": None if fit.search == "batch" else base.batch,
                  "seq": None if fit.search == "seq" else (fit.best or fit.probes[0]).result.seq,
                  "optimizer": None if fit.search == "plan" else base.optimizer, "optimizer_impl": base.optimizer_impl,
                  "precision": None if fit.search == "plan" else base.precision, "attention": base.attention,
                  "checkpointing": None if fit.search == "plan" else base.checkpointing, "mfu": base.mfu,
                  # a parallel layout: the limit holds per rank (peak_bytes are the largest rank's)
                  "gpus": base.gpus if base.is_parallel else None,
                  "shard": base.shard if base.is_parallel else None,
                  "tp": base.tp if base.tp > 1 else None, "ep": base.ep if base.ep > 1 else None,
                  "base_quant": base.base_quant},
        "answer": None if best is None else {
            "fits": True, "plan": best.name, "spec": best.spec, "batch": best.result.batch, "seq": best.result.seq,
            "precision": best.result.setup.precision, "optimizer": best.result.setup.optimizer,
            "checkpointing": best.result.setup.checkpointing, "peak_bytes": best.peak_bytes,
            "step_flops": best.step_flops, "capped": fit.capped},
        "next_up": None if fit.next_up is None else {fit.search: getattr(fit.next_up.result, fit.search),
                                                     "peak_bytes": fit.next_up.peak_bytes},
        "probes": [_probe_entry(p, best) for p in (fit.probes if fit.search == "plan" else   # the frontier, in order
                                                    sorted(fit.probes, key=lambda p: getattr(p.result, fit.search)))],
        "notes": list(fit.notes),
    }
    if job is not None:
        _attach_job(document, fit, job)
    if recipe is not None:
        document["recipe"] = recipe.document()
    return document


def _attach_job(document: dict, fit: FitResult, job) -> None:
    """The job's tokens and price in ``setup.job``; each probe's (and the answer's) job cost."""
    document["setup"]["job"] = {"tokens": job.tokens, "grad_accum": job.grad_accum,
                                "price_per_gpu_hour": job.price_per_gpu_hour, "price_source": job.price_source}
    ordered = fit.probes if fit.search == "plan" else sorted(fit.probes, key=lambda p: getattr(p.result, fit.search))
    for entry, probe in zip(document["probes"], ordered):
        entry["job"] = _job_entry(job, probe)
    if document["answer"] is not None:
        document["answer"]["job"] = _job_entry(job, fit.best)


def _limit_line(document: dict) -> str:
    limit = document["limit"]
    where = limit["gpu"] or units.nbytes(limit["memory_bytes"])
    if limit["gpu"]:
        where += f" ({units.nbytes(limit['memory_bytes'])})"
    headroom = f", less {limit['headroom']:.0%} headroom" if limit["headroom"] else ""
    return f"limit: {where}{headroom} -> {units.nbytes(limit['usable_bytes'])} usable"


def answer_line(document: dict) -> str:
    """The answer of a costlens.fit/1 document in one line: the largest batch/seq or the cheapest plan
    with its peak (bytes, shown in GiB/MiB); when nothing fits, the smallest peak that was priced."""
    answer, search = document["answer"], document["search"]
    if answer is None:
        closest = min(document["probes"], key=lambda p: p["peak_bytes"])
        return (f"nothing fits: the smallest step priced needs {units.nbytes(closest['peak_bytes'])} "
                f"({_describe(closest)})")
    if search == "plan":
        return f"cheapest plan that fits: {_describe(answer)}, peak {units.nbytes(answer['peak_bytes'])}, " \
               f"{units.flops(answer['step_flops'])} per step" + _job_words(answer)
    more = " (the search cap: larger may fit)" if answer["capped"] else ""
    nxt = document["next_up"]
    beyond = f"; {search} {nxt[search]:,} needs {units.nbytes(nxt['peak_bytes'])}" if nxt else ""
    return f"largest {search} that fits: {answer[search]:,}{more} (peak {units.nbytes(answer['peak_bytes'])})" \
           f"{_job_words(answer)}{beyond}"


def _job_words(answer: dict) -> str:
    """", job: 1,234 steps, 5.6 GPU-hours, cost 13.94" of an answer priced for a job ("" without one)."""
    job = answer.get("job")
    if not job:
        return ""
    words = [f"{job['steps']:,} steps"]
    if job["gpu_hours"] is not None:
        words.append(f"{units.amount(job['gpu_hours'])} GPU-hours")
    if job["cost"] is not None:
        words.append(f"cost {units.amount(job['cost'])}")
    return ", job: " + ", ".join(words)


def _describe(entry: dict) -> str:
    parts = [entry["plan"], entry["precision"], entry["optimizer"]]
    if entry["checkpointing"]:
        parts.append("checkpointing")
    return ", ".join(parts) + f", batch {entry['batch']}, seq {entry['seq']}"


def fit_text(document: dict) -> str:
    """A costlens.fit/1 document as text: the limit, one table row per probe (memory in bytes, FLOPs per
    step, seconds per step when timed), and the answer."""
    search = document["search"]
    timed = any(p["seconds_per_step"] is not None for p in document["probes"])
    rows = []
    for probe in document["probes"]:
        memory = probe["memory_bytes"]
        row = ["*" if probe["chosen"] else "", probe["plan"]]
        row += [f"{probe[search]:,}"] if search != "plan" else \
            ["yes" if probe["checkpointing"] else "no", probe["precision"], probe["optimizer"]]
        row += [units.params(probe["trainable_params"]), units.nbytes(memory["weights"]),
                units.nbytes(memory["activations"]), f"{units.nbytes(probe['peak_bytes'])} ({probe['peak_phase']})",
                "yes" if probe["fits"] else "no", units.flops(probe["step_flops"])]
        if timed:
            row.append(units.seconds(probe["seconds_per_step"]))
        row += _job_cells(probe, document)
        rows.append(row)
    headers = ["", "plan"] + ([search] if search != "plan" else ["ckpt", "precision", "optimizer"]) + \
        ["trainable", "weights", "activations", "peak", "fits", "step FLOPs"] + (["time/step"] if timed else []) + \
        _job_headers(document)
    setup = document["setup"]
    fixed = ", ".join(f"{_SETUP_LABELS.get(k, k)} {v}" for k, v in setup.items()
                      if v is not None and k not in ("mfu", "optimizer_impl", "job"))
    table = tabulate(rows, headers=headers, tablefmt="simple")
    lines = [f"Model: {document['model']['source']}", _limit_line(document) + (f"; {fixed}" if fixed else ""),
             *_job_title(document), "", table, "", answer_line(document), *document["notes"]]
    if document.get("recipe"):
        recipe = document["recipe"]
        lines.append(f"recipe {recipe['source']}: gradient accumulation {recipe['gradient_accumulation_steps']} "
                     "step(s) (per-step memory is that of one micro-batch)")
    return "\n".join(lines)


_SETUP_LABELS = {"base_quant": "quant"}      # as the option is spelled (--quant nf4)


def _job_headers(document: dict) -> list[str]:
    job = document["setup"].get("job")
    if not job:
        return []
    return ["job steps", "GPU-hours"] + (["cost"] if job["price_per_gpu_hour"] is not None else [])


def _job_cells(probe: dict, document: dict) -> list[str]:
    """A row's job figures: optimizer steps, GPU-hours (with --gpu) and cost (with a price)."""
    job = document["setup"].get("job")
    if not job:
        return []
    cost = probe["job"]
    hours = "-" if cost["gpu_hours"] is None else units.amount(cost["gpu_hours"])
    cells = [f"{cost['steps']:,}", hours]
    if job["price_per_gpu_hour"] is not None:
        cells.append("-" if cost["cost"] is None else units.amount(cost["cost"]))
    return cells


def _job_title(document: dict) -> list[str]:
    """One line naming the job the rows are priced for (none without --tokens)."""
    job = document["setup"].get("job")
    if not job:
        return []
    price = (f", {job['price_per_gpu_hour']:g} per GPU-hour ({job['price_source']})"
             if job["price_per_gpu_hour"] is not None else "")
    timed = any(p["job"]["gpu_hours"] is not None for p in document["probes"])
    return [f"job: {job['tokens']:,} tokens, grad-accum {job['grad_accum']}{price}"
            + ("" if timed else " (hours need --gpu)")]


def render_fit_html(document: dict) -> str:
    """One self-contained page: the answer, memory bars of every probe against the usable
    limit, and the table."""
    from costlens.gpus import Gpu
    from costlens.render.html import _memory_chart, environment

    probes = document["probes"]
    search = document["search"]
    labels = [(f"{p['plan']}{' +ckpt' if p['checkpointing'] else ''} {p['precision']}" if search == "plan"
               else f"{search} {p[search]:,}") for p in probes]
    plans = [{"name": label, "memory_bytes": p["memory_bytes"], "peak_phase": p["peak_phase"]}
             for label, p in zip(labels, probes)]
    limit = Gpu("usable", document["limit"]["usable_bytes"], 0.0)
    chart = _memory_chart(plans, limit)
    rows = [(("*" if p["chosen"] else ""), label, units.nbytes(p["peak_bytes"]), "yes" if p["fits"] else "no",
             units.flops(p["step_flops"]), units.params(p["trainable_params"])) for label, p in zip(labels, probes)]
    return environment().get_template("fit.html.j2").render(
        title=f"costlens fit: {document['model']['source']}", source=document["model"]["source"],
        schema=document["schema"], limit=_limit_line(document), answer=answer_line(document),
        fits=document["answer"] is not None, chart=chart, rows=rows, notes=document["notes"])
