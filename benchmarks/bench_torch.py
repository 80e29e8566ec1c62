"""Time `costlens compare CONFIG --json` on Hugging Face configs of 8B-70B-class models.

    python benchmarks/bench_torch.py [--repeat 3] [--model NAME|all]

The configs in benchmarks/configs/ are written out (no downloads). Each run is a whole fresh
process, as a user would run it: interpreter start, imports (torch, transformers), the
model built on the meta device, the shallow trace and its replication, roles, every
default plan, JSON out. Wall time is taken around the child and its peak RSS from os.wait4
in a tiny wrapper (bench_inspect.run_once). Beside the times: parameter totals and active
parameters per token against the figures the model authors published.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_inspect import command_for, run_once  # noqa: E402

TARGET_WALL_S = 15.0
TARGET_RSS_MB = 2048.0

# name: (published total, published active per token, in billions; where they were published)
PUBLISHED = {
    "llama3-8b": (8.03, None, "Meta-Llama-3-8B model page: 8.03B params"),
    "llama3-70b": (70.6, None, "Meta-Llama-3-70B model page: 70.6B params"),
    "mixtral-8x7b": (46.7, 12.9, "Mistral AI, 'Mixtral of experts': 46.7B total, 12.9B per token"),
    "qwen1.5-moe-a2.7b": (14.3, 2.7, "Qwen1.5-MoE-A2.7B model card: 14.3B total, 2.7B activated"),
}


def figures(stdout: bytes) -> dict:
    document = json.loads(stdout)
    full = next(p for p in document["plans"] if p["name"] == "full")
    return {"total": full["params"]["total"], "active": full["params"]["active_per_token"],
            "arch": document["model"]["architecture"], "incomplete": document["model"]["incomplete"]}


def matches(ours: int, published: float | None) -> str:
    """'=' when ours rounds to the published figure at the precision it was published with."""
    if published is None:
        return ""
    digits = len(str(published).split(".")[1]) if "." in str(published) else 0
    return "=" if round(ours / 1e9, digits) == published else "≠"


def bench(name: str, repeat: int) -> dict:
    argv = command_for("compare", HERE / "configs" / f"{name}.json")
    runs = [run_once(argv) for _ in range(repeat)]
    failed = next((r for r in runs if r["code"] != 0), None)
    if failed is not None:
        return {"name": name, "problem": failed["stderr"].decode(errors="replace").strip()[-400:]}
    walls = [r["wall"] for r in runs]
    return {"name": name, "min": min(walls), "median": statistics.median(walls),
            "rss_mb": max(r["rss_mb"] for r in runs), "problem": None, **figures(runs[0]["stdout"])}


def table(rows: list[dict], repeat: int) -> str:
    lines = [f"| model | compare wall s min / median of {repeat} | peak RSS MB | parameters | published "
             f"| active per token | published | target |", "|" + " --- |" * 8]
    for r in rows:
        if r["problem"]:
            lines.append(f"| {r['name']} | FAILED | | | | | | |")
            continue
        total, active, _ = PUBLISHED[r["name"]]
        ok = r["median"] < TARGET_WALL_S and r["rss_mb"] < TARGET_RSS_MB and not r["incomplete"]
        lines.append(
            f"| {r['name']} | {r['min']:.2f} / {r['median']:.2f} | {r['rss_mb']:.0f} | {r['total']:,} "
            f"| {total}B {matches(r['total'], total)} | {r['active']:,} "
            f"| {f'{active}B ' + matches(r['active'], active) if active else '-'} | {'ok' if ok else 'MISSED'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per model (fresh process each)")
    parser.add_argument("--model", choices=[*PUBLISHED, "all"], default="all")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    names = list(PUBLISHED) if args.model == "all" else [args.model]
    rows = [bench(name, args.repeat) for name in names]
    print(table(rows, args.repeat))
    print(f"\ntargets: compare < {TARGET_WALL_S:g} s and peak RSS < {TARGET_RSS_MB:g} MB per model, complete "
          "(no unknown ops); '=' the count rounds to the published figure")
    for name in names:
        print(f"- {name}: {PUBLISHED[name][2]}")
    for r in rows:
        if r["problem"]:
            print(f"{r['name']}: {r['problem']}")
    return 1 if any(r["problem"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
