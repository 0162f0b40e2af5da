"""Measurement harness shared by the bench scripts.

How a comparison is measured (:func:`compare`):

* **threads pinned**: :func:`pin_threads` fixes torch's intra-op threads (default 1, ``--threads``) and
  the BLAS/OpenMP variables passed to memory subprocesses; every row records the count it ran under.
* **order swapped**: each round runs both sides, ours first in even rounds and the baseline first in odd
  ones (o b | b o | o b ...), after one warm-up call of each, so neither side always runs on a cache or
  a turbo state the other left behind.
* **repeated, spread reported**: median, min and max wall seconds of each side over ``reps`` rounds.
* **load checked**: the 1-minute load average is read before and after; a row measured while other
  processes kept the cores busy (load above ``cores − threads + 0.5``, i.e. more runnable work than the
  cores not used by this bench) is marked ``contended: true``, and ``run_all --strict`` refuses to write
  results that hold one.
* **results compared in full**: the caller passes the two sides' complete outputs to :func:`same` (every
  element, every key), and the row records ``equal``.

Peak memory is measured in a fresh subprocess per side (:func:`peak_rss_above_setup_mib`, the kernel's
peak-RSS counter reset once the inputs are built), because allocator caches make in-process peaks
meaningless.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def _register_tiny77() -> dict:
    """The tiny CLIP with the 77-token text context every real CLIP has (zscir's ``tiny`` has 32), for
    rows where the peer runs the full context."""
    import zscir.backbones.open_clip_encoder as oc

    tiny = oc.TINY_ARCHITECTURES["tiny"]
    oc.TINY_ARCHITECTURES.setdefault(
        "tiny77", {**tiny, "text_cfg": {**tiny["text_cfg"], "context_length": 77}}
    )
    return {"kind": "open_clip", "model": "tiny77"}


#: backbone config of the 77-token tiny CLIP
TINY77 = _register_tiny77()
#: threads the bench runs under (set by :func:`pin_threads`)
_THREADS = {"n": torch.get_num_threads()}
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pin_threads(n: int) -> None:
    """Run every measurement (and every memory subprocess) with ``n`` intra-op threads."""
    torch.set_num_threads(n)
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    _THREADS["n"] = n


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """:func:`pin_threads` for a block; the previous thread count and variables come back after it."""
    previous, env = torch.get_num_threads(), {v: os.environ.get(v) for v in _THREAD_VARS}
    pin_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        _THREADS["n"] = previous
        for var, value in env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def threads() -> int:
    return _THREADS["n"]


def load_limit(busy: int | None = None) -> float:
    """The load average above which a run counts as contended: the cores this bench leaves free, + 0.5.
    ``busy``: cores the measured code itself keeps busy (default: the pinned thread count)."""
    return (os.cpu_count() or 1) - (threads() if busy is None else busy) + 0.5


def load_now() -> float:
    return os.getloadavg()[0]


def compare(
    ours: Callable[[], object],
    baseline: Callable[[], object],
    reps: int = 5,
    warmup: int = 1,
    busy: int | None = None,
    ours_repeat: int = 1,
) -> dict:
    """Time both sides in alternating, order-swapped rounds. ``busy``: cores the measured code keeps
    busy itself (e.g. threads + a loader worker), for the load check. ``ours_repeat``: in each round,
    ours runs that many times and its time is their mean — for a side of a few milliseconds (a cache
    hit), whose single calls scatter by ±30 % and would make the ratio irreproducible.

    Returns:
        ``{"ours": {median, min, max}, "baseline": {...}, "load": [before, after], "contended": bool,
        "threads": n, "reps": reps}`` (seconds).
    """
    load_before = load_now()
    for _ in range(warmup):
        ours()
        baseline()
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    sides = (("ours", ours), ("baseline", baseline))
    calls = {"ours": ours_repeat, "baseline": 1}
    for i in range(reps):
        for name, fn in sides if i % 2 == 0 else sides[::-1]:
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            times[name].append((time.perf_counter() - start) / calls[name])
    load_after = load_now()
    return {
        **{name: spread(t) for name, t in times.items()},
        "load": [round(load_before, 2), round(load_after, 2)],
        "contended": max(load_before, load_after) > load_limit(busy),
        "threads": threads(),
        "reps": reps,
    }


def time_one(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> dict:
    """``{median, min, max}`` seconds of ``fn`` alone (for a side with no baseline in this process)."""
    for _ in range(warmup):
        fn()
    t = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        t.append(time.perf_counter() - start)
    return spread(t)


def spread(t: Sequence[float]) -> dict:
    return {"median": statistics.median(t), "min": min(t), "max": max(t)}


def same(a: object, b: object, atol: float = 0.0) -> bool:
    """Full equality of two results: tensors/arrays element by element (exact unless ``atol``), mappings
    key by key, sequences item by item, floats exactly (or within ``atol``), anything else by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if a.shape != b.shape:
            return False
        if atol == 0 or not a.is_floating_point():
            return bool(torch.equal(a.to(b.dtype), b))
        return bool(torch.allclose(a.double(), b.double(), atol=atol, rtol=0))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return same(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b)), atol)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(same(a[k], b[k], atol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=atol) if atol else float(a) == float(b)
    return a == b


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
    Python process with the pinned thread count. Linux: the kernel's peak counter is reset after
    ``setup``, so a transient peak while building the inputs cannot hide the measured code's own peak."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        **{var: str(threads()) for var in _THREAD_VARS},
    }
    script = f"import torch\ntorch.set_num_threads({threads()})\n" + setup + _PEAK_PROBE.format(code=code)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ZSCIR_PEAK_MIB"))
    return float(line.split()[1])


def ratio_of(ours: float, baseline: float, higher_is_better: bool) -> float | None:
    """How many times better ours is; None when the denominator is not positive (nothing measured)."""
    num, den = (ours, baseline) if higher_is_better else (baseline, ours)
    return num / den if den > 0 else None


def row(
    ours: float,
    baseline: float,
    unit: str,
    higher_is_better: bool,
    *,
    baseline_is: str,
    equal: bool | None,
    **notes: object,
) -> dict:
    """One results.json entry; ``ratio`` = how many times better ours is than ``baseline``.

    Args:
        baseline_is: what the baseline is and where it comes from (file:line of the peer code, or
            "zscir's own ..." for an own-code baseline).
        equal: whether both sides' full results were checked equal in this run (None: not comparable,
            e.g. a cache hit vs a recomputation of a different object).
    """
    return {
        "ours": ours,
        "baseline": baseline,
        "unit": unit,
        "ratio": ratio_of(ours, baseline, higher_is_better),
        "higher_is_better": higher_is_better,
        "baseline_is": baseline_is,
        "equal": equal,
        **notes,
    }


def timed_row(
    timing: dict,
    unit: str,
    *,
    baseline_is: str,
    equal: bool | None,
    per_call: float | None = None,
    **notes: object,
) -> dict:
    """A row from :func:`compare`'s timing: seconds (lower is better), or ``per_call / seconds``
    (e.g. samples/s, higher is better) when ``per_call`` is given; min/max kept beside the medians."""

    def conv(x: float) -> float:
        return per_call / x if per_call is not None else x

    o, b = timing["ours"], timing["baseline"]
    hib = per_call is not None
    lo, hi = ("max", "min") if hib else ("min", "max")  # "min" of a throughput comes from the max time
    return row(
        conv(o["median"]),
        conv(b["median"]),
        unit,
        hib,
        baseline_is=baseline_is,
        equal=equal,
        ours_min=conv(o[lo]),
        ours_max=conv(o[hi]),
        baseline_min=conv(b[lo]),
        baseline_max=conv(b[hi]),
        threads=timing["threads"],
        reps=timing["reps"],
        load=timing["load"],
        contended=timing["contended"],
        **notes,
    )


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
