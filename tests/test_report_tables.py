"""zscir-report's tables people read: the headline metrics per benchmark (others on request), a LaTeX
table beside markdown and CSV, the GeneCIS average, and the experiments' published numbers as rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from zscir.cli.config import validate_config
from zscir.cli.report import main as report_main
from zscir.cli.report import report

CIRR = {"recall@1": 30.0, "recall@5": 60.0, "recall@10": 70.0, "recall@50": 90.0}
CIRR |= {"recall_subset@1": 60.0, "recall_subset@2": 80.0, "recall_subset@3": 90.0}
CIRCO = {f"{m}@{k}": 10.0 + k / 10 for m in ("map", "recall") for k in (5, 10, 25, 50)}
FIQ = {f"{c}/recall@{k}": float(k) for c in ("dress", "shirt", "toptee") for k in (10, 50)}
FIQ |= {"recall@10": 10.0, "recall@50": 50.0}


def write_run(path: Path, cfg, seed: int, metrics: dict[str, float], benchmarks: list[str]) -> None:
    path.mkdir(parents=True)
    with open_dict(cfg):
        cfg.seed = seed
    (path / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = {"label": cfg.label or cfg.method.kind, "backbone": cfg.backbone.name, "seed": seed}
    (path / "run_info.json").write_text(json.dumps({**info, "benchmarks": benchmarks}))
    (path / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def lincir_runs(compose, tmp_path) -> Path:
    """Two seeds of experiment=lincir_clip_bigg14 on CIRR + CIRCO (+ FashionIQ, all categories)."""
    cfg = compose("train", ["experiment=lincir_clip_bigg14", "eval_benchmarks=[cirr,circo,fashioniq]"])
    validate_config(cfg, "train")  # the experiment's paper: block is a valid key
    for seed, shift in ((0, 0.0), (1, 2.0)):
        metrics = {f"cirr/{k}": v + shift for k, v in CIRR.items()}
        metrics |= {f"circo/{k}": v + shift for k, v in CIRCO.items()}
        metrics |= {f"fashioniq/{k}": v + shift for k, v in FIQ.items()}
        write_run(
            tmp_path / "sweep" / f"{seed}_lincir", cfg.copy(), seed, metrics, ["cirr", "circo", "fashioniq"]
        )
    return tmp_path / "sweep"


def header(md: Path) -> list[str]:
    line = next(x for x in md.read_text().splitlines() if x.startswith("| method"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_tables_show_the_headline_metrics_and_the_csv_all(lincir_runs):
    paths = report([lincir_runs], lincir_runs)
    assert header(paths["markdown"]) == [
        "method",
        "seeds",
        *(f"cirr/{m}" for m in ("recall@1", "recall@5", "recall@10", "recall@50", "recall_subset@1")),
        *(f"circo/map@{k}" for k in (5, 10, 25, 50)),
        "fashioniq/recall@10",
        "fashioniq/recall@50",
    ]
    (row,) = csv.DictReader(paths["csv"].read_text().splitlines())
    assert float(row["cirr/recall_subset@2"]) == pytest.approx(81.0)  # the CSV keeps every metric
    assert float(row["fashioniq/dress/recall@10"]) == pytest.approx(11.0)
    latex = paths["latex"].read_text()
    assert "\\begin{tabular}{l|ccccc|cccc|cc}" in latex
    assert "\\multicolumn{5}{c}{cirr}" in latex
    assert "R$_s$@1" in latex
    assert "mAP@10" in latex
    assert "31.00 $\\pm$ 1.41" in latex  # cirr R@1: mean of 30 and 32, sample std sqrt(2)


def test_metrics_selects_other_columns(lincir_runs):
    assert report_main([str(lincir_runs), "--metrics", "recall_subset@*,circo/recall@10"]) == 0
    assert header(lincir_runs / "results.md") == [
        "method",
        "seeds",
        "cirr/recall_subset@1",
        "cirr/recall_subset@2",
        "cirr/recall_subset@3",
        "circo/recall@10",
    ]
    assert report_main([str(lincir_runs), "--metrics", "nothing@1", "--overwrite"]) == 2


def test_paper_rows_stand_beside_the_measured_ones(lincir_runs):
    paths = report([lincir_runs], lincir_runs, paper=True)
    lines = paths["markdown"].read_text().splitlines()
    (paper,) = [x for x in lines if x.startswith("| lincir_clip_bigg14 (paper)")]
    cells = [c.strip() for c in paper.strip("|").split("|")]
    columns = header(paths["markdown"])
    assert cells[columns.index("seeds")] == "paper"
    assert cells[columns.index("cirr/recall@1")] == "35.25"
    assert cells[columns.index("cirr/recall_subset@1")] == "63.35"
    assert cells[columns.index("circo/map@10")] == "21.01"
    assert cells[columns.index("cirr/recall@5")] == "–"  # not published
    assert "genecis_avg/recall@1" not in columns  # GeneCIS was not measured here
    assert "\\textit{35.25}" in paths["latex"].read_text()
    assert "Published numbers: lincir_clip_bigg14 (paper): Gu et al." in paths["markdown"].read_text()


def test_genecis_tasks_are_averaged(compose, tmp_path):
    cfg = compose("eval", ["method=sum", "backbone=tiny"])
    with open_dict(cfg):
        for task in ("focus_object", "change_object"):
            cfg.benchmarks[task] = {
                "kind": "genecis",
                "name": task,
                "root": "/x",
                "split": "val",
                "task": task,
            }
    write_run(
        tmp_path / "r",
        cfg,
        0,
        {"focus_object/recall@1": 10.0, "focus_object/recall@2": 20.0, "change_object/recall@1": 14.0},
        ["focus_object", "change_object"],
    )
    paths = report([tmp_path / "r"], tmp_path / "r")
    assert header(paths["markdown"]) == [
        "method",
        "focus_object/recall@1",
        "change_object/recall@1",
        "genecis_avg/recall@1",
    ]
    assert "| sum | 10.00 | 14.00 | 12.00 |" in paths["markdown"].read_text()


def test_every_paper_block_names_benchmarks_and_metrics_zscir_computes():
    from zscir.benchmarks import benchmark_class
    from zscir.cli.config import CONF_DIR

    blocks = {}
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        paper = OmegaConf.load(path).get("paper")
        if paper is not None:
            blocks[path.stem] = paper
    assert {
        "pli_clip_b32_imagenet",
        "pli_clip_l14_imagenet",
        "pli_blip_imagenet",
        "lincir_clip_bigg14",
    } <= set(blocks)
    for name, paper in blocks.items():
        assert paper.source, name
        assert paper.protocol in ("official", "pli"), name
        for key, value in paper.metrics.items():
            bench, metric = key.split("/", 1)
            assert 0 < value < 100, (name, key)
            assert metric.startswith("pli/") == (paper.protocol == "pli"), (name, key)
            if bench == "genecis_avg":
                assert metric == "recall@1"
                continue
            kind = OmegaConf.load(CONF_DIR / "benchmark" / f"{bench}.yaml").kind
            base = metric.removeprefix("pli/")
            names = benchmark_class(kind).metric_names
            assert base in names or (kind == "fashioniq" and base in ("recall@10", "recall@50")), (name, key)
