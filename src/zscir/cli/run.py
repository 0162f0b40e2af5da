"""One run's set-up, shared by ``train(cfg)`` and ``evaluate(cfg)``: validation, launch checks, the run
directory, first-use provisioning, one seed, the method, the benchmarks (resolved once), loggers and the
Trainer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from zscir.benchmarks import Benchmark, build_benchmark
from zscir.cli.config import benchmark_configs, check_run_metrics, plain, validate_config
from zscir.cli.launch import check_launch, is_global_zero
from zscir.cli.provision import ensure_backbone, ensure_synthetic_world
from zscir.cli.safe_loggers import start_failsafe
from zscir.cli.tracking import mark_latest_sweep, wandb_settings
from zscir.methods import RetrievalMethod, build_method

log = logging.getLogger("zscir")


@dataclass
class Run:
    """What :func:`prepare_run` sets up."""

    run_dir: Path
    method: RetrievalMethod
    #: the resolved benchmark configs (``eval_benchmarks`` or ``benchmark``) and the benchmarks built from them
    benchmark_configs: list[dict]
    benchmarks: list[Benchmark]

    @property
    def benchmark_names(self) -> list[str]:
        return [b.get("name") or b["kind"] for b in self.benchmark_configs]


def prepare_run(
    cfg: DictConfig,
    task: str,
    train_recipe: Callable[[DictConfig], Any],
    before_provision: Callable[[Path], None] | None = None,
) -> Run:
    """Validate ``cfg`` (``task``: train | eval), refuse a bad launch, create the run directory, provision
    the synthetic world and a recipe backbone (trained with ``train_recipe``), seed everything once, and
    build the method and the benchmarks. ``before_provision(run_dir)`` runs right after the directory
    exists (checks that refuse to reuse it, the saved config).

    Raises:
        ValueError: an invalid config (unknown key, wrong type, unknown benchmark, the synthetic backbone on
            a real benchmark, an ``optimized_metric`` or ``checkpoint.monitor`` this run never computes).
        ModuleNotFoundError: a requested logger that is not installed.
        RuntimeError: a Hydra multirun job that would be multi-process.
    """
    benchmarks_cfg = benchmark_configs(cfg)
    validate_config(cfg, task, benchmarks_cfg)
    check_launch(cfg)
    run_dir = Path(cfg.paths.run_dir)
    if before_provision is not None:
        before_provision(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_global_zero():
        mark_latest_sweep()
    ensure_synthetic_world(cfg, benchmarks_cfg)
    ensure_backbone(cfg, train_recipe)
    L.seed_everything(cfg.seed, workers=True)
    method = build_method(plain(cfg.backbone), plain(cfg.method))
    benchmarks = build_benchmarks(benchmarks_cfg)
    check_run_metrics(cfg, benchmarks, method.trains)
    return Run(run_dir, method, benchmarks_cfg, benchmarks)


def build_benchmarks(configs: list[dict]) -> list[Benchmark]:
    """Benchmarks from resolved benchmark configs (``kind``, ``root``, ``split``, ``name`` + options)."""
    benchmarks = []
    for c in configs:
        c = dict(c)
        benchmarks.append(
            build_benchmark(
                c.pop("kind"), c.pop("root"), c.pop("split", "val"), name=c.pop("name", None), **c
            )
        )
        log.info("benchmark %s", benchmarks[-1])
    return benchmarks


def build_loggers(cfg: DictConfig, benchmarks: list[str] | None = None) -> list:
    """The configured loggers, started now and guarded: one that is not installed was refused at start-up
    (``zscir.cli.config.check_loggers``); one that cannot start (W&B unreachable, not logged in) is dropped
    with a warning, and one that fails later is disabled with a warning; neither
    ever fails the run (see ``zscir.cli.safe_loggers``). W&B gets this run's identity (see
    ``zscir.cli.tracking``)."""
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None:
            continue
        try:
            conf = plain(conf)
            if str(conf.get("_target_", "")).endswith("WandbLogger"):
                if benchmarks is None:
                    benchmarks = [b.get("name") or b["kind"] for b in benchmark_configs(cfg)]
                conf = wandb_settings(conf, cfg, Path(cfg.paths.run_dir), benchmarks)
            # W&B starts lazily: start_failsafe makes an unreachable W&B fail here, not mid-run
            logger = start_failsafe(instantiate(conf), name)
        except Exception as err:  # e.g. W&B not installed or misconfigured: never fail the run for a logger
            log.warning(
                "logger %s could not start (%s: %s); continuing without it", name, type(err).__name__, err
            )
            continue
        if logger is not None:
            loggers.append(logger)
    return loggers


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    callbacks: list | None = None,
    loggers: list | None = None,
    plugins: list | None = None,
) -> L.Trainer:
    kwargs = plain(cfg.trainer)
    return L.Trainer(
        default_root_dir=str(run_dir),
        callbacks=callbacks or [],
        logger=loggers or False,
        plugins=plugins or None,
        **kwargs,
    )
