"""``make bench``: every hot path against its baseline, in one process each, then
``experiments/bench/results.json`` and ``experiments/bench/RESULTS.md``.

    python -m experiments.bench.run_all            # full sizes (~10 min on 2 CPU cores)
    python -m experiments.bench.run_all --quick    # tiny sizes (the smoke test)
    python -m experiments.bench.run_all --only topk gallery_cache
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import time
from pathlib import Path

import torch

from experiments.bench.common import machine, null_row
from zscir.utils.io import atomic_write_json, atomic_write_text

HERE = Path(__file__).parent

#: bench name -> (module, kwargs for full runs, kwargs for --quick); each run() returns {row name: row}
BENCHES: dict[str, tuple[str, dict, dict]] = {
    "topk": ("bench_topk", {}, {"queries": 50, "gallery": 5000, "dim": 64, "reps": 2, "memory_queries": 100}),
    "gallery_cache": ("bench_gallery_cache", {}, {"pool": 60, "reps": 2}),
    "pli_dropping": ("bench_pli_dropping", {}, {"batch": 8, "reps": 2}),
    "framework_overhead": ("bench_framework", {}, {"samples": 32, "batch": 8, "reps": 2}),
    "lincir_step": ("bench_lincir_step", {}, {"batch": 8, "captions": 32, "reps": 1}),
    "cam": ("bench_cam", {}, {"batch": 4, "batches": 2, "reps": 2}),
    "searle": ("bench_searle", {"quick": False}, {"quick": True}),
}
#: GPU rows measured only where CUDA is present (null otherwise)
GPU_BENCHES: dict[str, tuple[str, dict, dict]] = {
    "gpu": ("bench_gpu", {}, {"pli_batch": 8, "cam_batch": 8, "lincir_batch": 64, "reps": 2}),
}
#: target ratios from the performance issue (ours vs baseline, "times better")
TARGETS = {
    "topk": 3.0,
    "topk_memory": 2.0,
    "gallery_cache": 20.0,
    "pli_dropping": 3.0,
    "pli_dropping_step": 1.4,
    "lincir_step": 2.5,
    "cam_batch": 1.3,
    "cam_cache": 3.0,
    "framework_overhead": 0.9,
    "gpu_pli_bf16": 2.5,
    "gpu_cam_batch": 5.0,
    "gpu_lincir": 1.5,
}


def run(only: list[str] | None = None, quick: bool = False, out_dir: Path = HERE) -> dict:
    results: dict[str, dict] = {}
    for name, (module, full, small) in {**BENCHES, **GPU_BENCHES}.items():
        if only and name not in only:
            continue
        if name in GPU_BENCHES and not torch.cuda.is_available():
            for row_name, unit in importlib.import_module(f"experiments.bench.{module}").ROWS.items():
                results[row_name] = null_row(unit, True, "no CUDA GPU on this machine")
            continue
        print(f"[bench] {name} ...", flush=True)
        start = time.time()
        rows = importlib.import_module(f"experiments.bench.{module}").run(**(small if quick else full))
        for key, value in rows.items():
            value["seconds"] = round(time.time() - start, 1)
            results[key] = value
            print(
                f"[bench]   {key}: ours {value['ours']:.4g} vs baseline {value['baseline']:.4g} {value['unit']} "
                + (
                    f"-> {value['ratio']:.2f}x"
                    if value["ratio"] is not None
                    else "-> no ratio (nothing measured)"
                ),
                flush=True,
            )
    info = machine()
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "RESULTS.md", render(results, info, quick))
    return results


def render(results: dict, info: dict, quick: bool) -> str:
    lines = [
        "# zscir performance: each hot path vs its baseline",
        "",
        f"Measured {datetime.date.today().isoformat()} on {info['cpu']} ({info['cores']} cores, torch threads "
        f"{info['torch_threads']}), torch {info['torch']}, GPU: {info['gpu'] or 'none'}"
        + (" — QUICK sizes (smoke test), not representative" if quick else "")
        + ".",
        "Ours and the baseline run interleaved in one process; each number is the median of 5 repetitions after a "
        "warm-up. `ratio` = how many times better ours is.",
        "",
        "| name | ours | baseline | unit | ratio | target | met | sizes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        target = TARGETS.get(name)
        if r["ours"] is None:
            lines.append(f"| {name} | – | – | {r['unit']} | – | ≥ {target} | – | {r.get('note', '')} |")
            continue
        if r["ratio"] is None:
            ratio, met = "–", "–"
        else:
            ratio, met = f"{r['ratio']:.2f}", "yes" if target is None or r["ratio"] >= target else "**no**"
        lines.append(
            f"| {name} | {r['ours']:.4g} | {r['baseline']:.4g} | {r['unit']} | {ratio} | "
            f"≥ {target} | {met} | {r.get('size', '')} |"
        )
    gpu_notes = HERE / "GPU_RESULTS.md"
    if gpu_notes.is_file():
        lines += ["", gpu_notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="bench names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    results = run(args.only, args.quick, args.out)
    print(json.dumps({k: round(v["ratio"], 2) if v["ratio"] else None for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
