"""``zscir-report DIR...``: one side-by-side table (markdown, LaTeX, CSV) and bar charts from many runs.

    zscir-report outputs/train/multirun/<sweep> --out outputs/report
    zscir-report <dirs> --out <dir> --paper                 # + the experiments' published numbers
    zscir-report <dirs> --out <dir> --metrics 'recall@*'    # other metrics than the headline set (or: all)

Collects every ``metrics.json`` under the given run or sweep directories (with the ``run_info.json`` and
``resolved_config.yaml`` written beside it), groups runs by (label, backbone, swept settings), and reports
mean ± std over seeds. A swept setting is a config key whose value differs between runs of one method and
backbone (e.g. ``method.mask_ratio``); it gets a column, and when it is the only one, a metric-vs-setting
plot.

The tables and the chart show the headline metrics of each benchmark (:data:`HEADLINE`: CIRR R@1/5/10/50
and R_s@1, CIRCO mAP@5/10/25/50, FashionIQ average R@10/R@50, GeneCIS R@1 and, over several GeneCIS tasks,
their average), every metric of other benchmarks, or what ``--metrics`` selects; ``results.csv`` keeps
every metric. ``--paper`` adds a reference row per experiment whose config has a ``paper:`` block (the
published numbers, conf/experiment/), beside the measured rows.

The report goes to ``--out`` (default: the directory, when only one is given); a report already there
is not replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from zscir.benchmarks.base import PROTOCOLS
from zscir.utils.io import atomic_write_bytes, atomic_write_text
from zscir.utils.run_config import RUN_CONFIG, load_run_config

#: the metrics a table shows by default, per benchmark kind (any other kind: all its metrics); under a
#: non-official protocol the same names behind its prefix (``pli/recall@1``)
HEADLINE: dict[str, tuple[str, ...]] = {
    "cirr": ("recall@1", "recall@5", "recall@10", "recall@50", "recall_subset@1"),
    "circo": ("map@5", "map@10", "map@25", "map@50"),
    "fashioniq": ("recall@10", "recall@50"),  # with category=all: the mean of the three categories
    "genecis": ("recall@1",),
    "genecis_avg": ("recall@1",),
}
#: the column holding the mean recall@1 of a row's GeneCIS benchmarks, when it has several (the four tasks)
GENECIS_AVG = "genecis_avg/recall@1"

#: config keys that never make two runs different settings (where things live, how they are logged,
#: per-run identity and speed knobs); ``seed`` is averaged over, not a setting
IGNORED_KEYS = (
    "seed",
    "label",
    "tags",
    "task_name",
    "experiment_name",
    "resume",
    "run_dir",
    "ckpt_path",
    "optimized_metric",
    "paper.",
    "visualize",
    "visualize_k",
    "save_features",
    "paths.",
    "hydra.",
    "logger.",
    "synth.",
    "checkpoint.",
    "benchmark.",
    "eval_benchmarks",
    "eval.",
    "data.num_workers",
    "backbone.cache_dir",
    "method.export_backbone",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
)


def _natural(path: Path) -> list:
    """Sort key putting sweep job ``2_…`` before ``10_…``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


def _load_config(run_dir: Path) -> dict[str, object]:
    """The run's resolved config with today's keys (:func:`~zscir.utils.run_config.load_run_config`),
    flattened to dotted keys (empty when it has none)."""
    if not (run_dir / RUN_CONFIG).is_file():
        return {}
    from omegaconf import OmegaConf

    return _flatten(OmegaConf.to_container(load_run_config(run_dir), resolve=False))


def collect_runs(dirs: list[str | Path]) -> list[dict]:
    """Every run (``metrics.json`` + ``run_info.json`` + ``resolved_config.yaml``) under ``dirs``,
    metrics keyed ``<benchmark>/<metric>``, in directory order (sweep jobs by job number)."""
    runs = []
    for d in dirs:
        for metrics_file in sorted(Path(d).rglob("metrics.json"), key=_natural):
            info_file = metrics_file.with_name("run_info.json")
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
            metrics = json.loads(metrics_file.read_text())
            benchmarks = info.get("benchmarks") or []
            if len(benchmarks) == 1:  # single-benchmark zscir-eval runs write plain metric names
                prefix = f"{benchmarks[0]}/"
                metrics = {k if k.startswith(prefix) else prefix + k: v for k, v in metrics.items()}
            runs.append(
                {
                    "dir": str(metrics_file.parent),
                    "label": info.get("label") or info.get("method") or metrics_file.parent.name,
                    "backbone": info.get("backbone", "?"),
                    "seed": info.get("seed"),
                    "metrics": metrics,
                    "config": _load_config(metrics_file.parent),
                }
            )
    return runs


def benchmark_kinds(runs: list[dict]) -> dict[str, str]:
    """Benchmark name -> kind, from the runs' configs (``benchmarks.<name>.kind``, ``benchmark.kind``);
    names without a config stand for their kind (``cirr``)."""
    kinds: dict[str, str] = {}
    for run in runs:
        config = run["config"]
        for key, value in config.items():
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "benchmarks" and parts[2] == "kind":
                kinds.setdefault(parts[1], str(value))
        if config.get("benchmark.kind"):
            kinds.setdefault(
                str(config.get("benchmark.name") or config["benchmark.kind"]), str(config["benchmark.kind"])
            )
    return kinds


def select_columns(columns: list[str], kinds: dict[str, str], metrics: list[str] | None = None) -> list[str]:
    """The columns a table shows: ``metrics`` (``fnmatch`` patterns matched against ``<benchmark>/<metric>``
    or the metric alone; ``["all"]``: every column), else each benchmark's :data:`HEADLINE` set."""
    if metrics == ["all"]:
        return list(columns)
    if metrics:
        return [
            c
            for c in columns
            if any(fnmatch.fnmatch(c, p) or fnmatch.fnmatch(c.split("/", 1)[1], p) for p in metrics)
        ]
    chosen = []
    for column in columns:
        bench, metric = column.split("/", 1)
        head = HEADLINE.get(kinds.get(bench, bench))
        protocol, _, rest = metric.partition("/")
        base = rest if protocol in PROTOCOLS and rest else metric
        if head is None or base in head:
            chosen.append(column)
    return chosen


def paper_rows(runs: list[dict], params: list[str]) -> list[dict]:
    """One reference row per experiment whose runs carry a ``paper:`` block (``paper.metrics``: published
    numbers keyed ``<benchmark>/<metric>``; ``paper.source``: where they are from)."""
    rows, seen = [], set()
    for run in runs:
        config = run["config"]
        experiment = config.get("experiment_name")
        published = {
            k.removeprefix("paper.metrics."): float(v)
            for k, v in config.items()
            if k.startswith("paper.metrics.")
        }
        if not published or experiment in seen:
            continue
        seen.add(experiment)
        rows.append(
            {
                "method": f"{run['label']} (paper)",
                "backbone": run["backbone"],
                "params": dict.fromkeys(params),
                "n": 0,
                "mean": published,
                "std": {},
                "paper": str(config.get("paper.source") or ""),
            }
        )
    return rows


def _ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS)


def sweep_parameters(runs: list[dict]) -> list[str]:
    """Config keys whose value differs between runs of the same (label, backbone): the swept settings
    (e.g. ``method.mask_ratio``). Keys that only differ between methods or backbones, or that some of
    the runs lack, do not count."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in runs:
        groups[(run["label"], run["backbone"])].append(run)
    varying: list[str] = []
    for members in groups.values():
        keys = sorted({k for m in members for k in m["config"]})
        for key in keys:
            if _ignored(key) or key in varying:
                continue
            if any(key not in m["config"] for m in members):
                continue  # e.g. data.* exists in training runs only, not in their re-evaluations
            if len({json.dumps(m["config"][key], sort_keys=True) for m in members}) > 1:
                varying.append(key)
    return varying


def summarize(
    runs: list[dict], params: list[str] | None = None, kinds: dict[str, str] | None = None
) -> tuple[list[str], list[dict]]:
    """(metric columns, rows) with ``mean``/``std`` over seeds and ``n`` seeds per (label, backbone,
    swept values), in first-seen order. Runs of one row with the same seed are merged (a training run
    and its re-evaluations). ``params``: the swept keys (default: :func:`sweep_parameters`); ``kinds``:
    benchmark kinds (default: :func:`benchmark_kinds`), for the GeneCIS average (:data:`GENECIS_AVG`)."""
    params = sweep_parameters(runs) if params is None else params
    kinds = benchmark_kinds(runs) if kinds is None else kinds
    columns: list[str] = []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        values = tuple(run["config"].get(p) for p in params)
        groups[(run["label"], run["backbone"], values)].append(run)
        columns += [k for k in run["metrics"] if k not in columns]
    rows = []
    for (label, backbone, values), members in groups.items():
        # one sample per seed: a training run and its re-evaluation on another benchmark are one run
        # (when both report a metric, the later directory wins)
        samples: dict[object, dict] = {}
        for m in members:
            samples.setdefault(m["dir"] if m["seed"] is None else m["seed"], {}).update(m["metrics"])
        for sample in samples.values():
            tasks = [
                v
                for k, v in sample.items()
                if k.endswith("/recall@1") and kinds.get(k.split("/")[0]) == "genecis"
            ]
            if len(tasks) > 1:
                sample[GENECIS_AVG] = sum(tasks) / len(tasks)
                columns += [] if GENECIS_AVG in columns else [GENECIS_AVG]
        row = {
            "method": label,
            "backbone": backbone,
            "params": dict(zip(params, values)),
            "n": len(samples),
            "mean": {},
            "std": {},
        }
        for col in columns:
            vals = [m[col] for m in samples.values() if col in m]
            if vals:
                mean = sum(vals) / len(vals)
                row["mean"][col] = mean
                row["std"][col] = (
                    math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
                )
        rows.append(row)
    return columns, rows


def render_tables(columns: list[str], rows: list[dict]) -> tuple[str, str]:
    """(markdown, csv). A backbone column appears when runs use several backbones, one column per swept
    setting when one varies, and std columns when any row averages several seeds."""
    several_backbones = len({r["backbone"] for r in rows}) > 1
    with_std = any(r["n"] > 1 for r in rows)
    params = list(rows[0].get("params", {})) if rows else []
    head = ["method"] + (["backbone"] if several_backbones else []) + params + (["seeds"] if with_std else [])
    md = ["| " + " | ".join(head + columns) + " |", "|" + "---|" * (len(head) + len(columns))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(head + [c for col in columns for c in ([col, f"{col} std"] if with_std else [col])])
    for r in rows:
        ident = (
            [r["method"]]
            + ([r["backbone"]] if several_backbones else [])
            + [_param(r["params"][p]) for p in params]
            + ([str(r["n"]) if r.get("paper") is None else "paper"] if with_std else [])
        )
        cells = []
        for col in columns:
            if col not in r["mean"]:
                cells.append("–")
            elif with_std and r.get("paper") is None:
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


#: how metric names read in a LaTeX header
_LATEX_METRIC = (("recall\\_subset@", "R$_s$@"), ("recall@", "R@"), ("map@", "mAP@"))


def _latex_escape(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", text)


def render_latex(columns: list[str], rows: list[dict], caption: str = "") -> str:
    """A ``booktabs`` table of the markdown table's rows: one column group per benchmark, mean (± std over
    seeds when rows average several), the best mean per column in bold; reference rows (published numbers)
    in italics after a rule."""
    several_backbones = len({r["backbone"] for r in rows}) > 1
    with_std = any(r["n"] > 1 for r in rows)
    params = list(rows[0].get("params", {})) if rows else []
    ident = ["Method"] + (["Backbone"] if several_backbones else []) + [_latex_escape(p) for p in params]
    benchmarks = list(dict.fromkeys(c.split("/", 1)[0] for c in columns))
    groups = [[c for c in columns if c.split("/", 1)[0] == b] for b in benchmarks]
    best = {
        c: max((r["mean"][c] for r in rows if c in r["mean"] and r.get("paper") is None), default=None)
        for c in columns
    }
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        "\\begin{tabular}{" + "l" * len(ident) + "".join("|" + "c" * len(g) for g in groups) + "}",
        "\\toprule",
        " & " * (len(ident) - 1)
        + "".join(
            f" & \\multicolumn{{{len(g)}}}{{c}}{{{_latex_escape(b)}}}" for b, g in zip(benchmarks, groups)
        )
        + " \\\\",
    ]
    names = []
    for c in columns:
        name = _latex_escape(c.split("/", 1)[1])
        for old, new in _LATEX_METRIC:
            name = name.replace(old, new)
        names.append(name)
    lines += [" & ".join(ident + names) + " \\\\", "\\midrule"]
    measured = [r for r in rows if r.get("paper") is None]
    reference = [r for r in rows if r.get("paper") is not None]
    for block in (measured, reference):
        if block is reference and reference:
            lines.append("\\midrule")
        for r in block:
            cells = [_latex_escape(r["method"])] + (
                [_latex_escape(r["backbone"])] if several_backbones else []
            )
            cells += [_latex_escape(_param(r["params"][p])) for p in params]
            for c in columns:
                if c not in r["mean"]:
                    cells.append("--")
                    continue
                text = f"{r['mean'][c]:.2f}"
                if with_std and r.get("paper") is None:
                    text += f" $\\pm$ {r['std'][c]:.2f}"
                if r.get("paper") is not None:
                    text = f"\\textit{{{text}}}"
                elif best[c] is not None and r["mean"][c] == best[c] and len(measured) > 1:
                    text = f"\\textbf{{{text}}}"
                cells.append(text)
            lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if caption:
        lines.append(f"\\caption{{{_latex_escape(caption)}}}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def _param(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)  # Optuna draws 0.46388695571989536


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
                hatch="//" if r.get("paper") is not None else None,  # published numbers
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


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep(columns: list[str], rows: list[dict], param: str, path: Path, title: str = "") -> Path:
    """Metric vs one swept setting: one panel per benchmark, one line per (method, backbone) and
    metric, mean ± std over seeds; numeric settings on a numeric axis, others in first-seen order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(dict.fromkeys(r["params"][param] for r in rows))
    numeric = _numeric(values)
    if numeric:
        values = sorted(values)
    benchmarks = list(dict.fromkeys(c.split("/")[0] for c in columns))
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(max(6, 4.8 * len(benchmarks)), 4.2), squeeze=False)
    several = len({(r["method"], r["backbone"]) for r in rows}) > 1
    for ax, bench in zip(axes[0], benchmarks):
        for col in [c for c in columns if c.split("/")[0] == bench]:
            for group in dict.fromkeys((r["method"], r["backbone"]) for r in rows):
                points = sorted(
                    (
                        (values.index(r["params"][param]), r["mean"][col], r["std"].get(col, 0.0))
                        for r in rows
                        if (r["method"], r["backbone"]) == group and col in r["mean"]
                    ),
                )
                if not points:
                    continue
                xs = [values[i] if numeric else i for i, _, _ in points]
                name = col.split("/", 1)[1] + (f" ({group[0]}, {group[1]})" if several else "")
                ax.errorbar(
                    xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=2, label=name
                )
        if not numeric:
            ax.set_xticks(range(len(values)))
            ax.set_xticklabels([str(v) for v in values], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(param)
        ax.set_ylabel("%")
        ax.set_title(bench)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: metric vs {param}" if title else f"metric vs {param}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


#: what a report consists of (``results_<setting>.png``: the metric-vs-setting plot)
REPORT_FILES = ("results.md", "results.csv", "results.tex", "results.png", "results_*.png")


def report(
    dirs: list[str | Path],
    out_dir: str | Path,
    title: str = "zscir results",
    overwrite: bool = False,
    metrics: list[str] | None = None,
    paper: bool = False,
) -> dict[str, Path]:
    """Write ``results.md``, ``results.tex``, ``results.csv`` and ``results.png`` into ``out_dir`` (plus
    ``results_<setting>.png`` when exactly one setting is swept); returns their paths. The markdown and
    LaTeX tables and the charts show ``metrics`` (see :func:`select_columns`; None: the headline set), the
    CSV every metric; ``paper``: add the published numbers of the runs' experiments (:func:`paper_rows`).

    Raises:
        FileNotFoundError: no ``metrics.json`` under ``dirs``.
        FileExistsError: ``out_dir`` already holds a report and ``overwrite`` is not set. With
            ``overwrite``, the old report's files are replaced, and its ``results_*.png`` removed.
    """
    out = Path(out_dir)
    existing = sorted(p for pattern in REPORT_FILES for p in out.glob(pattern))
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a report ({', '.join(p.name for p in existing)}); zscir-report does not "
            "replace it: choose another --out, or pass --overwrite to replace it"
        )
    runs = collect_runs(dirs)
    if not runs:
        raise FileNotFoundError(f"no metrics.json found under {[str(d) for d in dirs]}")
    params = sweep_parameters(runs)
    kinds = benchmark_kinds(runs)
    columns, rows = summarize(runs, params, kinds)
    references = paper_rows(runs, params) if paper else []
    measured_benchmarks = {c.split("/", 1)[0] for c in columns}
    for ref in references:  # published numbers of benchmarks this report measures
        ref["mean"] = {k: v for k, v in ref["mean"].items() if k.split("/", 1)[0] in measured_benchmarks}
        columns += [k for k in ref["mean"] if k not in columns]
    shown = select_columns(columns, kinds, metrics)
    if not shown:
        raise ValueError(f"--metrics {metrics} selects none of the metrics: {columns}")
    md, _ = render_tables(shown, rows + references)
    _, table_csv = render_tables(columns, rows + references)
    sources = "; ".join(f"{r['method']}: {r['paper']}" for r in references if r["paper"])
    paths = {
        "markdown": atomic_write_text(
            out / "results.md",
            f"# {title}\n\n{md}" + (f"\nPublished numbers: {sources}\n" if sources else ""),
        ),
        "latex": atomic_write_text(out / "results.tex", render_latex(shown, rows + references, title)),
        "csv": atomic_write_text(out / "results.csv", table_csv),
        "plot": plot_bars(shown, rows + references, out / "results.png", title),
    }
    if len(params) == 1:
        paths["sweep_plot"] = plot_sweep(shown, rows, params[0], out / f"results_{params[0]}.png", title)
    elif params:
        print(f"several settings vary ({', '.join(params)}): no metric-vs-setting plot", flush=True)
    for stale in set(existing) - set(paths.values()):  # e.g. the plot of a setting no longer swept
        stale.unlink()
    print(md, flush=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="run or sweep directories to collect metrics.json from")
    parser.add_argument(
        "--out", default=None, help="output folder (default: the directory, when only one is given)"
    )
    parser.add_argument("--title", default="zscir results")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    parser.add_argument(
        "--metrics",
        default=None,
        help="comma-separated metrics shown in the tables and chart (patterns like 'recall@*' or "
        "'cirr/recall_subset@*'; 'all': every one); default: each benchmark's headline set",
    )
    parser.add_argument(
        "--paper", action="store_true", help="add the experiments' published numbers as reference rows"
    )
    args = parser.parse_args(argv)
    if args.out is None and len(args.dirs) > 1:
        # a report of several directories belongs to none of them (a report of the first alone would
        # later replace it, or be refused)
        parser.error(f"--out is needed with several directories ({len(args.dirs)} given)")
    try:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
        paths = report(args.dirs, args.out or args.dirs[0], args.title, args.overwrite, metrics, args.paper)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"zscir-report: error: {err}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
