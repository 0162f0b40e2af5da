"""``method.kind`` selects a method, as ``backbone.kind`` and ``benchmark.kind`` select theirs: the old key
``method.name`` is refused with the rename wherever a user can write it, and a run directory saved with
``method.name`` (by a zscir before the rename) still evaluates, loads and reports."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from omegaconf import OmegaConf, open_dict

import zscir
from zscir.cli import config
from zscir.cli.evaluate import evaluate
from zscir.cli.report import collect_runs
from zscir.methods import build_method
from zscir.methods.baselines import Sum

TINY = {"name": "tiny", "kind": "open_clip", "model": "tiny"}
RENAMED = r"method\.name was renamed to method\.kind.*method\.kind=lincir"


def test_method_name_override_is_refused_with_the_rename(compose, monkeypatch):
    for override in ("method.name=lincir", "+method.name=lincir", "++method.name=lincir"):
        with pytest.raises(ValueError, match=RENAMED):
            compose("train", [override])
    # an experiment or user config that still sets method.name reaches validation: refused there
    cfg = compose("train", ["method=sum"])
    with open_dict(cfg):
        cfg.method.name = "lincir"
    with pytest.raises(ValueError, match=RENAMED):
        config.validate_config(cfg, "train")
    # the command-line tools refuse it before Hydra starts (Hydra would only say the key is unknown)
    from zscir.cli import evaluate as evaluate_cli
    from zscir.cli import train as train_cli

    for program, main in (("zscir-train", train_cli.main), ("zscir-eval", evaluate_cli.main)):
        monkeypatch.setattr(sys, "argv", [program, "method=sum", "method.name=lincir"])
        with pytest.raises(SystemExit, match=f"{program}: error: {RENAMED}"):
            main()


def test_method_dict_with_name_is_refused_with_the_rename():
    with pytest.raises(ValueError, match=RENAMED):
        build_method(TINY, {"name": "lincir"})
    with pytest.raises(ValueError, match=RENAMED):
        zscir.load_method({"name": "lincir"}, backbone="tiny", device="cpu")
    with pytest.raises(ValueError, match=r"renamed to method\.kind.*method\.kind=other"):
        zscir.load_method("sum", backbone="tiny", device="cpu", name="other")
    with pytest.raises(ValueError, match=r"renamed to method\.kind.*method\.kind=sum"):
        Sum(backbone=TINY, config={"name": "sum"})
    with pytest.raises(ValueError, match=r"has no kind; select one of: .*lincir"):
        build_method(TINY, {"img_weight": 0.5})
    assert type(build_method(TINY, {"kind": "sum"})) is Sum


def test_run_saved_with_method_name_still_evaluates_loads_and_reports(compose, tmp_path, caplog):
    """A run directory as a zscir before the rename wrote it: ``method: {name: image_only, ...}`` in its
    resolved_config.yaml. Every reader upgrades it to method.kind (one warning per file)."""
    cfg = compose("train", ["method=image_only", "backbone=tiny", "label=old_run", "seed=2"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["method"] = {"name": saved["method"].pop("kind"), **saved["method"]}  # the old format
    run = tmp_path / "old_run"
    run.mkdir()
    (run / "resolved_config.yaml").write_text(OmegaConf.to_yaml(saved))
    (run / "run_info.json").write_text(json.dumps({"label": "old_run", "method": "image_only", "seed": 2}))
    (run / "metrics.json").write_text(json.dumps({"synthetic_cirr/recall@1": 1.0}))
    assert "kind:" not in (run / "resolved_config.yaml").read_text().split("backbone:")[0]

    # zscir-eval run_dir=<old run>: method, backbone, seed and label come from the old config
    with caplog.at_level(logging.WARNING, logger="zscir"):
        metrics = evaluate(
            compose("eval", [f"run_dir={run}", "benchmark=synthetic_cirr", f"paths.run_dir={tmp_path / 'e'}"])
        )
    assert metrics["recall@1"] >= 0
    info = json.loads((tmp_path / "e" / "run_info.json").read_text())
    assert (info["method"], info["label"], info["seed"], info["backbone"]) == (
        "image_only",
        "old_run",
        2,
        "tiny",
    )
    written = OmegaConf.load(tmp_path / "e" / "resolved_config.yaml").method
    assert written.kind == "image_only"
    assert "name" not in written
    warnings = [r.getMessage() for r in caplog.records if "earlier zscir" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert str(run / "resolved_config.yaml") in warnings[0]
    assert "method.name (image_only)" in warnings[0]

    # the evaluation is filed under the old run's method (not the eval config's default, sum)
    assert config._from_run(str(run), "method.kind", "sum") == "image_only"

    # the Python API and zscir-report read the same upgraded config
    assert type(zscir.load_run(run, device="cpu")).__name__ == "ImageOnly"
    (reported,) = [r for r in collect_runs([run]) if r["dir"] == str(run)]
    assert reported["config"]["method.kind"] == "image_only"
    assert "method.name" not in reported["config"]
