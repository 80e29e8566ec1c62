"""Run the fuzz corpus of hostile and broken inputs (tests/fuzz_corpus.py) and print figures.

    python benchmarks/fuzz.py                 # every input, in --jobs worker subprocesses (audit hook on open)
    python benchmarks/fuzz.py --fresh         # every input in a fresh Python process of its own (slower)
    python benchmarks/fuzz.py --quick         # the deterministic sample tests/test_fuzz.py runs
    python benchmarks/fuzz.py --jobs 2 --only external --keep /tmp/fuzz

Prints the number of inputs, outcomes by exit code, the slowest input and its time, the
largest peak RSS, reads outside the model's folder, and every failure with the input's
description. Exit 1 when any input breaks the invariant (docs/fuzz.md).
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fuzz_corpus as fc  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Only the quick sample of tests/test_fuzz.py.")
    parser.add_argument("--jobs", type=int, default=2, help="Inputs run at once (subprocesses).")
    parser.add_argument("--only", default="", help="Only case ids containing this text.")
    parser.add_argument("--keep", help="Build the inputs in this folder and keep them (default: a temp folder).")
    parser.add_argument("--fresh", action="store_true",
                        help="One fresh Python process per input (real exit codes and stderr; ~1 s of imports each).")
    parser.add_argument("--in-process", action="store_true",
                        help="Run every input in this process through click's CliRunner (fast; audit hook in-process).")
    parser.add_argument("--timeout", type=float, default=fc.TIMEOUT_SECONDS, help="Seconds per input.")
    args = parser.parse_args(argv)

    cases = fc.corpus()
    if args.quick:
        cases = fc.quick_sample(cases)
    cases = [c for c in cases if args.only in c.id]
    has_torch = importlib.util.find_spec("torch") is not None
    skipped = [c for c in cases if c.needs_torch and not has_torch]
    cases = [c for c in cases if c not in skipped]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="costlens-fuzz-"))
    root.mkdir(parents=True, exist_ok=True)
    fc.plan_document()          # built once, before the threads

    local = threading.local()
    workers = []

    def runner():
        if args.in_process:
            return fc.run_in_process
        if args.fresh:
            return fc.run_subprocess
        if not hasattr(local, "worker"):
            local.worker = fc.Worker()
            workers.append(local.worker)
        return local.worker.run

    def run(case):
        folder = root / fc.folder_name(case)
        if folder.exists():
            shutil.rmtree(folder)
        try:
            invocation, outcome = runner()(case, folder, args.timeout)
            problems = fc.violations(case, invocation, outcome, folder)
        except Exception as e:  # noqa: BLE001 - a broken generator is a failure of the suite, reported
            outcome, problems = None, [f"the fuzz harness failed: {type(e).__name__}: {e}"]
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        return case, outcome, problems

    start = time.perf_counter()
    results = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        # in-process runs stay on the main thread (their timeout is a SIGALRM)
        mapped = map(run, cases) if args.in_process else pool.map(run, cases)
        for number, result in enumerate(mapped, 1):
            results.append(result)
            if number % 50 == 0:
                print(f"  ... {number}/{len(cases)} inputs ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    wall = time.perf_counter() - start
    for worker in workers:
        worker.stop()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(report(results, skipped, wall, args))
    return 1 if any(problems for _, _, problems in results) else 0


def report(results, skipped, wall: float, args) -> str:
    ran = [(c, o) for c, o, _ in results if o is not None]
    codes = collections.Counter("timeout" if o.exit_code is None else o.exit_code for _, o in ran)
    families = collections.Counter(c.family for c, _, _ in results)
    slowest = max(ran, key=lambda r: r[1].seconds, default=None)
    biggest = max((r for r in ran if r[1].peak_rss_mb is not None), key=lambda r: r[1].peak_rss_mb, default=None)
    outside = sum(1 for _, o in ran if o.outside_opens)
    failures = [(c, p) for c, _, p in results if p]
    lines = [
        f"costlens fuzz ({'quick sample' if args.quick else 'full corpus'}, seed {fc.SEED}, "
        f"{'in-process' if args.in_process else 'a fresh process per input' if args.fresh else 'worker subprocesses'}, "
        f"--jobs {args.jobs}, {wall:.0f} s wall)",
        f"inputs: {len(results)} ({', '.join(f'{f} {n}' for f, n in sorted(families.items()))})",
        "outcomes by exit code: " + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items(), key=lambda kv: str(kv[0]))),
    ]
    if slowest:
        lines.append(f"slowest input: {slowest[0].id} ({slowest[0].description}) {slowest[1].seconds:.2f} s")
        times = sorted(o.seconds for _, o in ran)
        lines.append(f"time per input: median {times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s "
                     f"(timeout {args.timeout:.0f} s)")
    if biggest:
        lines.append(f"largest peak RSS: {biggest[1].peak_rss_mb:.0f} MB ({biggest[0].id}"
                     f"{'' if args.fresh else '; a worker process, cumulative over its inputs'})")
    lines.append(f"inputs that opened a file outside the model's folder: {outside}")
    if skipped:
        lines.append(f"skipped (need the torch extra): {len(skipped)}")
    lines.append(f"failures: {len(failures)}")
    for case, problems in failures:
        lines.append(f"  {case.id}: {case.description}")
        for problem in problems:
            lines.append(f"      {problem}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
