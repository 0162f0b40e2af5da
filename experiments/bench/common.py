"""Measurement helpers shared by the bench scripts.

Each comparison runs *ours* and the *baseline* in the same process, interleaved (o, b, o, b, ...) after a
warm-up, and reports medians, so drift in machine load hits both sides alike. Peak memory is measured
in a fresh subprocess per side (its own max RSS from ``wait4``), because allocator caches make
in-process peaks meaningless.
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


def peak_rss_mib(code: str) -> float:
    """Max resident set size (MiB) of a fresh Python process running ``code``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"memory probe failed (exit {os.waitstatus_to_exitcode(status)}):\n{code}")
    return usage.ru_maxrss / 1024  # Linux reports KiB


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
