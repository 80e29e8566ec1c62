"""`costlens plan` / `compare` output: the costlens.plan/1 document and its table.

The JSON is built in one place (``plan_document``); the table reads that document."""
from __future__ import annotations

from dataclasses import asdict

from tabulate import tabulate

from costlens.api import Model
from costlens.estimate import Estimate
from costlens.render import units

PLAN_SCHEMA = "costlens.plan/1"


def _plan_entry(result: Estimate, spec: str) -> dict:
    params, flops = result.params, result.flops
    tokens = result.batch * result.seq
    return {
        "name": result.plan.name,
        "spec": spec,
        "params": {"total": params.total, "trainable": params.trainable, "adapter": params.adapter,
                   "frozen": params.frozen, "trainable_by_role": dict(params.trainable_by_role),
                   "active_per_token": params.active_per_token},
        "flops": {"forward": flops.forward, "backward_input": flops.backward_input,
                  "backward_weight": flops.backward_weight, "recompute": flops.recompute,
                  "backward": flops.backward, "step": flops.step, "per_token": flops.step // tokens,
                  "macs_step": flops.step // 2},
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
        "setup": {"batch": first.batch, "seq": first.seq},
        "plans": [_plan_entry(result, spec) for spec, result in results],
    }


def plan_text(document: dict) -> str:
    rows = []
    for plan in document["plans"]:
        params, flops = plan["params"], plan["flops"]
        rows.append([plan["name"], units.params(params["trainable"]),
                     units.share(params["trainable"], params["total"]),
                     units.params(params["adapter"]) if params["adapter"] else "-",
                     units.flops(flops["forward"]), units.flops(flops["backward"]), units.flops(flops["step"])])
    setup = document["setup"]
    header = (f"Model: {document['model']['source']}  (batch {setup['batch']}, seq {setup['seq']}; "
              f"FLOPs = 2 x MACs, matrix products only)")
    table = tabulate(rows, headers=["plan", "trainable", "share", "adapters", "forward", "backward", "step"],
                     tablefmt="simple", colalign=("left",) + ("right",) * 6)
    notes = []
    if document["model"]["incomplete"]:
        ops = ", ".join(f"{op} x{n}" for op, n in document["model"]["unknown_ops"].items())
        notes.append(f"INCOMPLETE: ops costlens does not know: {ops}")
    return "\n".join([header, "", table, *notes])
