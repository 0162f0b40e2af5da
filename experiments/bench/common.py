"""Measurement helpers shared by the bench scripts.

Each comparison runs *ours* and the *baseline* in the same process, interleaved (o, b, o, b, ...) after a
warm-up, and reports medians, so drift in machine load hits both sides alike. Peak memory is measured
in a fresh subprocess per side (the kernel's peak-RSS counter, reset once the inputs are built), because
allocator caches make in-process peaks meaningless.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def interleaved(
    ours: Callable[[], object], baseline: Callable[[], object], reps: int = 5, warmup: int = 1
) -> tuple[float, float]:
    """Median wall seconds of ``ours`` and ``baseline`` over ``reps`` alternating runs."""
    for _ in range(warmup):
        ours()
        baseline()
    t_ours, t_base = [], []
    for _ in range(reps):
        for fn, out in ((ours, t_ours), (baseline, t_base)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_base)


_PEAK_PROBE = """
import gc, re
def _kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
gc.collect()
_base = _kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM (the peak) to the current RSS
{code}
print("ZSCIR_PEAK_MIB", (_kib("VmHWM") - _base) / 1024)
"""


def peak_rss_above_setup_mib(setup: str, code: str) -> float:
    """Peak resident memory (MiB) that ``code`` adds on top of what ``setup`` left resident, in a fresh
    Python process. Linux: the kernel's peak counter is reset after ``setup``, so a transient peak while
    building the inputs cannot hide the measured code's own peak."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    script = setup + _PEAK_PROBE.format(code=code)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ZSCIR_PEAK_MIB"))
    return float(line.split()[1])


def row(ours: float, baseline: float, unit: str, higher_is_better: bool, **notes: object) -> dict:
    """One results.json entry; ``ratio`` = how many times better ours is.

    ``ratio`` is None when its denominator is not positive (e.g. both peaks below the RSS resolution at
    quick sizes): a ratio against nothing measured would be a made-up number."""
    num, den = (ours, baseline) if higher_is_better else (baseline, ours)
    ratio = num / den if den > 0 else None
    return {
        "ours": ours,
        "baseline": baseline,
        "unit": unit,
        "ratio": ratio,
        "higher_is_better": higher_is_better,
        **notes,
    }


def null_row(unit: str, higher_is_better: bool, reason: str) -> dict:
    return {
        "ours": None,
        "baseline": None,
        "unit": unit,
        "ratio": None,
        "higher_is_better": higher_is_better,
        "note": reason,
    }


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }
