"""``zscir-score``: re-score a saved ``features.npz`` with no model.

    zscir-score --benchmark cirr --root /data/CIRR --split val --features run/features.npz --out scores/
    zscir-score --benchmark cirr --root /data/CIRR --split test1 --features run/features.npz --out sub/
    zscir-score --benchmark fashioniq --root /data/FashionIQ --split val --category dress --features f.npz --out s/
    zscir-score --benchmark genecis --root /data/GeneCIS --split val --task focus_object --features f.npz --out s/
    zscir-score --benchmark circo --root /data/CIRCO --split val --protocol pli --features f.npz --out s/

Labelled splits write ``OUT/metrics.json`` (flat, percent); server splits (CIRR ``test1``, CIRCO ``test``)
write the submission files (``cirr_test1_recall.json``, ``cirr_test1_recall_subset.json``,
``circo_test.json``). Files already in ``OUT`` are never replaced without ``--overwrite``. Features are matched to the benchmark by id, so their order does not matter, and
are L2-normalised here. Without ``--category``, FashionIQ picks the category whose gallery the file holds.

``--protocol pli`` scores under the PLI paper's evaluation protocol (metric keys ``pli/...``, server files
``*_pli*.json``). Where that protocol changes the queries themselves (CIRR captions, FashionIQ query set,
GeneCIS composition), the features must have been computed under it (``zscir-eval benchmark.protocol=pli``,
which records it in features.npz); CIRCO features score under either protocol.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zscir.benchmarks import BENCHMARKS, build_benchmark
from zscir.benchmarks.base import PROTOCOLS
from zscir.utils.io import atomic_write_json


def load_features(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"features file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as err:  # object arrays need pickle, which a results file should never require
        raise ValueError(
            f"{path}: cannot read ({err}); store ids as string arrays, not Python objects"
        ) from err


def score(
    benchmark: str,
    root: str | Path,
    split: str,
    features: str | Path,
    out: str | Path,
    category: str | None = None,
    task: str | None = None,
    submission: bool = False,
    overwrite: bool = False,
    protocol: str = "official",
) -> dict[str, object]:
    """Score (labelled splits) and/or write submission files (server splits, or ``submission=True``).

    Returns ``{"metrics": {...}, "files": [paths written]}``.

    Raises:
        FileExistsError: a file this would write exists in ``out`` and ``overwrite`` is not set
            (nothing is written then).
    """
    arrays = load_features(features)
    options: dict[str, object] = {} if protocol == "official" else {"protocol": protocol}
    if category is not None and benchmark != "fashioniq":
        raise ValueError("--category is a FashionIQ option")
    if task is not None and benchmark != "genecis":
        raise ValueError("--task is a GeneCIS option")
    if benchmark == "fashioniq":
        from zscir.benchmarks.fashioniq import FashionIQ

        options["category"] = category or FashionIQ.infer_category(
            root, split, arrays.get("gallery_ids", []), protocol
        )
    if benchmark == "genecis":
        options["task"] = task
    bench = build_benchmark(benchmark, str(root), split, **options)
    out = Path(out).expanduser()
    metrics: dict[str, float] = {}
    outputs: dict[str, tuple[object, int | None]] = {}  # file name -> (JSON object, indent)
    if bench.labelled:
        metrics = {k: float(v) for k, v in bench.score_arrays(arrays).items()}
        outputs["metrics.json"] = (metrics, 2)
    if split in bench.submission_splits or submission:
        outputs.update({name: (obj, None) for name, obj in bench.submission_arrays(arrays).items()})
    if not outputs:
        raise ValueError(f"{bench.name} {split} has no labels and no evaluation server: nothing to score")
    existing = [name for name in outputs if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {', '.join(existing)}; zscir-score does not replace results: choose "
            "another --out, or pass --overwrite to replace them"
        )
    files = [atomic_write_json(out / name, obj, indent=indent) for name, (obj, indent) in outputs.items()]
    return {"metrics": metrics, "files": files}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zscir-score", description="Re-score a saved features.npz against a benchmark, with no model."
    )
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument("--root", required=True, help="the benchmark's root folder (official layout)")
    parser.add_argument("--split", required=True, help="val | test1 (CIRR) | test (CIRCO)")
    parser.add_argument("--features", required=True, help="features.npz written by zscir-eval (or alike)")
    parser.add_argument("--out", required=True, help="folder for metrics.json / submission files")
    parser.add_argument("--category", help="FashionIQ: dress | shirt | toptee | all")
    parser.add_argument(
        "--task", help="GeneCIS: focus_attribute | change_attribute | focus_object | change_object"
    )
    parser.add_argument(
        "--submission", action="store_true", help="also write submission files for a labelled split (val)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace metrics.json / submission files already in --out"
    )
    parser.add_argument(
        "--protocol",
        default="official",
        choices=PROTOCOLS,
        help="official (default; the benchmarks' own evaluators) | pli (the PLI paper's evaluation scripts)",
    )
    args = parser.parse_args(argv)
    try:
        result = score(
            args.benchmark,
            args.root,
            args.split,
            args.features,
            args.out,
            args.category,
            args.task,
            args.submission,
            args.overwrite,
            args.protocol,
        )
    except (OSError, ValueError, KeyError) as err:
        print(f"zscir-score: error: {err}", file=sys.stderr)
        return 2
    metrics = result["metrics"]
    width = max((len(k) for k in metrics), default=0)
    for k, v in metrics.items():
        print(f"  {k:<{width}}  {v:7.2f}")
    for path in result["files"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
