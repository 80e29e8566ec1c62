"""`costlens validate` output: the costlens.validate/1 document and its table."""
from __future__ import annotations

from tabulate import tabulate

from costlens.measure.validate import Validation

VALIDATE_SCHEMA = "costlens.validate/1"


def validation_document(result: Validation, source: str, spec: str) -> dict:
    """The costlens.validate/1 document: each quantity estimated vs measured (in its own unit: bytes,
    FLOPs or parameters), its relative error and tolerance, and the peak phase of each."""
    setup = result.setup
    return {
        "schema": VALIDATE_SCHEMA,
        "model": {"source": str(source)},
        "plan": {"name": result.plan.name, "spec": spec},
        "setup": {"batch": result.batch, "seq": result.seq, "optimizer": setup.optimizer,
                  "optimizer_impl": setup.optimizer_impl, "precision": setup.precision,
                  "attention": setup.attention, "checkpointing": setup.checkpointing, "loss": setup.loss,
                  "moe_dispatch": setup.moe_dispatch},
        "device": result.device,
        "measured_from": result.source,
        "truth": result.truth_label,
        "comparisons": [{"quantity": c.quantity, "estimated": c.estimated, "measured": c.measured,
                         "error": c.error, "tolerance": c.tolerance, "ok": c.ok} for c in result.comparisons],
        "peak_phase": {"estimated": result.estimated_phase, "measured": result.measured_phase},
        "notes": list(result.notes),
        "ok": result.ok,
    }


def _tolerance(value) -> str:
    if value is None:
        return "shown"
    return "exact" if value == 0 else f"±{100 * value:g}%"


def validation_text(document: dict) -> str:
    """A costlens.validate/1 document as a table: estimated, measured, relative error, tolerance, verdict."""
    rows = [[c["quantity"], f"{c['estimated']:,}", f"{c['measured']:,}", f"{100 * c['error']:+.2f}%",
             _tolerance(c["tolerance"]), "-" if c["tolerance"] is None else "ok" if c["ok"] else "OUTSIDE"]
            for c in document["comparisons"]]
    setup = document["setup"]
    lines = [f"Model: {document['model']['source']}  plan: {document['plan']['spec']}",
             f"truth: {document['truth']}, measured on {document['device']}",
             f"batch {setup['batch']}, seq {setup['seq']}, {setup['optimizer']} ({setup['optimizer_impl']}), "
             f"{setup['precision']}, {setup['attention']} attention"
             + (", checkpointing" if setup["checkpointing"] else "") + f", {setup['loss']} loss", "",
             tabulate(rows, headers=["quantity", "estimated", "measured", "error", "tolerance", "verdict"],
                      tablefmt="simple", colalign=("left", "right", "right", "right", "right", "left")),
             "", f"peak phase: estimated {document['peak_phase']['estimated']}, "
                 f"measured {document['peak_phase']['measured']}"]
    lines += [f"note: {note}" for note in document["notes"]]
    lines.append("all within tolerance" if document["ok"] else "OUTSIDE TOLERANCE")
    return "\n".join(lines)
