"""``zscir-score`` re-scores features.npz with no model; ``zscir-eval`` on every benchmark writes
metrics.json, features.npz and server files that ``zscir-score`` reproduces; 2-process DDP equals 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark_fixtures import make_circo, make_cirr, make_fashioniq, make_genecis
from zscir.benchmarks import build_benchmark
from zscir.cli.config import compose_config
from zscir.cli.evaluate import evaluate
from zscir.cli.score import main as score_main
from zscir.cli.score import score

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The benchmarks under the names conf/benchmark/*.yaml expect below paths.data_dir."""
    root = tmp_path_factory.mktemp("data")
    make_fashioniq(root / "FashionIQ")
    make_cirr(root / "CIRR", layout="readme")
    make_circo(root / "CIRCO")
    make_genecis(root / "GeneCIS")
    return root


def save_npz(path: Path, arrays: dict, order: np.ndarray | None = None) -> Path:
    """Write arrays with queries (and gallery) rows permuted: zscir-score must re-align them by id."""
    arrays = dict(arrays)
    if order is not None:
        for key in ("query_ids", "query_feats", "candidate_ids", "candidate_feats"):
            if key in arrays:
                arrays[key] = arrays[key][order]
    if "gallery_ids" in arrays:
        back = np.arange(len(arrays["gallery_ids"]))[::-1]
        arrays["gallery_ids"], arrays["gallery_feats"] = (
            arrays["gallery_ids"][back],
            arrays["gallery_feats"][back],
        )
    np.savez(path, **arrays)
    return path


def random_features(bench, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 5 * torch.randn(len(bench.queries), 6, generator=g), 0.1 * torch.randn(
        len(bench.gallery), 6, generator=g
    )


CASES = [
    ("fashioniq", "FashionIQ", "val", ["--category", "all"], {"category": "all"}),
    ("cirr", "CIRR", "val", [], {}),
    ("circo", "CIRCO", "val", [], {}),
    ("genecis", "GeneCIS", "val", ["--task", "focus_attribute"], {"task": "focus_attribute"}),
    ("genecis", "GeneCIS", "val", ["--task", "change_object"], {"task": "change_object"}),
]


@pytest.mark.parametrize(("kind", "root", "split", "args", "options"), CASES)
def test_score_cli_reproduces_the_benchmark_score(data, tmp_path, kind, root, split, args, options):
    bench = build_benchmark(kind, data / root, split, **options)
    q, g = random_features(bench)
    order = np.random.default_rng(0).permutation(len(bench.queries))
    npz = save_npz(tmp_path / "f.npz", bench.feature_arrays(q, g), order)
    rc = score_main(
        [
            "--benchmark",
            kind,
            "--root",
            str(data / root),
            "--split",
            split,
            "--features",
            str(npz),
            "--out",
            str(tmp_path / "o"),
            *args,
        ]
    )
    assert rc == 0
    written = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert written == pytest.approx(bench.score(q, g), abs=1e-12)
    assert set(bench.metric_names) <= set(written)


def test_score_cli_writes_the_server_files(data, tmp_path):
    cirr = build_benchmark("cirr", data / "CIRR", "test1")
    q, g = random_features(cirr, 1)
    arrays = cirr.feature_arrays(q, g)
    arrays["query_ids"] = arrays["query_ids"].astype(int)  # pairids saved as integers are fine too
    npz = save_npz(tmp_path / "cirr.npz", arrays, np.arange(len(cirr.queries))[::-1])
    out = tmp_path / "cirr"
    assert (
        score_main(
            [
                "--benchmark",
                "cirr",
                "--root",
                str(data / "CIRR"),
                "--split",
                "test1",
                "--features",
                str(npz),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "cirr_test1_recall.json",
        "cirr_test1_recall_subset.json",
    ]
    for name, obj in cirr.submission(q, g).items():
        assert json.loads((out / name).read_text()) == obj
    circo = build_benchmark("circo", data / "CIRCO", "test")
    q, g = random_features(circo, 2)
    npz = save_npz(tmp_path / "circo.npz", circo.feature_arrays(q, g))
    result = score("circo", data / "CIRCO", "test", npz, tmp_path / "circo")
    assert [p.name for p in result["files"]] == ["circo_test.json"]
    assert result["metrics"] == {}
    assert (
        json.loads((tmp_path / "circo" / "circo_test.json").read_text())
        == circo.submission(q, g)["circo_test.json"]
    )


def test_score_cli_infers_the_fashioniq_category(data, tmp_path):
    bench = build_benchmark("fashioniq", data / "FashionIQ", "val", category="shirt")
    q, g = random_features(bench)
    npz = save_npz(tmp_path / "f.npz", bench.feature_arrays(q, g))
    result = score("fashioniq", data / "FashionIQ", "val", npz, tmp_path / "o")
    assert result["metrics"] == pytest.approx(bench.score(q, g))
    assert set(result["metrics"]) == {"recall@10", "recall@50"}


def test_score_accepts_an_all_categories_file_for_one_category(data, tmp_path):
    every = build_benchmark("fashioniq", data / "FashionIQ", "val", category="all")
    q, g = random_features(every)
    npz = save_npz(tmp_path / "all.npz", every.feature_arrays(q, g))
    full = score("fashioniq", data / "FashionIQ", "val", npz, tmp_path / "all")["metrics"]
    assert {"dress/recall@10", "toptee/recall@50", "recall@10"} <= set(full)
    dress = score("fashioniq", data / "FashionIQ", "val", npz, tmp_path / "dress", category="dress")[
        "metrics"
    ]
    assert dress == {"recall@10": full["dress/recall@10"], "recall@50": full["dress/recall@50"]}


def test_score_accepts_zero_padded_circo_ids(data, tmp_path):
    bench = build_benchmark("circo", data / "CIRCO", "val")
    q, g = random_features(bench, 3)
    arrays = bench.feature_arrays(q, g)
    arrays["gallery_ids"] = np.array([f"{int(x):012d}" for x in arrays["gallery_ids"]])
    npz = save_npz(tmp_path / "f.npz", arrays)
    assert score("circo", data / "CIRCO", "val", npz, tmp_path / "o")["metrics"] == pytest.approx(
        bench.score(q, g)
    )


@pytest.mark.parametrize(
    ("make", "call", "match"),
    [
        (  # a dress features file scored as shirt
            lambda d: build_benchmark("fashioniq", d / "FashionIQ", "val", category="dress"),
            lambda d, f, o: score("fashioniq", d / "FashionIQ", "val", f, o, category="shirt"),
            r"12 unknown \(e\.g\. \['B00DRESS01'",
        ),
        (  # a query left out
            lambda d: build_benchmark("cirr", d / "CIRR", "val"),
            lambda d, f, o: score("cirr", d / "CIRR", "val", f, o),
            r"1 missing \(e\.g\. \['18'\]\)",
        ),
        (
            lambda d: build_benchmark("genecis", d / "GeneCIS", "val", task="focus_object"),
            lambda d, f, o: score("genecis", d / "GeneCIS", "val", f, o, task="change_object"),
            "candidate_ids of template 0",
        ),
        (
            lambda d: build_benchmark("fashioniq", d / "FashionIQ", "test", category="dress"),
            lambda d, f, o: score("fashioniq", d / "FashionIQ", "test", f, o, category="dress"),
            "nothing to score",
        ),
    ],
)
def test_score_refuses_features_of_another_benchmark(data, tmp_path, make, call, match):
    bench = make(data)
    arrays = bench.feature_arrays(*random_features(bench))
    if bench.kind == "cirr":
        arrays = {k: (v[:-1] if k.startswith("query") else v) for k, v in arrays.items()}
    npz = save_npz(tmp_path / "f.npz", arrays)
    with pytest.raises(ValueError, match=match):
        call(data, npz, tmp_path / "o")


def test_score_cli_reports_errors_without_a_traceback(data, tmp_path, capsys):
    rc = score_main(
        [
            "--benchmark",
            "circo",
            "--root",
            str(tmp_path),
            "--split",
            "val",
            "--features",
            str(tmp_path / "none.npz"),
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 2
    assert "zscir-score: error: features file" in capsys.readouterr().err


# ---- zscir-eval -------------------------------------------------------------------------------------------
def eval_config(data: Path, run: Path, *overrides: str):
    return compose_config(
        "eval",
        [
            "method=sum",
            "backbone=tiny",
            f"paths.data_dir={data}",
            f"paths.output_dir={run.parent / 'outputs'}",
            f"paths.run_dir={run}",
            "eval.num_workers=0",
            "eval.batch_size=2",
            "trainer.enable_progress_bar=false",
            *overrides,
        ],
    )


REQUIRED = {
    "fashioniq": {"recall@10", "recall@50"},
    "cirr": {
        "recall@1",
        "recall@5",
        "recall@10",
        "recall@50",
        "recall_subset@1",
        "recall_subset@2",
        "recall_subset@3",
    },
    "circo": {f"{m}@{k}" for m in ("map", "recall") for k in (5, 10, 25, 50)},
    "genecis": {"recall@1", "recall@2", "recall@3"},
}


@pytest.mark.parametrize(
    ("overrides", "score_args"),
    [
        (["benchmark=fashioniq"], {"category": "all"}),
        (["benchmark=fashioniq", "benchmark.category=toptee"], {}),
        (["benchmark=cirr"], {}),
        (["benchmark=circo"], {}),
        (["benchmark=genecis", "benchmark.task=focus_attribute"], {"task": "focus_attribute"}),
        (["benchmark=genecis", "benchmark.task=change_object"], {"task": "change_object"}),
    ],
)
def test_eval_writes_metrics_and_features_that_score_reproduces(data, tmp_path, overrides, score_args):
    run = tmp_path / "run"
    metrics = evaluate(eval_config(data, run, *overrides))
    kind = overrides[0].split("=")[1]
    assert REQUIRED[kind] <= set(metrics)
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(metrics)
    with np.load(run / "features.npz") as f:
        keys = set(f.files)
        n_queries = f["query_feats"].shape[0]
    expected_keys = {"query_ids", "query_feats"} | (
        {"candidate_ids", "candidate_feats"} if kind == "genecis" else {"gallery_ids", "gallery_feats"}
    )
    assert keys == expected_keys
    assert n_queries % 2 == 1 or kind == "genecis"
    root = {"fashioniq": "FashionIQ", "cirr": "CIRR", "circo": "CIRCO", "genecis": "GeneCIS"}[kind]
    again = score(kind, data / root, "val", run / "features.npz", tmp_path / "score", **score_args)
    assert again["metrics"] == pytest.approx(metrics, abs=1e-9)


def test_eval_test_splits_write_server_files_and_cache_per_split(data, tmp_path):
    for kind, split in (("cirr", "test1"), ("circo", "test"), ("circo", "val")):
        run = tmp_path / f"{kind}_{split}"
        evaluate(eval_config(data, run, f"benchmark={kind}", f"benchmark.split={split}"))
        root = data / ("CIRR" if kind == "cirr" else "CIRCO")
        if split != "val":
            written = sorted(p.name for p in run.glob(f"{kind}_*.json"))
            assert written == (
                ["cirr_test1_recall.json", "cirr_test1_recall_subset.json"]
                if kind == "cirr"
                else ["circo_test.json"]
            )
            rescored = score(kind, root, split, run / "features.npz", tmp_path / f"s_{kind}")
            for path in rescored["files"]:
                assert json.loads(path.read_text()) == json.loads((run / path.name).read_text())
    # CIRCO val and test share every gallery image, yet the cache keeps one entry per split
    assert len(list((tmp_path / "outputs" / "cache" / "gallery").glob("*.pt"))) == 3


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_evaluation_equals_one_process(data, tmp_path):
    """Real DDP (gloo, 2 processes) on three benchmarks with odd query and gallery counts."""
    common = [
        "method=sum",
        "backbone=tiny",
        f"paths.data_dir={data}",
        "eval.num_workers=0",
        "eval.batch_size=2",
        "eval.cache_gallery=false",
        "trainer.enable_progress_bar=false",
        "eval_benchmarks=[fashioniq,cirr,circo]",
    ]
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "ZSCIR_RUN_ID": "ddptest"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zscir.cli.evaluate",
            *common,
            "trainer=ddp_cpu",
            f"paths.run_dir={run}",
            f"paths.output_dir={tmp_path / 'o'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "world_size: 2" in proc.stderr + proc.stdout
        or "distributed_backend=gloo" in proc.stderr + proc.stdout
    )
    single = evaluate(
        eval_config(
            data, tmp_path / "single", "eval_benchmarks=[fashioniq,cirr,circo]", "eval.cache_gallery=false"
        )
    )
    ddp = json.loads((run / "metrics.json").read_text())
    assert set(ddp) == set(single)
    assert {"fashioniq/recall@10", "cirr/recall_subset@1", "circo/map@10"} <= set(ddp)
    assert ddp == pytest.approx(single, abs=1e-9)
    for name in ("fashioniq", "cirr", "circo"):
        with (
            np.load(run / f"features_{name}.npz") as a,
            np.load(tmp_path / "single" / f"features_{name}.npz") as b,
        ):
            assert list(a["query_ids"]) == list(b["query_ids"])
            assert np.allclose(a["query_feats"], b["query_feats"], atol=1e-5)
            assert np.allclose(a["gallery_feats"], b["gallery_feats"], atol=1e-5)


def test_genecis_tasks_of_one_method_stay_apart_in_the_report(data, tmp_path):
    """The four GeneCIS tasks are four benchmarks: evaluated one per run (the same method, backbone and
    seed), each reports under its own name, so zscir-report shows each task and their average instead of
    one task's numbers written over another's."""
    from zscir.cli.report import GENECIS_AVG, collect_runs, summarize

    recall = {}
    for task in ("focus_attribute", "change_object"):
        run = tmp_path / "runs" / task
        metrics = evaluate(eval_config(data, run, "benchmark=genecis", f"benchmark.task={task}"))
        recall[task] = metrics["recall@1"]
        info = json.loads((run / "run_info.json").read_text())
        assert info["benchmarks"] == [f"genecis_{task}"]
    columns, (row,) = summarize(collect_runs([tmp_path / "runs"]))
    assert "genecis/recall@1" not in columns  # no task-less column that either task could fill
    for task, value in recall.items():
        assert row["mean"][f"genecis_{task}/recall@1"] == pytest.approx(value)
    assert row["mean"][GENECIS_AVG] == pytest.approx(sum(recall.values()) / 2)
    assert row["n"] == 1
