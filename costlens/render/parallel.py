"""The ``parallel`` object of a costlens.plan/1 plan entry, and its per-rank table.

Built in one place (``parallel_entry``) from an Estimate whose Setup names a parallel layout
(``--gpus N --shard MODE --tp T --ep E --offload ...``); ``parallel_text`` reads the document.
"""
from __future__ import annotations

from tabulate import tabulate

from costlens.render import units


def parallel_entry(result) -> dict | None:
    """Per-rank bytes and per-step communication of the plan, or None on one device."""
    setup = result.setup
    if not setup.is_parallel:
        return None
    from costlens.parallel import estimate_parallel
    p = estimate_parallel(result, setup.gpus, setup.shard, setup.tp, setup.ep, setup.offload, setup.bandwidth)
    m, c = p.memory, p.communication
    return {
        "gpus": p.gpus, "shard": p.shard, "tp": p.tp, "ep": p.ep, "dp": p.dp, "offload": p.offload,
        "batch_per_rank": p.batch_per_rank,
        "per_rank_bytes": {"weights": m.weights, "gradients": m.gradients, "optimizer": m.optimizer,
                           "activations": m.activations, "buffers": m.buffers, "transient": m.transient,
                           "peak": m.peak, "host": m.host},
        "peak_phase": m.peak_phase,
        "communication_bytes": {"all_reduce": c.all_reduce, "all_gather": c.all_gather,
                                "reduce_scatter": c.reduce_scatter, "broadcast": c.broadcast,
                                "all_to_all": c.all_to_all, "wire": c.wire_bytes},
        "bandwidth_gbps": c.bandwidth_gbps,
        "communication_seconds": c.seconds,
        "notes": list(p.notes),
    }


def parallel_text(document: dict) -> str:
    """A per-rank table for the plans of a document that carry a ``parallel`` object ('' if none)."""
    rows = []
    for plan in document["plans"]:
        par = plan.get("parallel")
        if not par:
            continue
        b, c = par["per_rank_bytes"], par["communication_bytes"]
        shard = "" if par["shard"] == "none" else f" {par['shard']}"
        layout = f"{par['gpus']}x{shard}" + (f" tp{par['tp']}" if par["tp"] > 1 else "") + \
            (f" ep{par['ep']}" if par["ep"] > 1 else "") + (f" offload {par['offload']}" if par["offload"] else "")
        rows.append([plan["name"], layout, units.nbytes(b["weights"]), units.nbytes(b["gradients"]),
                     units.nbytes(b["optimizer"]), units.nbytes(b["activations"]),
                     units.nbytes(b["buffers"] + b["transient"]), f"{units.nbytes(b['peak'])} ({par['peak_phase']})",
                     units.nbytes(c["all_reduce"] + c["all_gather"] + c["reduce_scatter"] + c["broadcast"]
                                  + c["all_to_all"]),
                     units.seconds(par["communication_seconds"])])
    if not rows:
        return ""
    headers = ["plan", "layout", "weights/rank", "grads/rank", "optimizer/rank", "activations/rank",
               "buffers+unsharded", "peak/rank", "collectives/step", f"comm time @ {par['bandwidth_gbps']:g} GB/s"]
    return "Per rank (maximum over ranks):\n" + tabulate(rows, headers=headers, tablefmt="simple",
                                                          colalign=("left", "left") + ("right",) * 8)
