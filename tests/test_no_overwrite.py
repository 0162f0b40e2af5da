"""No command replaces results silently: ``zscir-eval`` refuses a run directory that holds results (two
evaluations under one ``$ZSCIR_RUN_ID`` name the same directory), and ``zscir-score``/``zscir-report``/
``zscir-cam-grid`` refuse existing ``--out`` files unless ``--overwrite``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from benchmark_fixtures import make_cirr
from zscir.benchmarks import build_benchmark
from zscir.cli import config
from zscir.cli.cam_grid import main as cam_grid_main
from zscir.cli.cam_grid import write_grid
from zscir.cli.evaluate import evaluate
from zscir.cli.report import main as report_main
from zscir.cli.report import report
from zscir.cli.score import main as score_main
from zscir.cli.score import score


# ---- zscir-eval ----------------------------------------------------------------------------------------
def _default_run_dir(tmp_path: Path, *overrides: str) -> str:
    """The run directory Hydra gives ``zscir-eval <overrides>``."""
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(
            "eval", [f"paths.output_dir={tmp_path / 'outputs'}", *overrides], return_hydra_config=True
        )
    return cfg.hydra.run.dir


def test_a_second_evaluation_under_the_same_run_id_is_refused_not_written_over(
    compose, tmp_path, monkeypatch
):
    monkeypatch.setenv("ZSCIR_RUN_ID", "job42")  # the README's SLURM recipe
    cirr = ["method=sum", "backbone=tiny", "benchmark=synthetic_cirr"]
    circo = ["method=sum", "backbone=tiny", "benchmark=synthetic_circo"]
    run = _default_run_dir(tmp_path, *cirr)
    assert run == _default_run_dir(tmp_path, *circo) == f"{tmp_path}/outputs/eval/sum/job42"
    first = evaluate(compose("eval", [*cirr, f"paths.run_dir={run}"]))
    written = (Path(run) / "metrics.json").read_text()
    assert json.loads(written) == pytest.approx(first)
    with pytest.raises(FileExistsError) as err:
        evaluate(compose("eval", [*circo, f"paths.run_dir={run}"]))
    message = str(err.value)
    for part in ("metrics.json", "synthetic_cirr", "'job42'", "hydra.run.dir=", "ZSCIR_RUN_ID"):
        assert part in message
    assert (Path(run) / "metrics.json").read_text() == written  # the first results are untouched
    # the way out the message names works
    other = evaluate(compose("eval", [*circo, f"paths.run_dir={run}-synthetic_circo"]))
    assert "map@10" in other


def test_evaluating_into_a_training_run_directory_is_refused(compose, tmp_path):
    run = tmp_path / "train_run"
    run.mkdir()
    (run / "run_info.json").write_text(json.dumps({"task": "train", "label": "pli", "benchmarks": ["cirr"]}))
    (run / "metrics.json").write_text('{"cirr/recall@1": 30.0}')
    with pytest.raises(FileExistsError, match=r"a train run of pli on cirr"):
        evaluate(compose("eval", ["method=sum", "backbone=tiny", f"paths.run_dir={run}"]))
    assert json.loads((run / "metrics.json").read_text()) == {"cirr/recall@1": 30.0}


# ---- zscir-score ---------------------------------------------------------------------------------------
def test_score_refuses_to_replace_results_unless_overwrite(tmp_path):
    root = make_cirr(tmp_path / "CIRR")
    bench = build_benchmark("cirr", root, "val")
    g = torch.Generator().manual_seed(0)
    arrays = bench.feature_arrays(
        torch.randn(len(bench.queries), 6, generator=g), torch.randn(9, 6, generator=g)
    )
    np.savez(tmp_path / "a.npz", **arrays)
    np.savez(tmp_path / "b.npz", **{**arrays, "query_feats": -arrays["query_feats"]})
    out = tmp_path / "scores"
    args = ["--benchmark", "cirr", "--root", str(root), "--split", "val", "--out", str(out)]
    assert score_main([*args, "--features", str(tmp_path / "a.npz")]) == 0
    first = (out / "metrics.json").read_text()
    with pytest.raises(FileExistsError, match=r"metrics\.json.*--overwrite"):
        score("cirr", root, "val", tmp_path / "b.npz", out)
    assert score_main([*args, "--features", str(tmp_path / "b.npz")]) == 2
    assert (out / "metrics.json").read_text() == first
    assert score_main([*args, "--features", str(tmp_path / "b.npz"), "--overwrite"]) == 0
    expected = bench.score_arrays({**arrays, "query_feats": -arrays["query_feats"]})
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(expected, abs=1e-12)
    # a server split: the submission files are protected the same way
    test = build_benchmark("cirr", root, "test1")
    feats = test.feature_arrays(
        torch.randn(len(test.queries), 6, generator=g), torch.randn(9, 6, generator=g)
    )
    np.savez(tmp_path / "t.npz", **feats)
    score("cirr", root, "test1", tmp_path / "t.npz", tmp_path / "sub")
    with pytest.raises(FileExistsError, match=r"cirr_test1_recall\.json"):
        score("cirr", root, "test1", tmp_path / "t.npz", tmp_path / "sub")


# ---- zscir-report --------------------------------------------------------------------------------------
def _run(path: Path, label: str, seed: int, recall: float, ratio: float | None = None) -> Path:
    path.mkdir(parents=True)
    info = {"task": "train", "label": label, "method": label, "backbone": "tiny", "seed": seed}
    (path / "run_info.json").write_text(json.dumps({**info, "benchmarks": ["cirr"]}))
    (path / "metrics.json").write_text(json.dumps({"cirr/recall@1": recall}))
    if ratio is not None:
        (path / "resolved_config.yaml").write_text(f"seed: {seed}\nmethod:\n  mask_ratio: {ratio}\n")
    return path


def test_report_refuses_to_replace_a_report_unless_overwrite(tmp_path):
    sweep = tmp_path / "sweep"
    _run(sweep / "0", "pli", 0, 10.0, ratio=0.25)
    _run(sweep / "1", "pli", 0, 20.0, ratio=0.5)
    first = report([sweep], sweep)
    assert "sweep_plot" in first  # results_method.mask_ratio.png
    table = (sweep / "results.md").read_text()
    with pytest.raises(FileExistsError, match=r"results\.md.*--overwrite"):
        report([sweep], sweep)
    assert report_main([str(sweep)]) == 2
    assert (sweep / "results.md").read_text() == table
    # --overwrite replaces it; the plot of a setting no longer swept does not outlive it
    (sweep / "1" / "resolved_config.yaml").write_text("seed: 0\nmethod:\n  mask_ratio: 0.25\n")
    (sweep / "1" / "run_info.json").write_text(
        json.dumps({"task": "train", "label": "pli", "backbone": "tiny", "seed": 1, "benchmarks": ["cirr"]})
    )
    assert report_main([str(sweep), "--overwrite"]) == 0
    assert "15.00 ± 7.07" in (sweep / "results.md").read_text()
    assert sorted(p.name for p in sweep.glob("results*")) == [
        "results.csv",
        "results.md",
        "results.png",
        "results.tex",
    ]


def test_report_of_several_directories_needs_out(tmp_path, capsys):
    a, b = _run(tmp_path / "a", "sum", 0, 10.0), _run(tmp_path / "b", "pli", 0, 20.0)
    with pytest.raises(SystemExit) as err:
        report_main([str(a), str(b)])
    assert err.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert not list(a.glob("results*"))  # nothing written into the first run directory
    assert report_main([str(a), str(b), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "results.md").is_file()


# ---- zscir-cam-grid ------------------------------------------------------------------------------------
def test_cam_grid_refuses_an_existing_out_file_before_any_work(tmp_path):
    out = tmp_path / "grid.png"
    out.write_bytes(b"an earlier grid")
    with pytest.raises(FileExistsError, match=r"grid\.png.*--overwrite"):
        write_grid(["method=sum"], 2, out)  # refused before the config is even read
    assert cam_grid_main(["-n", "2", "--out", str(out), "method=sum"]) == 2
    assert out.read_bytes() == b"an earlier grid"
    with pytest.raises(ValueError, match="method=cam_ti"):  # --overwrite gets past the check
        write_grid(["method=sum"], 2, out, overwrite=True)
