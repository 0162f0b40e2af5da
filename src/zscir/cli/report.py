"""``zscir-report DIR...``: one side-by-side table (markdown + CSV) and bar charts from many runs.

Collects every ``metrics.json`` under the given run or sweep directories (with the ``run_info.json``
written beside it), groups runs by (label, backbone), and reports mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

from zscir.utils.io import atomic_write_bytes, atomic_write_text


def collect_runs(dirs: list[str | Path]) -> list[dict]:
    """Every run (``metrics.json`` + ``run_info.json``) found under ``dirs``, metrics keyed ``<benchmark>/<metric>``."""
    runs = []
    for d in dirs:
        for metrics_file in sorted(Path(d).rglob("metrics.json")):
            info_file = metrics_file.with_name("run_info.json")
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
            metrics = json.loads(metrics_file.read_text())
            benchmarks = info.get("benchmarks") or []
            if metrics and all("/" not in k for k in metrics) and len(benchmarks) == 1:
                metrics = {f"{benchmarks[0]}/{k}": v for k, v in metrics.items()}
            runs.append(
                {
                    "dir": str(metrics_file.parent),
                    "label": info.get("label") or info.get("method") or metrics_file.parent.name,
                    "backbone": info.get("backbone", "?"),
                    "seed": info.get("seed"),
                    "metrics": metrics,
                }
            )
    return runs


def summarize(runs: list[dict]) -> tuple[list[str], list[dict]]:
    """(metric columns, rows) with ``mean``/``std``/``n`` per (label, backbone), in first-seen order."""
    columns: list[str] = []
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in runs:
        groups[(run["label"], run["backbone"])].append(run)
        columns += [k for k in run["metrics"] if k not in columns]
    rows = []
    for (label, backbone), members in groups.items():
        row = {"method": label, "backbone": backbone, "n": len(members), "mean": {}, "std": {}}
        for col in columns:
            values = [m["metrics"][col] for m in members if col in m["metrics"]]
            if values:
                mean = sum(values) / len(values)
                row["mean"][col] = mean
                row["std"][col] = (
                    math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                    if len(values) > 1
                    else 0.0
                )
        rows.append(row)
    return columns, rows


def render_tables(columns: list[str], rows: list[dict]) -> tuple[str, str]:
    """(markdown, csv). A backbone column appears when runs use several backbones, std columns when
    any row averages several seeds."""
    several_backbones = len({r["backbone"] for r in rows}) > 1
    with_std = any(r["n"] > 1 for r in rows)
    head = ["method"] + (["backbone"] if several_backbones else []) + (["seeds"] if with_std else [])
    md = ["| " + " | ".join(head + columns) + " |", "|" + "---|" * (len(head) + len(columns))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(head + [c for col in columns for c in ([col, f"{col} std"] if with_std else [col])])
    for r in rows:
        ident = (
            [r["method"]]
            + ([r["backbone"]] if several_backbones else [])
            + ([str(r["n"])] if with_std else [])
        )
        cells = []
        for col in columns:
            if col not in r["mean"]:
                cells.append("–")
            elif with_std:
                cells.append(f"{r['mean'][col]:.2f} ± {r['std'][col]:.2f}")
            else:
                cells.append(f"{r['mean'][col]:.2f}")
        md.append("| " + " | ".join(ident + cells) + " |")
        values = []
        for col in columns:
            mean, std = r["mean"].get(col), r["std"].get(col)
            values += [_fmt(mean)] + ([_fmt(std)] if with_std else [])
        writer.writerow(ident + values)
    return "\n".join(md) + "\n", out.getvalue()


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def plot_bars(columns: list[str], rows: list[dict], path: Path, title: str = "") -> Path:
    """One panel per benchmark; grouped bars: one group per metric, one bar per row (± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(dict.fromkeys(c.split("/")[0] for c in columns))
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(max(6, 4.5 * len(benchmarks)), 4.2), squeeze=False)
    width = 0.8 / max(1, len(rows))
    for ax, bench in zip(axes[0], benchmarks):
        cols = [c for c in columns if c.split("/")[0] == bench]
        for i, r in enumerate(rows):
            xs = [j + i * width for j in range(len(cols))]
            name = r["method"] + (f" [{r['backbone']}]" if len({x["backbone"] for x in rows}) > 1 else "")
            ax.bar(
                xs,
                [r["mean"].get(c, 0.0) for c in cols],
                width,
                yerr=[r["std"].get(c, 0.0) for c in cols],
                label=name,
                capsize=2,
            )
        ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(cols))])
        ax.set_xticklabels([c.split("/", 1)[1] for c in cols], rotation=45, ha="right", fontsize=8)
        ax.set_title(bench)
        ax.set_ylabel("%")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def report(dirs: list[str | Path], out_dir: str | Path, title: str = "zscir results") -> dict[str, Path]:
    """Write ``results.md``, ``results.csv`` and ``results.png`` into ``out_dir``; returns their paths."""
    runs = collect_runs(dirs)
    if not runs:
        raise FileNotFoundError(f"no metrics.json found under {[str(d) for d in dirs]}")
    columns, rows = summarize(runs)
    md, table_csv = render_tables(columns, rows)
    out = Path(out_dir)
    paths = {
        "markdown": atomic_write_text(out / "results.md", f"# {title}\n\n{md}"),
        "csv": atomic_write_text(out / "results.csv", table_csv),
        "plot": plot_bars(columns, rows, out / "results.png", title),
    }
    print(md, flush=True)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="run or sweep directories to collect metrics.json from")
    parser.add_argument("--out", default=None, help="output folder (default: the first directory)")
    parser.add_argument("--title", default="zscir results")
    args = parser.parse_args(argv)
    paths = report(args.dirs, args.out or args.dirs[0], args.title)
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
