"""Where the seconds go: a per-stage time breakdown of `costlens compare`, in-process and as
whole processes, for an ONNX graph and for Hugging Face config.json files.

    python benchmarks/bench_stages.py [--repeat 5] [--workdir DIR] [--configs llama3-70b,deepseek-v3]
                                      [--skip-process] [--skip-stages] [--scaling]

In-process (one fresh child per source, so imports are really paid): import, build on meta,
trace (torch.export), lowering, replication, roles, each default plan's estimate, rendering,
with the peak RSS after each stage. Whole processes: `costlens compare SOURCE --json` under
/usr/bin/time -v, cold (COSTLENS_CACHE pointed at an empty folder) and warm (the same folder
again), medians of --repeat, with the load average beside them (the machine is shared).
--scaling prices LLaMA-shaped configs of growing depth and a growing number of plans to show
time and RSS grow linearly. The weights-free 70B ONNX graph comes from make_graphs.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
TARGETS_S = {"onnx": 1.5, "cold": 3.0, "warm": 1.5, "large": 5.0}
TARGET_RSS_MB = 500

# The in-process breakdown runs in a child so that every import is paid there.
STAGES = r'''
import json, resource, sys, time
marks = []
t0 = time.perf_counter()
def lap(stage):
    global t0
    now = time.perf_counter()
    marks.append((stage, now - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    t0 = now
kind, source = sys.argv[1], sys.argv[2]
from costlens.model import analyse
from costlens.estimate import default_plans, estimate
from costlens.plans import Setup, parse_plan_spec
from costlens.render.plan import plan_document
lap("import costlens")
if kind == "onnx":
    import onnx
    lap("import onnx (+ml_dtypes)")
    from costlens.frontends.onnx import load_onnx
    graph = load_onnx(source)
    lap("onnx load + shape inference")
else:
    import torch
    lap("import torch")
    import transformers
    lap("import transformers")
    from costlens.frontends import hf_config as H
    from costlens.frontends.replicate import replicate_blocks
    from costlens.frontends.torch_export import export_program, graph_from_program
    config = H.read_config(source)
    lap("read config (transformers config class)")
    model = H.build_model(config, source)
    layers = H.layer_count(config)
    container = H.layer_container(model, layers)
    lap("build full model on meta")
    first = H._uniform_tail(model, container, layers)
    small = H.build_model(H.shallow_config(config, first + H.SHALLOW_BLOCKS), source)
    lap(f"build shallow model ({first + H.SHALLOW_BLOCKS} blocks)")
    program = export_program(small, None, source=source)
    lap("trace (torch.export)")
    shallow = graph_from_program(program, source)
    lap("lowering to the IR")
    graph = replicate_blocks(shallow, container, layers, first)
    lap("replication")
loaded = analyse(graph)
lap("roles")
results = []
for spec in default_plans(loaded):
    results.append((spec, estimate(loaded, parse_plan_spec(spec), Setup())))
    lap(f"estimate {spec.split(':')[0]}")
json.dumps(plan_document(loaded, results))
lap("rendering (the compare JSON document)")
print(json.dumps({"nodes": len(graph.nodes), "marks": marks}))
'''

def run_stages(kind: str, source: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", STAGES, kind, str(source)], capture_output=True, text=True,
                         env={**os.environ, "COSTLENS_CACHE": "off"})
    if out.returncode != 0:
        raise SystemExit(f"stage run of {source} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def costlens_command() -> list[str]:
    script = shutil.which("costlens", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                             os.environ.get("PATH", "")]))
    return [script] if script else [sys.executable, "-m", "costlens.cli"]


def timed_process(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one whole process under /usr/bin/time -v."""
    out = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", out.stderr)
    hours, minutes, seconds = wall.groups()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)
    return int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds), int(rss.group(1)) / 1024


def median_of(argv, env, repeat: int, fresh_cache: Path | None = None):
    walls, rss = [], []
    for _ in range(repeat):
        if fresh_cache is not None:
            shutil.rmtree(fresh_cache, ignore_errors=True)
        wall, peak = timed_process(argv, env)
        walls.append(wall)
        rss.append(peak)
    return statistics.median(walls), max(rss)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def process_table(sources: list[tuple[str, str, Path]], repeat: int, workdir: Path) -> list[str]:
    rows = ["| source | run | median wall (s) | peak RSS (MB) | load avg before |", "|---|---|---|---|---|"]
    command = costlens_command()
    for label, kind, path in sources:
        argv = [*command, "compare", str(path), "--json"]
        cache = workdir / f"cache-{label}"
        env = {**os.environ, "COSTLENS_CACHE": str(cache)}
        runs = [("cold", cache)] if kind == "onnx" else [("cold", cache), ("warm", None)]
        for run, fresh in runs:
            load = load_average()
            wall, rss = median_of(argv, env, repeat, fresh)
            rows.append(f"| {label} | {run if kind != 'onnx' else 'whole process'} | {wall:.2f} | {rss:.0f} | {load} |")
            print(rows[-1], flush=True)
    return rows


def llama_config(layers: int) -> dict:
    return json.loads((CONFIGS / "llama3-70b.json").read_text()) | {"num_hidden_layers": layers}


def scaling(workdir: Path, repeat: int) -> list[str]:
    """Whole warm-cache runs at growing depth (5 default plans), then at a growing number of plans."""
    rows = ["| what | n | median wall (s) | peak RSS (MB) |", "|---|---|---|---|"]
    command = costlens_command()
    for layers in (20, 40, 80, 160):
        path = workdir / f"llama-{layers}.json"
        path.write_text(json.dumps(llama_config(layers)))
        cache = workdir / f"cache-depth-{layers}"
        env = {**os.environ, "COSTLENS_CACHE": str(cache)}
        timed_process([*command, "inspect", str(path), "--json"], env)          # fill the cache
        wall, rss = median_of([*command, "compare", str(path), "--json"], env, repeat)
        rows.append(f"| layers (warm compare, 5 plans) | {layers} | {wall:.2f} | {rss:.0f} |")
        print(rows[-1], flush=True)
    path = workdir / "llama-80.json"
    env = {**os.environ, "COSTLENS_CACHE": str(workdir / "cache-depth-80")}
    specs = ["full", "freeze=attn", "train=ffn", "lora=attn;rank=8", "lora=attn,ffn;rank=8", "lora=attn;rank=16",
             "lora=ffn;rank=4", "train=attn", "lora=attn,ffn;rank=64", "freeze=ffn"]
    for n in (1, 2, 5, 10):
        argv = [*command, "compare", str(path), "--json"] + [a for s in specs[:n] for a in ("--plan", s)]
        wall, rss = median_of(argv, env, repeat)
        rows.append(f"| plans (warm 70B compare) | {n} | {wall:.2f} | {rss:.0f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--configs", default="llama3-70b,mixtral-8x7b,qwen1.5-moe-a2.7b,llama3.1-405b,deepseek-v3")
    parser.add_argument("--skip-process", action="store_true")
    parser.add_argument("--skip-stages", action="store_true")
    parser.add_argument("--scaling", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="costlens-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    from make_graphs import PRESETS, build_llama_graph

    onnx_path = workdir / "llama3-70b.onnx"
    if not onnx_path.exists():
        build_llama_graph(workdir, "llama3-70b", **PRESETS["llama3-70b"])
    sources = [("LLaMA-3-70B ONNX", "onnx", onnx_path)]
    sources += [(name, "config", CONFIGS / f"{name}.json") for name in args.configs.split(",") if name]
    print(f"load average at start: {load_average()} ({os.cpu_count()} CPUs)")
    if not args.skip_stages:
        for label, kind, path in sources:
            found = run_stages(kind, path)
            print(f"\n{label} ({found['nodes']:,} nodes): in-process stages")
            for stage, seconds, rss in found["marks"]:
                print(f"  {stage:48s} {seconds:7.3f} s   peak RSS {rss:6.0f} MB")
            print(f"  {'total':48s} {sum(m[1] for m in found['marks']):7.3f} s")
    if not args.skip_process:
        print(f"\nwhole processes, `costlens compare SOURCE --json`, median of {args.repeat}:")
        process_table(sources, args.repeat, workdir)
    if args.scaling:
        print("\nscaling:")
        scaling(workdir, args.repeat)
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
