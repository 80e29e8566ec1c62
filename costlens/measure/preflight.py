"""Will the measured run fit? The estimate of the very step validate is about to run, against
the memory free on the machine (issue 16 item 9): refuse before building anything too big."""
from __future__ import annotations

from pathlib import Path

from costlens.errors import PlanError

# The measured run holds more than the step itself: the module is built in fp32 before any cast,
# the tracker keeps a record per storage, and the first step's transients come and go. Half the
# free memory is left for that and for the other processes of the machine.
HEADROOM = 0.5


def free_bytes(device: str = "cpu") -> int | None:
    """Bytes free for a new process on ``device`` (MemAvailable on Linux; psutil elsewhere), or None."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.mem_get_info()[0]
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(peak_bytes: int, build_bytes: int, device: str = "cpu", free: int | None = None) -> None:
    """PlanError (one line, suggesting --tiny) when ``peak_bytes`` (the estimated step) plus
    ``build_bytes`` (fp32 weights while the module is built) exceed HEADROOM of the free memory."""
    free = free_bytes(device) if free is None else free
    if free is None:
        return
    need = peak_bytes + build_bytes
    if need > HEADROOM * free:
        raise PlanError(f"the measured step needs about {need / 2**30:.2f} GiB (estimated peak plus the fp32 build) "
                        f"but {device} has {free / 2**30:.2f} GiB free: validate a small model of the same "
                        "architecture with --tiny (or --layers N --hidden H)")
