"""`costlens plan` / `compare` output: the costlens.plan/1 document and its table.

The JSON is built in one place (``plan_document``); the table reads that document."""
from __future__ import annotations

from dataclasses import asdict

from tabulate import tabulate

from costlens.api import Model
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
        "time": None if result.time is None else {
            "gpu": result.time.gpu, "peak_flops": result.time.peak_flops, "mfu": result.time.mfu,
            "seconds_per_step": result.time.seconds_per_step},
        "layers": _layers(result, model),
        **({"parallel": parallel} if (parallel := parallel_entry(result)) else {}),
        "assumptions": list(result.assumptions),
        "unsupported_ops": dict(result.unsupported_ops),
    }


def plan_document(model: Model, results: list[tuple[str, Estimate]]) -> dict:
    first = results[0][1]
    return {
        "schema": PLAN_SCHEMA,
        "model": {"source": model.graph.source, "architecture": asdict(model.roles.architecture),
                  "params_total": model.roles.params_total, "params_by_role": model.roles.params_by_role(),
                  "incomplete": model.incomplete, "unknown_ops": dict(model.unknown_ops)},
        "setup": {"batch": first.batch, "seq": first.seq, "optimizer": first.setup.optimizer,
                  "optimizer_impl": first.setup.optimizer_impl, "precision": first.setup.precision,
                  "attention": first.setup.attention, "checkpointing": first.setup.checkpointing,
                  "gpu": first.setup.gpu, "mfu": first.setup.mfu},
        "plans": [_plan_entry(result, spec, result.model or model) for spec, result in results],
    }


def plan_text(document: dict) -> str:
    rows = []
    timed = any(plan.get("time") for plan in document["plans"])
    for plan in document["plans"]:
        params, flops, memory = plan["params"], plan["flops"], plan["memory_bytes"]
        row = [plan["name"], units.params(params["trainable"]), units.share(params["trainable"], params["total"]),
               units.nbytes(memory["weights"]), units.nbytes(memory["gradients"]), units.nbytes(memory["optimizer"]),
               units.nbytes(memory["activations"]), f"{units.nbytes(memory['peak'])} ({plan['peak_phase']})",
               units.flops(flops["step"]), units.share(flops["backward"], flops["forward"])]
        if timed:
            row.append(units.seconds(plan["time"]["seconds_per_step"]))
        rows.append(row)
    setup = document["setup"]
    header = (f"Model: {document['model']['source']}\n"
              f"batch {setup['batch']}, seq {setup['seq']}, {setup['optimizer']}, {setup['precision']}, "
              f"{setup['attention']} attention" + (", checkpointing" if setup["checkpointing"] else "")
              + (f", {setup['gpu']} at {setup['mfu']:.0%} MFU" if setup["gpu"] else ""))
    headers = ["plan", "trainable", "share", "weights", "grads", "optimizer", "activations", "peak",
               "step FLOPs", "bwd/fwd"] + (["time/step"] if timed else [])
    table = tabulate(rows, headers=headers, tablefmt="simple", colalign=("left",) + ("right",) * (len(headers) - 1))
    notes = []
    if document["model"]["incomplete"]:
        ops = ", ".join(f"{op} x{n}" for op, n in document["model"]["unknown_ops"].items())
        notes.append(f"INCOMPLETE: ops costlens does not know: {ops}")
    per_rank = parallel_text(document)
    return "\n".join([header, "", table, *([""] + [per_rank] if per_rank else []), *notes])
