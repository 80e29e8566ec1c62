"""Per-rank estimate vs measurement on the real transformers modules of the HF corpus configs.

    python benchmarks/distributed_accuracy.py [--archs llama,qwen2,gpt2,mixtral] [--plans full,lora-attn-r8]
        [--shards ddp,zero1,zero2,zero3,tp] [--gpus 2,4] [--batch 2] [--seq 32] [--out benchmarks/results/distributed_real.json]

Each case is ``validate_distributed`` (what ``costlens validate fixtures/hf/ARCH.config.json --gpus N
--shard S [--tp T]`` runs): N gloo rank processes on the CPU, each building the real module of
the config (random weights, seed 0 on every rank), the plan put on it by validate.apply_plan,
wrapped (DDP; FSDP2 ``fully_shard`` per decoder layer + root; DTensor TP), two steps, the second
measured per rank by the storage tracker, collectives counted. The estimate is costlens.parallel on
the traced config. Errors are (estimate - measured) / measured of the largest per-rank figure;
collective bytes are compared exactly. Besides the 2-rank matrix it runs llama zero3 on 4 ranks and
llama tp=2 (full and LoRA), unless --no-extra.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

PLANS = {"full": ("full", {}), "lora-attn-r8": ("lora", {"lora": "attn", "rank": "8"})}
ROWS = (("peak", "peak bytes (max rank)"), ("weights", "weights bytes"), ("gradients", "gradient bytes"),
        ("optimizer", "optimizer bytes"))
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "broadcast")


def cases(archs, plans, shards, extra: bool, gpus=(2,)):
    """(arch, plan, gpus, shard, tp) in the order they run. A shard "tp" is tensor parallelism of
    2: alone on 2 ranks, inside FSDP2 zero3 (2 data-parallel x 2 tensor-parallel) on 4."""
    for n in gpus:
        for arch in archs:
            for plan in plans:
                for shard in shards:
                    if shard == "tp":
                        yield arch, plan, n, "ddp" if n == 2 else "zero3", 2
                    else:
                        yield arch, plan, n, shard, 1
    if extra and "llama" in archs and tuple(gpus) == (2,):
        yield "llama", "full", 4, "zero3", 1
        for plan in plans:
            yield "llama", plan, 2, "ddp", 2


def mode_of(record) -> str:
    """The mode column: ddp, zero1, zero2, zero3, tp=T, or zeroN x tp=T (a 2-D mesh)."""
    if record["tp"] > 1:
        return f"tp={record['tp']}" if record["shard"] == "ddp" else f"{record['shard']} x tp={record['tp']}"
    return record["shard"]


def run_case(traced, arch, plan_name, gpus, shard, tp, batch, seq) -> dict:
    from costlens.measure.distributed import validate_distributed
    from costlens.plans import Setup, plan_from_options
    name, options = PLANS[plan_name]
    plan = plan_from_options(name, **options)
    source = str(ROOT / "fixtures" / "hf" / f"{arch}.config.json")
    start = time.perf_counter()
    # grouped_mm: transformers 5's default experts_implementation, what `costlens validate` runs for a config
    setup = Setup(batch=batch, seq=seq, experts_impl="grouped_mm")
    validation, estimate, measured = validate_distributed(source, plan, setup, gpus, shard, tp=tp, model=traced)
    rows = {c.quantity: c for c in validation.comparisons}
    record = {"arch": arch, "plan": plan_name, "gpus": gpus, "shard": shard, "tp": tp, "truth": validation.truth,
              "seconds": round(time.perf_counter() - start, 1), "estimated_phase": validation.estimated_phase,
              "measured_phase": validation.measured_phase, "ok": validation.ok,
              "late_free_bytes": max(r.late_free_bytes for r in measured.ranks),
              "command": f"costlens validate fixtures/hf/{arch}.config.json --plan {name}"
                         + "".join(f" --{k} {v}" for k, v in options.items())
                         + f" --batch {batch} --seq {seq} --attention eager --gpus {gpus}"
                         + (f" --tp {tp}" if tp > 1 and shard == "ddp" else f" --shard {shard}")
                         + (f" --tp {tp}" if tp > 1 and shard != "ddp" else "")}
    for key, quantity in ROWS + tuple((c, f"{c} bytes") for c in COLLECTIVES):
        if quantity in rows:
            c = rows[quantity]
            record[key] = {"estimated": c.estimated, "measured": c.measured, "error": c.error}
    return record


def table(records) -> str:
    head = f"{'arch':8} {'plan':13} {'N':>2} {'mode':6} {'peak':>8} {'weights':>8} {'grads':>8} {'optim':>8}  collectives"
    lines = [head, "-" * len(head)]
    for r in records:
        mode = mode_of(r)
        errors = " ".join(f"{100 * r[k]['error']:+7.2f}%" for k, _ in ROWS)
        comm = ", ".join(f"{c} {'=' if r[c]['estimated'] == r[c]['measured'] else '!='}"
                         f"{'' if r[c]['estimated'] == r[c]['measured'] else ' ' + str(r[c]['estimated'] - r[c]['measured']) + ' B'}"
                         for c in COLLECTIVES if c in r)
        lines.append(f"{r['arch']:8} {r['plan']:13} {r['gpus']:>2} {mode:6} {errors}  {comm}")
    return "\n".join(lines)


def markdown(records) -> str:
    """The docs/distributed.md table of a results file."""
    lines = ["| model | plan | ranks | mode | estimated peak | measured peak | peak | weights | grads | optimizer "
             "| phase (est / meas) | collectives: estimate - measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        mode = mode_of(r)
        errors = " | ".join(f"{100 * r[k]['error']:+.2f}%" for k, _ in ROWS)
        comm = ", ".join(f"{c} {r[c]['measured']:,}" + ("" if r[c]["estimated"] == r[c]["measured"]
                                                        else f" ({r[c]['estimated'] - r[c]['measured']:+,} B)")
                         for c in COLLECTIVES if c in r)
        lines.append(f"| {r['arch']} | {r['plan']} | {r['gpus']} | {mode} | {r['peak']['estimated']:,} | "
                     f"{r['peak']['measured']:,} | {errors} | {r['estimated_phase']} / {r['measured_phase']} | {comm} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="llama,qwen2,gpt2,mixtral")
    parser.add_argument("--plans", default="full,lora-attn-r8")
    parser.add_argument("--shards", default="ddp,zero2,zero3")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--gpus", default="2", help="rank counts of the matrix, e.g. 2,4")
    parser.add_argument("--no-extra", action="store_true", help="only the matrix (no llama 4-rank zero3, tp=2)")
    parser.add_argument("--out", default=str(HERE / "results" / "distributed_real.json"))
    parser.add_argument("--markdown", metavar="RESULTS.json", help="print the markdown table of a results file")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())["cases"]))
        return
    import torch
    import transformers

    import costlens
    archs = args.archs.split(",")
    traced = {}
    records = []
    for arch, plan, gpus, shard, tp in cases(archs, args.plans.split(","), args.shards.split(","), not args.no_extra,
                                             tuple(int(n) for n in args.gpus.split(","))):
        if arch not in traced:
            traced[arch] = costlens.load(str(ROOT / "fixtures" / "hf" / f"{arch}.config.json"))
        records.append(run_case(traced[arch], arch, plan, gpus, shard, tp, args.batch, args.seq))
        print(table(records[-1:]).splitlines()[-1], f"({records[-1]['seconds']} s)", flush=True)
    print()
    print(table(records))
    document = {"schema": "costlens.distributed_real/1", "torch": torch.__version__,
                "transformers": transformers.__version__, "batch_per_rank": args.batch, "seq": args.seq,
                "truth": "real transformers module of the config on N gloo ranks (CPU), second step",
                "cases": records}
    Path(args.out).write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
