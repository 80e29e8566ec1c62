"""Time `costlens inspect` (or `compare`) on weights-free LLaMA-2-7B and LLaMA-3-70B graphs.

    python benchmarks/bench_inspect.py [--repeat 3] [--command inspect|compare|load] [--workdir DIR]

Each measurement is a whole fresh process, as a user would run it: interpreter start,
imports, graph load, roles, estimate, JSON out. Wall time is taken around the child and its
peak RSS from os.wait4 in a tiny wrapper process (see WRAPPER for why). `--command load`
times only `load_onnx` in a child; it is also the fallback while costlens.cli does not exist.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_graphs import PRESETS, build_llama_graph  # noqa: E402

# Reference targets for one `inspect` (wall seconds per model; peak RSS for all).
TARGET_WALL_S = {"llama2-7b": 2.0, "llama3-70b": 5.0}
TARGET_RSS_MB = 500.0
LOAD_SNIPPET = "import sys; from costlens.frontends.onnx import load_onnx; load_onnx(sys.argv[1])"


def cli_available() -> bool:
    return importlib.util.find_spec("costlens.cli") is not None


def command_for(command: str, model: Path) -> list[str]:
    """The argv of one measured run."""
    if command == "load":
        return [sys.executable, "-c", LOAD_SNIPPET, str(model)]
    # Prefer the console script next to this interpreter (what a user runs); `-m` needs
    # cli.py to call main() under __main__, which the console script does not rely on.
    script = shutil.which("costlens", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    prefix = [script] if script else [sys.executable, "-m", "costlens.cli"]
    return prefix + [command, str(model), "--json"]


# A tiny process between us and each measured child. Linux starts a child's ru_maxrss at
# the RSS of the process it was forked from (exec records the old mm's high-water mark), so
# timing from this process, which holds numpy, onnx and a 70B graph, would inflate every
# child's peak. The wrapper imports almost nothing, spawns the child, and writes the child's
# own wall time, peak RSS (KB on Linux) and exit code to the file named in argv[1].
WRAPPER = """
import os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    f.write(f"{wall} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_once(argv: list[str]) -> dict:
    """Run one child through the wrapper; wall seconds, its peak RSS in MB, exit code, output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rusage") as result:
        # -I -S: no site imports, so the wrapper's own RSS (the child's floor) stays ~10 MB
        wrapper = subprocess.run([sys.executable, "-I", "-S", "-c", WRAPPER, result.name, *argv],
                                 stdout=out, stderr=err, stdin=subprocess.DEVNULL, check=False)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
        fields = result.read().split()
    if len(fields) != 3:   # the wrapper itself failed, e.g. the command does not exist
        return {"wall": 0.0, "rss_mb": 0.0, "code": wrapper.returncode or 1, "stdout": stdout, "stderr": stderr}
    wall, maxrss_kb, code = fields
    return {"wall": float(wall), "rss_mb": int(maxrss_kb) / 1024, "code": int(code),
            "stdout": stdout, "stderr": stderr}


def json_problem(stdout: bytes) -> str | None:
    try:
        json.loads(stdout)
    except ValueError as e:
        return f"--json output is not JSON: {e}"
    return None


def measure(command: str, model: Path, repeat: int) -> dict:
    argv = command_for(command, model)
    runs = [run_once(argv) for _ in range(repeat)]
    failed = next((r for r in runs if r["code"] != 0), None)
    problem = None
    if failed is not None:
        problem = f"exit {failed['code']}: {failed['stderr'].decode(errors='replace').strip()[-400:]}"
    elif command != "load":
        problem = json_problem(runs[0]["stdout"])
    walls = [r["wall"] for r in runs]
    return {"min": min(walls), "median": statistics.median(walls),
            "rss_mb": max(r["rss_mb"] for r in runs), "problem": problem}


def file_sizes(onnx_path: Path) -> dict:
    weights = onnx_path.with_suffix(".weights").stat()
    return {"onnx_mb": onnx_path.stat().st_size / 2**20,
            "weights_apparent_gb": weights.st_size / 2**30,
            "weights_disk_mb": weights.st_blocks * 512 / 2**20}   # st_blocks: 512-byte units


def verdict(name: str, result: dict, command: str) -> str:
    if result["problem"]:
        return "FAILED"
    if command != "inspect":
        return "-"   # the targets are set for inspect only
    ok = result["median"] < TARGET_WALL_S[name] and result["rss_mb"] < TARGET_RSS_MB
    return "ok" if ok else "MISSED"


def table(rows: list[dict], command: str, repeat: int) -> str:
    head = (f"| model | graph build s | {command} wall s min / median of {repeat} | peak RSS MB "
            f"| .onnx MB | weights apparent GB / on disk MB | target |")
    lines = [head, "|" + " --- |" * 7]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['build_s']:.2f} | {r['min']:.2f} / {r['median']:.2f} | {r['rss_mb']:.0f} "
            f"| {r['onnx_mb']:.2f} | {r['weights_apparent_gb']:.1f} / {r['weights_disk_mb']:.1f} | {r['verdict']} |")
    return "\n".join(lines)


def bench(workdir: Path, command: str, repeat: int, models: list[str]) -> list[dict]:
    rows = []
    for name in models:
        start = time.perf_counter()
        path = build_llama_graph(workdir, name, **PRESETS[name])
        row = {"name": name, "build_s": time.perf_counter() - start, **file_sizes(path)}
        row.update(measure(command, path, repeat))
        row["verdict"] = verdict(name, row, command)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per model (fresh process each)")
    parser.add_argument("--command", choices=["inspect", "compare", "load"], default="inspect")
    parser.add_argument("--workdir", type=Path, help="keep the graphs here (default: a temp dir)")
    parser.add_argument("--model", choices=[*PRESETS, "all"], default="all")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    command = args.command
    if command != "load" and not cli_available():
        print(f"costlens.cli is not there yet: timing load_onnx instead of `{command}`.\n")
        command = "load"
    models = list(PRESETS) if args.model == "all" else [args.model]
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        rows = bench(args.workdir, command, args.repeat, models)
    else:
        with tempfile.TemporaryDirectory(prefix="costlens-bench-") as tmp:
            rows = bench(Path(tmp), command, args.repeat, models)

    print(table(rows, command, args.repeat))
    print(f"\ntargets for inspect: " + ", ".join(f"{m} < {s:g} s" for m, s in TARGET_WALL_S.items())
          + f", peak RSS < {TARGET_RSS_MB:g} MB")
    for r in rows:
        if r["problem"]:
            print(f"{r['name']}: {r['problem']}")
    return 1 if any(r["problem"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
