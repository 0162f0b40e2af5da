"""Smoke runs of the entry-point functions on the small synthetic world with tiny random models."""

import json

import pytest
import torch

from zscir.cli.evaluate import evaluate
from zscir.cli.report import report
from zscir.cli.train import train


@pytest.mark.parametrize("method", ["image_only", "text_only", "sum"])
def test_baselines_evaluate_without_training(compose, tmp_path, method):
    cfg = compose("train", [f"method={method}", "backbone=tiny"])
    metrics = train(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(metrics)
    assert {"synthetic_cirr/recall@1", "synthetic_cirr/recall_subset@3", "synthetic_circo/map@10"} <= set(
        metrics
    )
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert not (run / "checkpoints").exists()  # nothing trained, nothing saved
    info = json.loads((run / "run_info.json").read_text())
    assert info["method"] == method
    assert info["backbone"] == "tiny"


def test_clip_pretrain_trains_exports_and_reloads(compose, tmp_path):
    export = tmp_path / "clip.pt"
    cfg = compose(
        "train",
        [
            "experiment=tiny_synthetic_clip",
            "trainer.max_epochs=1",
            "trainer.precision=32-true",
            "data.batch_size=32",
            f"method.export_backbone={export}",
        ],
    )
    metrics = train(cfg)
    assert set(metrics) == {"synthetic_t2i/recall@1", "synthetic_t2i/recall@5", "synthetic_t2i/recall@10"}
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert export.is_file()
    # the exported state dict is a complete backbone checkpoint; caption->image with it reproduces the run
    again = evaluate(
        compose(
            "eval",
            [
                "method=text_only",
                "backbone=tiny",
                f"backbone.checkpoint={export}",
                "benchmark=synthetic_t2i",
                f"paths.run_dir={tmp_path / 'eval'}",
            ],
        )
    )
    assert again["recall@1"] == pytest.approx(metrics["synthetic_t2i/recall@1"], abs=1e-6)


def test_checkpoint_of_another_method_is_refused(compose, tmp_path):
    cfg = compose(
        "train",
        [
            "experiment=tiny_synthetic_clip",
            "trainer.max_steps=1",
            "trainer.precision=32-true",
            "data.batch_size=32",
            "eval_benchmarks=[]",
        ],
    )
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="clip_pretrain"):
        evaluate(
            compose(
                "eval",
                ["method=sum", "backbone=tiny", f"ckpt_path={ckpt}", f"paths.run_dir={tmp_path / 'e'}"],
            )
        )


def test_eval_writes_features_and_test_split_submissions(compose, tmp_path):
    run = tmp_path / "e"
    evaluate(
        compose(
            "eval",
            [
                "method=sum",
                "backbone=tiny",
                "benchmark=synthetic_cirr",
                "benchmark.split=test1",
                f"paths.run_dir={run}",
            ],
        )
    )
    feats = dict(**__import__("numpy").load(run / "features.npz"))
    assert feats["query_feats"].shape[0] == feats["query_ids"].shape[0] == 21
    recall = json.loads((run / "cirr_test1_recall.json").read_text())
    subset = json.loads((run / "cirr_test1_recall_subset.json").read_text())
    assert recall["version"] == "rc2"
    assert recall["metric"] == "recall"
    assert subset["metric"] == "recall_subset"
    pair = next(k for k in recall if k not in ("version", "metric"))
    assert len(recall[pair]) == len(set(recall[pair])) == 17  # 18 test1 images minus the reference
    assert len(subset[pair]) == 3


def test_second_evaluation_reuses_the_gallery_cache(compose, tmp_path):
    overrides = ["method=image_only", "backbone=tiny", "benchmark=synthetic_circo"]
    first = evaluate(compose("eval", [*overrides, f"paths.run_dir={tmp_path / 'a'}"]))
    cache_files = list((tmp_path / "outputs" / "cache" / "gallery").glob("*.pt"))
    assert len(cache_files) == 1
    stamp = cache_files[0].stat().st_mtime_ns
    second = evaluate(compose("eval", [*overrides, f"paths.run_dir={tmp_path / 'b'}"]))
    assert second == first
    assert cache_files[0].stat().st_mtime_ns == stamp
    # a corrupt entry is not trusted: it is re-encoded and the numbers stay the same
    cache_files[0].write_bytes(b"garbage")
    third = evaluate(compose("eval", [*overrides, f"paths.run_dir={tmp_path / 'c'}"]))
    assert third == first
    assert torch.load(cache_files[0], weights_only=True)["feats"].shape[0] > 0


def test_report_table_from_runs(compose, tmp_path):
    for method in ("image_only", "sum"):
        train(
            compose(
                "train", [f"method={method}", "backbone=tiny", f"paths.run_dir={tmp_path / 'runs' / method}"]
            )
        )
    paths = report([tmp_path / "runs"], tmp_path / "report")
    lines = paths["markdown"].read_text().splitlines()
    assert lines[2].startswith("| method | synthetic_cirr/recall@1")
    assert sum(line.startswith("| image_only") or line.startswith("| sum") for line in lines) == 2
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert header[0] == "method"
    assert "synthetic_circo/map@10" in header
    assert paths["plot"].stat().st_size > 1000
