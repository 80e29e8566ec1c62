"""`costlens gpus` text: the accelerator table (costlens.gpus/1 document) as a terminal table."""
from __future__ import annotations

from tabulate import tabulate

from costlens.gpus import DTYPES
from costlens.render import units


def _tflops(value: float | None) -> str:
    return "-" if not value else f"{value / 1e12:g}"


def gpus_text(document: dict) -> str:
    """Memory (GiB), dense peaks (TFLOP/s per dtype; '-' where the chip has no such unit), bandwidth (TB/s)."""
    rows = [[g["name"] + (" *" if g["custom"] else ""), units.nbytes(g["memory_bytes"]),
             *(_tflops(g["peak_flops"][dtype]) for dtype in DTYPES),
             "-" if not g["bandwidth_bytes_per_s"] else f"{g['bandwidth_bytes_per_s'] / 1e12:g}", g["note"]]
            for g in document["gpus"]]
    headers = ["gpu", "memory", *(f"{dtype} TFLOP/s" for dtype in DTYPES), "TB/s", "note"]
    aliases = ", ".join(f"{alias} = {name}" for alias, name in document["aliases"].items())
    notes = ["Dense peaks from vendor datasheets (figures 'with sparsity' halved). fp32 steps are priced at the",
             "fp32 peak (torch's default matmul precision), autocast and half weights at the bf16/fp16 peak.",
             f"Aliases: {aliases}."]
    if any(g["custom"] for g in document["gpus"]):
        notes.append("* defined in the budget file ([gpu.NAME]).")
    return "\n".join([tabulate(rows, headers=headers, tablefmt="simple"), "", *notes])
