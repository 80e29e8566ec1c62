"""`costlens inspect` output: the JSON document (schema costlens.inspect/1) and the table.

The JSON is built in one place (``inspect_document``); the text view reads that document,
so the two can never disagree."""
from __future__ import annotations

from dataclasses import asdict

from tabulate import tabulate

from costlens.model import Model
from costlens.render import units
from costlens.roles.types import ROLE_ORDER, ParamUse

INSPECT_SCHEMA = "costlens.inspect/1"


def _tensor(use: ParamUse) -> dict:
    entry = {"name": use.key, "constant": use.constant, "role": use.role.value, "kind": use.kind,
             "n_params": use.n_params, "shape": list(use.shape), "hint": use.hint}
    if use.tied_to:
        entry["tied_to"] = use.tied_to
    if use.n_experts:
        entry["n_experts"] = use.n_experts
    return entry


def _by_role(uses) -> dict[str, int]:
    totals = {role.value: 0 for role in ROLE_ORDER}
    for use in uses:
        totals[use.role.value] += use.n_params
    return totals


def inspect_document(model: Model) -> dict:
    """The costlens.inspect/1 document: parameter counts (elements) by role, per layer and per tensor,
    the architecture, tied weights (counted once) and what could not be classified."""
    roles = model.roles
    n_layers = roles.architecture.layers
    layers = []
    for index in range(n_layers):
        uses = [p for p in roles.params if p.layer == index]
        layers.append({"index": index, "params_total": sum(p.n_params for p in uses),
                       "params": _by_role(uses), "tensors": [_tensor(p) for p in uses]})
    outside = [p for p in roles.params if p.layer is None]
    return {
        "schema": INSPECT_SCHEMA,
        "model": {"source": model.graph.source, "nodes": len(model.graph.nodes),
                  "incomplete": model.incomplete, "unknown_ops": dict(model.unknown_ops),
                  "warnings": list(roles.warnings)},
        "architecture": asdict(roles.architecture),
        "params_total": roles.params_total,
        "params_by_role": roles.params_by_role(),
        "tied": [{"name": p.key, "tied_to": p.tied_to, "role": p.role.value} for p in roles.params if p.tied_to],
        "layers": layers,
        "outside_layers": {"params_total": sum(p.n_params for p in outside), "params": _by_role(outside),
                           "tensors": [_tensor(p) for p in outside]},
        "unmatched": list(roles.unmatched),
        "buffers": list(roles.buffers),
    }


def _architecture_line(arch: dict) -> str:
    parts = [f"{arch['layers']} layers", f"hidden {arch['hidden']}"]
    if arch["heads"]:
        kv = f" ({arch['kv_heads']} kv)" if arch["kv_heads"] and arch["kv_heads"] != arch["heads"] else ""
        parts.append(f"{arch['heads']} heads{kv} x {arch['head_dim']}")
    if arch["ffn"]:
        parts.append(f"FFN {arch['ffn']} {arch['activation']}")
    if arch["experts"]:
        shared = " + shared expert" if arch["shared_experts"] else ""
        parts.append(f"{arch['experts']} experts top-{arch['top_k']}{shared}")
    if arch["ffn_per_block"] > 1:
        parts.append(f"{arch['ffn_per_block']} FFN sublayers per block")
    parts.append(f"{arch['norm']} ({arch['norm_placement']}-norm)")
    parts.append(f"{arch['positions']} positions")
    parts.append(f"vocab {arch['vocab']}" + (" (tied head)" if arch["tied_embedding"] else ""))
    return ", ".join(str(p) for p in parts)


def inspect_text(document: dict) -> str:
    """A costlens.inspect/1 document as text: parameters by role and by layer, then ties, unmatched
    parameters and warnings (read from the document, so text and JSON never disagree)."""
    total = document["params_total"]
    lines = [f"Model: {document['model']['source']}",
             f"Architecture: {_architecture_line(document['architecture'])}",
             f"Parameters: {units.params(total)} ({total:,})", ""]
    role_rows = [(role, units.params(n), f"{n:,}", units.share(n, total))
                 for role, n in document["params_by_role"].items() if n]
    lines.append(tabulate(role_rows, headers=["role", "params", "exact", "share"], tablefmt="simple",
                          colalign=("left", "right", "right", "right")))
    roles_present = [r for r, n in document["params_by_role"].items() if n]
    layer_rows = [[str(layer["index"])] + [units.params(layer["params"][r]) for r in roles_present]
                  + [units.params(layer["params_total"])] for layer in document["layers"]]
    outside = document["outside_layers"]
    layer_rows.append(["outside"] + [units.params(outside["params"][r]) for r in roles_present]
                      + [units.params(outside["params_total"])])
    lines += ["", tabulate(layer_rows, headers=["layer", *roles_present, "total"], tablefmt="simple",
                           colalign=("left",) + ("right",) * (len(roles_present) + 1))]
    for tied in document["tied"]:
        lines.append(f"\nTied: {tied['name']} is used as {tied['role']} and counted once")
    if document["unmatched"]:
        lines.append(f"\nUnmatched parameters (role 'other'): {', '.join(document['unmatched'])}")
    model = document["model"]
    if model["unknown_ops"]:
        ops = ", ".join(f"{op} x{n}" for op, n in model["unknown_ops"].items())
        lines.append(f"\nINCOMPLETE: ops costlens does not know: {ops}")
    for warning in model["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)
