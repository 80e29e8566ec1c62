"""Peak inference memory of an ONNX graph in onnxruntime, measured in a fresh process.

The child process imports onnxruntime, records its resident set (the baseline), creates the
session, runs the graph once on random token ids and reports its peak resident set
(``VmHWM``: unlike ``ru_maxrss``, which a child inherits from the process that spawned it,
the high-water mark belongs to the new address space). The difference is what the session
cost: weights, activations, and onnxruntime's own arena and kernel overheads, which dominate
for tiny models.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from costlens.errors import CostlensError

_CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort

def status_kib(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))

path, batch, seq, vocab, provider = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
baseline = status_kib("VmRSS")
options = ort.SessionOptions()
session = ort.InferenceSession(path, options, providers=[provider])
inputs = {session.get_inputs()[0].name: np.random.default_rng(0).integers(0, vocab, (batch, seq), dtype=np.int64)}
session.run(None, inputs)
peak = status_kib("VmHWM")
print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "provider": session.get_providers()[0]}))
"""


@dataclass(frozen=True)
class InferenceMeasurement:
    """Resident-set bytes of one onnxruntime run in a fresh process (read in KiB, stored in bytes);
    ``session_bytes`` is what the session cost, runtime overheads included."""

    provider: str           # the execution provider onnxruntime ran on
    baseline_bytes: int     # VmRSS after importing onnxruntime, before the session
    peak_bytes: int         # VmHWM after one run: the process's high-water mark

    @property
    def session_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes


def measure_ort_inference(path: str | Path, batch: int, seq: int, vocab: int) -> InferenceMeasurement:
    """Run the graph once in onnxruntime in a child process (CUDA provider where present)."""
    import onnxruntime as ort
    provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() \
        else "CPUExecutionProvider"
    done = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(path), str(batch), str(seq), str(vocab), provider],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CostlensError(f"onnxruntime could not run {path}: {last}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return InferenceMeasurement(result["provider"], result["baseline_kib"] * 1024, result["peak_kib"] * 1024)
