"""How much host memory and disk a real CPU run may use, checked before it starts.

A real run on CPU (``qplan measure``, ``qplan load --device cpu``) holds what the plan
predicts in host memory, and random weights are first written to a temporary checkpoint.
Starting one that cannot fit would end in the kernel's OOM killer (or a full disk), not an
error message, so the runs check first and say what would fit.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from qplan.errors import QplanError

# Python, torch and the libraries themselves, beside the tensors.
PROCESS_OVERHEAD = 2 * 1024**3


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else physical memory; None if unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_host_room(needed_bytes: int, checkpoint_bytes: int, what: str, fix: str) -> None:
    """Raise a one-line QplanError when ``what`` cannot fit in host memory or on disk."""
    gib = 1024**3
    available = available_host_bytes()
    if available is not None and needed_bytes + PROCESS_OVERHEAD > available:
        raise QplanError(
            f"{what} needs about {(needed_bytes + PROCESS_OVERHEAD) / gib:.1f} GiB of host "
            f"memory and {available / gib:.1f} GiB is available; {fix}"
        )
    if checkpoint_bytes:
        free = shutil.disk_usage(tempfile.gettempdir()).free
        if checkpoint_bytes > free:
            raise QplanError(
                f"{what} writes a {checkpoint_bytes / gib:.1f} GiB random-weights checkpoint "
                f"and {tempfile.gettempdir()} has {free / gib:.1f} GiB free; set TMPDIR to a "
                f"bigger disk, or {fix}"
            )
