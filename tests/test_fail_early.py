"""Misconfigurations fail at start-up, before any training or evaluation step: the metric a sweep
optimises, the checkpoint monitor, a logger or Hydra plugin that is not installed, the synthetic
backbone on a real benchmark."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from conftest import small_world_overrides
from zscir.cli import config
from zscir.cli import train as train_module
from zscir.cli.evaluate import evaluate
from zscir.cli.train import train

SRC = Path(__file__).resolve().parents[1] / "src"
OPTUNA = config.installed("hydra_plugins.hydra_optuna_sweeper")


@pytest.fixture
def no_steps(monkeypatch):
    """Any training or evaluation step fails the test."""

    def started(*args, **kwargs):
        raise AssertionError("a training/evaluation step started before the misconfiguration was refused")

    monkeypatch.setattr(L.Trainer, "fit", started)
    monkeypatch.setattr(L.Trainer, "test", started)


def without(monkeypatch, *modules: str) -> None:
    """Make ``importlib.util.find_spec`` report ``modules`` (and their submodules) as not installed."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if any(name == m or name.startswith(m + ".") for m in modules):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(
    ("method", "key", "match"),
    [
        ("pli", "synthetic_circo/map@10", r"optimized_metric='synthetic_circo/map@10'.*does not evaluate"),
        ("pli", "synthetic_cirr/map@10", r"optimized_metric=.*no metric 'map@10'.*recall@1"),
        ("sum", "synthetic_cirr/recall@11", r"no metric 'recall@11'"),  # nothing to train: before test
        ("pli", "recall@1", r"benchmark 'recall@1'"),  # the benchmark part forgotten
    ],
)
def test_an_optimized_metric_the_run_never_computes_fails_before_any_step(
    compose, no_steps, method, key, match
):
    cfg = compose(
        "train",
        [f"method={method}", "backbone=tiny", "eval_benchmarks=[synthetic_cirr]", f"optimized_metric={key}"],
    )
    with pytest.raises(ValueError, match=match):
        train(cfg)


def test_a_computed_optimized_metric_passes_the_check(compose, no_steps):
    cfg = compose(
        "train",
        [
            "method=pli",
            "backbone=tiny",
            "eval_benchmarks=[synthetic_cirr]",
            "optimized_metric=synthetic_cirr/recall@1",
        ],
    )
    with pytest.raises(AssertionError, match="step started"):  # the check let it through to fit
        train(cfg)


def test_an_optuna_search_without_optimized_metric_is_refused(compose, no_steps, monkeypatch):
    cfg = compose("train", ["method=pli", "backbone=tiny", "eval_benchmarks=[synthetic_cirr]"])
    monkeypatch.setattr(config, "optuna_sweep", lambda: True)  # as inside a job of the Optuna sweeper
    with pytest.raises(ValueError, match=r"needs the metric it maximises: add optimized_metric="):
        train(cfg)


@pytest.mark.parametrize("name", ["pli_optuna", "lincir_optuna", "cam_ti_optuna"])
def test_the_optuna_files_require_the_metric(name):
    text = (config.CONF_DIR / "hparams_search" / f"{name}.yaml").read_text()
    assert "optimized_metric: ???" in text  # no silent default to a synthetic metric


def test_a_logger_that_is_not_installed_is_an_error_with_the_install_hint(compose, no_steps, monkeypatch):
    without(monkeypatch, "tensorboard")
    cfg = compose(
        "train", ["method=pli", "backbone=tiny", "logger=tensorboard", "eval_benchmarks=[synthetic_cirr]"]
    )
    with pytest.raises(
        ModuleNotFoundError, match=r"logger=tensorboard needs the 'tensorboard'.*zscir\[tensorboard\]"
    ):
        train(cfg)


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["hparams_search=pli_optuna", "optimized_metric=cirr/recall@1"], r"zscir\[optuna\]"),
        (["-m", "hydra/sweeper=optuna"], r"zscir\[optuna\]"),
        (["-m", "hydra/launcher=slurm", "seed=0,1"], r"zscir\[slurm\]"),
    ],
)
def test_a_missing_hydra_plugin_names_its_pip_line_before_hydra_starts(monkeypatch, argv, hint):
    without(monkeypatch, "hydra_plugins")
    monkeypatch.setattr(sys, "argv", ["zscir-train", *argv])
    with pytest.raises(SystemExit, match=hint):
        train_module.main()


def test_installed_plugins_and_plain_overrides_pass_the_plugin_check():
    config.check_plugins(["method=pli", "hparams_search=compare", "experiment=demo", "hydra/launcher=basic"])


def test_the_synthetic_backbone_on_a_real_benchmark_is_refused_naming_backbone(compose, no_steps):
    cfg = compose("eval", ["benchmark=cirr", "benchmark.root=/data/CIRR"])
    assert cfg.backbone.name == "tiny_synthetic"  # the default
    with pytest.raises(ValueError, match=r"backbone=tiny_synthetic is a toy CLIP.*evaluates cirr.*backbone="):
        evaluate(cfg)
    cfg = compose("train", ["eval_benchmarks=[synthetic_cirr,circo]"])
    with pytest.raises(ValueError, match=r"evaluates circo .*backbone=clip_vit_l14"):
        train(cfg)


@pytest.mark.slow
@pytest.mark.skipif(not OPTUNA, reason="the Optuna sweeper is not installed (pip install 'zscir[optuna]')")
def test_an_optuna_study_runs_trials_and_refuses_a_missing_metric(small_world, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        out = tmp_path / "outputs"
        command = [
            sys.executable,
            "-m",
            "zscir.cli.train",
            "hparams_search=pli_optuna",
            "backbone=tiny",
            "eval_benchmarks=[synthetic_cirr]",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            "trainer.max_steps=2",
            "data.batch_size=16",
            f"paths.data_dir={small_world}",
            f"paths.output_dir={out}",
            "eval.num_workers=0",
            "data.num_workers=0",
            "trainer.enable_progress_bar=false",
            *small_world_overrides(),
            *args,
        ]
        env = {
            "PYTHONPATH": str(SRC),
            "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin:/bin",
        }
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    refused = run()
    assert refused.returncode != 0
    assert "add optimized_metric=" in refused.stderr + refused.stdout
    assert not list((tmp_path / "outputs").rglob("*.ckpt"))  # refused before training

    done = run("optimized_metric=synthetic_cirr/recall@1")
    assert done.returncode == 0, done.stderr[-3000:]
    results = list((tmp_path / "outputs").rglob("optimization_results.yaml"))
    assert len(results) == 1
    assert "best_value" in results[0].read_text()
    assert len(list((tmp_path / "outputs").rglob("metrics.json"))) == 2
