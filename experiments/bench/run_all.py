"""``make bench``: every hot path against the peers' own code paths (``peer_*`` rows, the headline) and
against zscir's own alternatives, then ``experiments/bench/results.json`` and
``experiments/bench/RESULTS.md``.

    python -m experiments.bench.run_all            # full sizes, 1 thread (~15 min on 2 CPU cores)
    python -m experiments.bench.run_all --quick    # tiny sizes (the smoke test)
    python -m experiments.bench.run_all --only topk scoring
    python -m experiments.bench.run_all --strict   # refuse to write results measured under contention
    python -m experiments.bench.run_all --compare previous/results.json   # ratio drift vs an earlier run

How each row is measured (pinned threads, order-swapped rounds, median/min/max, load check, full
equality of both sides' results): ``experiments/bench/common.py``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from experiments.bench.common import load_limit, load_now, machine, null_row, pinned_threads
from zscir.utils.io import atomic_write_json, atomic_write_text

HERE = Path(__file__).parent

#: bench name -> (module, kwargs for full runs, kwargs for --quick); each run() returns {row name: row}
BENCHES: dict[str, tuple[str, dict, dict]] = {
    "scoring": (
        "bench_scoring",
        {},
        {
            "cirr": (300, 200),
            "circo_val": (20, 3000),
            "circo_test": (50, 3000),
            "dim": 64,
            "reps": 2,
            "circo_val_reps": 2,
        },
    ),
    "topk": (
        "bench_topk",
        {},
        {
            "queries": 50,
            "gallery": 5000,
            "dim": 64,
            "reps": 2,
            "memory_queries": 100,
            "circo_queries": 20,
            "circo_gallery": 3000,
        },
    ),
    "lincir_step": ("bench_lincir_step", {}, {"batch": 16, "captions": 96, "steps": 2, "reps": 2}),
    "pli_dropping": ("bench_pli_dropping", {}, {"batch": 8, "reps": 2}),
    "cam": ("bench_cam", {}, {"batch": 4, "batches": 2, "reps": 2}),
    "gallery_cache": ("bench_gallery_cache", {}, {"pool": 60, "reps": 2}),
    "framework_overhead": ("bench_framework", {}, {"samples": 32, "batch": 8, "reps": 2}),
    "searle": ("bench_searle", {"quick": False}, {"quick": True}),
}
#: GPU rows measured only where CUDA is present (null otherwise)
GPU_BENCHES: dict[str, tuple[str, dict, dict]] = {
    "gpu": ("bench_gpu", {}, {"pli_batch": 8, "cam_batch": 8, "lincir_batch": 64, "reps": 2}),
}
#: target ratios (ours vs baseline, "times better"); peer rows: the issue's goals
TARGETS = {
    "peer_cirr_val": 1.0,
    "peer_cirr_val_memory": 1.0,
    "peer_circo_val": 2.0,
    "peer_circo_val_memory": 1.0,
    "peer_circo_test": 2.0,
    "peer_circo_test_memory": 1.0,
    "peer_topk": 1.0,
    "peer_topk_memory": 10.0,
    "peer_lincir_step": 1.0,
    "peer_pli_step": 1.0,
    "peer_cam_batch": 1.0,
    "topk": 3.0,
    "topk_memory": 2.0,
    "gallery_cache": 20.0,
    "pli_dropping": 3.0,
    "pli_dropping_step": 1.4,
    "lincir_step": 2.5,
    "cam_batch": 1.3,
    "cam_cache": 3.0,
    "framework_overhead": 0.9,
    "oti_batched": 5.0,
    "oti_cache": 20.0,
    "gpu_pli_step": 1.0,
    "gpu_pli_bf16": 2.5,
    "gpu_cam_batch": 1.0,
    "gpu_lincir": 1.0,
}


def run(
    only: list[str] | None = None,
    quick: bool = False,
    out_dir: Path = HERE,
    threads: int = 1,
    strict: bool = False,
    previous: dict | None = None,
) -> dict:
    """Run the benches, write ``results.json`` and ``RESULTS.md`` under ``out_dir``; with ``previous``
    (an earlier run's ``results.json``), RESULTS.md gets each ratio's drift from it.

    Raises:
        RuntimeError: ``strict`` and a row was measured under contention (nothing is written).
    """
    with pinned_threads(threads):
        return _run(only, quick, out_dir, strict, previous)


#: two runs of the same commit agree when every ratio is within this fraction of the other run's
REPRODUCIBLE = 0.15


def drift(results: dict, previous: dict) -> dict[str, float]:
    """Row -> relative difference of its ratio from ``previous``'s (``this / previous − 1``), for the
    rows both runs measured."""
    return {
        name: r["ratio"] / previous[name]["ratio"] - 1
        for name, r in results.items()
        if r.get("ratio") and (previous.get(name) or {}).get("ratio")
    }


def _reproducibility(results: dict, previous: dict) -> list[str]:
    d = drift(results, previous)
    off = {k: v for k, v in d.items() if abs(v) > REPRODUCIBLE}
    lines = [
        "",
        "## Reproducibility: this run vs the previous one",
        "",
        f"{len(d)} ratios compared; {len(d) - len(off)} within ±{REPRODUCIBLE:.0%} of the previous run"
        + (f"; outside: {', '.join(off)}." if off else "."),
        "",
        "| name | previous ratio | this ratio | drift |",
        "|---|---|---|---|",
    ]
    for name, v in d.items():
        mark = f"**{v:+.1%}**" if name in off else f"{v:+.1%}"
        lines.append(f"| {name} | {previous[name]['ratio']:.3g} | {results[name]['ratio']:.3g} | {mark} |")
    return lines


def _run(only: list[str] | None, quick: bool, out_dir: Path, strict: bool, previous: dict | None) -> dict:
    results: dict[str, dict] = {}
    for name, (module, full, small) in {**BENCHES, **GPU_BENCHES}.items():
        if only and name not in only:
            continue
        if name in GPU_BENCHES and not torch.cuda.is_available():
            for row_name, unit in importlib.import_module(f"experiments.bench.{module}").ROWS.items():
                results[row_name] = null_row(unit, True, "no CUDA GPU on this machine")
            continue
        print(f"[bench] {name} (load {load_now():.2f}) ...", flush=True)
        start = time.time()
        rows = importlib.import_module(f"experiments.bench.{module}").run(**(small if quick else full))
        for key, value in rows.items():
            value["seconds"] = round(time.time() - start, 1)
            results[key] = value
            print(f"[bench]   {key}: {summary(value)}", flush=True)
    contended = [k for k, v in results.items() if v.get("contended")]
    if strict and contended:
        raise RuntimeError(
            f"rows measured while the machine was busy (load above {load_limit():.1f}): {contended}; "
            "nothing written. Run again on a quiet machine, or without --strict to keep them flagged."
        )
    info = machine()  # inside the pinned block: records the thread count the rows ran under
    atomic_write_json(out_dir / "results.json", results)
    report = render(results, info, quick)
    if previous:
        report += "\n".join(_reproducibility(results, previous)) + "\n"
    atomic_write_text(out_dir / "RESULTS.md", report)
    return results


def summary(r: dict) -> str:
    if r["ours"] is None:
        return "not measured"
    ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "no ratio (nothing measured)"
    flags = "".join(
        [
            " equal" if r.get("equal") else (" NOT EQUAL" if r.get("equal") is False else ""),
            " CONTENDED" if r.get("contended") else "",
        ]
    )
    return f"ours {r['ours']:.4g} vs baseline {r['baseline']:.4g} {r['unit']} -> {ratio}{flags}"


def _cell(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def _table(results: dict, names: list[str]) -> list[str]:
    lines = [
        "| name | ours (min–max) | baseline (min–max) | unit | ratio | target | equal | load | baseline is | sizes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = results[name]
        target = TARGETS.get(name)
        if r["ours"] is None:
            lines.append(
                f"| {name} | – | – | {r['unit']} | – | ≥ {target} | – | – | – | {r.get('note', '')} |"
            )
            continue
        ours, base = _cell(r["ours"]), _cell(r["baseline"])
        if "ours_min" in r:
            ours += f" ({_cell(r['ours_min'])}–{_cell(r['ours_max'])})"
            base += f" ({_cell(r['baseline_min'])}–{_cell(r['baseline_max'])})"
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
        if r["ratio"] is not None and target is not None and r["ratio"] < target:
            ratio = f"**{ratio}**"
        equal = {True: "yes", False: "**NO**", None: "n/a"}[r.get("equal")]
        load = "–" if "load" not in r else f"{r['load'][0]:.1f}/{r['load'][1]:.1f}"
        if r.get("contended"):
            load += " **contended**"
        lines.append(
            f"| {name} | {ours} | {base} | {r['unit']} | {ratio} | ≥ {target} | {equal} | {load} | "
            f"{r.get('baseline_is', '')} | {r.get('size', '')} |"
        )
    return lines


def render(results: dict, info: dict, quick: bool) -> str:
    contended = [k for k, v in results.items() if v.get("contended")]
    peer = [
        k for k in results if k.startswith("peer_") or k in ("gpu_pli_step", "gpu_cam_batch", "gpu_lincir")
    ]
    own = [k for k in results if k not in peer]
    lines = [
        "# zscir performance: each hot path vs the peers' own code, then vs zscir's own alternatives",
        "",
        f"Measured {datetime.date.today().isoformat()} on {info['cpu']} ({info['cores']} cores, torch threads "
        f"{info['torch_threads']}), torch {info['torch']}, GPU: {info['gpu'] or 'none'}"
        + (" — QUICK sizes (smoke test), not representative" if quick else "")
        + ".",
        "Both sides run in one process in order-swapped rounds (ours first, then the baseline first, ...) after "
        "one warm-up call each; each number is the median (min–max) over the rounds. `ratio` = how many times "
        "better ours is. `equal`: both sides' full results compared in the same run. `load`: 1-minute load "
        f"average before/after; above {load_limit():.1f} the row is marked contended.",
    ]
    if contended:
        lines += [
            "",
            f"**{len(contended)} rows were measured on a busy machine (contended): {', '.join(contended)}. "
            "Their ratios are not trustworthy; measure again on a quiet machine.**",
        ]
    lines += ["", "## Against the peers' own code paths", "", *_table(results, peer)]
    lines += ["", "## Against zscir's own alternatives", "", *_table(results, own)]
    gpu_notes = HERE / "GPU_RESULTS.md"
    if gpu_notes.is_file():
        lines += ["", gpu_notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="bench names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every row")
    parser.add_argument("--strict", action="store_true", help="refuse to write results from a busy machine")
    parser.add_argument("--compare", type=Path, help="an earlier results.json: report each ratio's drift")
    args = parser.parse_args()
    previous = json.loads(args.compare.read_text()) if args.compare else None
    try:
        results = run(args.only, args.quick, args.out, args.threads, args.strict, previous)
    except RuntimeError as err:
        sys.exit(str(err))
    print(json.dumps({k: round(v["ratio"], 2) if v["ratio"] else None for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
