"""``zscir-train``: train a method (if it has anything to train), then evaluate it on ``eval_benchmarks``.

    zscir-train experiment=demo method=lincir
    zscir-train -m method=pli,lincir seed=0,1,2 backbone=tiny_synthetic   # one run dir per job
    torchrun --nproc_per_node=8 -m zscir.cli.train trainer=ddp ...          # one multi-GPU run
    zscir-train <same overrides> hydra.run.dir=<run dir> resume=last       # continue a killed/pre-empted run

Sweep jobs are single-process: ``-m`` with a strategy that re-launches the script is refused
(``zscir.cli.launch.check_launch``).

A run directory holds one run: training into a directory that already has checkpoints or results is
refused unless ``resume`` is given. ``resume=last`` continues from ``<run dir>/checkpoints/last.ckpt``
(or starts afresh when there is none yet, so one command serves the first launch and every requeue).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from zscir.cli.callbacks import AtomicCheckpointIO, Preempted, reliability_callbacks
from zscir.cli.config import CONF_DIR, check_plugins, check_renamed_overrides, parse_config, plain
from zscir.cli.launch import is_global_zero
from zscir.cli.outputs import (
    metrics_after_test,
    print_metrics,
    write_examples,
    write_resolved_config,
    write_run_info,
)
from zscir.cli.run import build_loggers, build_trainer, prepare_run
from zscir.cli.tracking import Throughput, finish_wandb, log_wandb_summary
from zscir.data.loaders import DataConfig, build_train_loader
from zscir.methods import RetrievalMethod
from zscir.retrieval.cache import GalleryCache
from zscir.utils.io import remove_stale_temp_files

log = logging.getLogger("zscir")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate one run described by ``cfg``; returns its metrics (``<benchmark>/<metric>``).

    Raises:
        FileExistsError: the run directory already holds a run and ``resume`` is not set.
        ValueError: an invalid config, or an ``optimized_metric``/``checkpoint.monitor`` this run never
            computes (both refused before any training step).
    """
    resume = None

    def claim(run_dir: Path) -> None:
        nonlocal resume
        resume = resolve_resume(cfg.get("resume"), run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(run_dir, cfg)

    run = prepare_run(cfg, "train", train_recipe=train, before_provision=claim)
    method, benchmarks, run_dir = run.method, run.benchmarks, run.run_dir
    method.attach_benchmarks(
        benchmarks,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.eval.num_workers,
        cache=GalleryCache(cfg.paths.cache_dir) if cfg.eval.cache_gallery else None,
    )
    loggers = build_loggers(cfg, run.benchmark_names)
    failed = True
    try:
        metrics = _fit_and_test(cfg, method, benchmarks, run_dir, loggers, resume, run.benchmark_names)
        failed = False
    finally:  # every job of a multirun is its own W&B run, failed or not
        finish_wandb(loggers, failed=failed)
    return metrics


def _fit_and_test(
    cfg: DictConfig,
    method: RetrievalMethod,
    benchmarks: list,
    run_dir: Path,
    loggers: list,
    resume: str | None,
    benchmark_names: list[str],
) -> dict[str, float]:
    for lg in loggers:
        lg.log_hyperparams(plain(cfg))

    best = evaluated = None
    if method.trains:
        ckpt_cfg = cfg.checkpoint
        checkpoint = ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="epoch_{epoch:03d}",
            auto_insert_metric_name=False,
            save_last=True,
            enable_version_counter=False,  # last.ckpt is shared with LastCheckpoint: overwrite, never last-v1
            monitor=ckpt_cfg.monitor,
            mode=ckpt_cfg.mode,
            save_top_k=1 if ckpt_cfg.monitor else 0,
            every_n_epochs=ckpt_cfg.every_n_epochs,
        )
        callbacks = [
            checkpoint,
            *reliability_callbacks(
                run_dir / "checkpoints", ckpt_cfg.get("every_n_train_steps", 0), ckpt_cfg.every_n_epochs
            ),
            Throughput(),
            *([LearningRateMonitor(logging_interval="step")] if loggers else []),
        ]
        trainer = build_trainer(cfg, run_dir, callbacks, loggers, plugins=[AtomicCheckpointIO()])
        loader = build_train_loader(
            parse_config(DataConfig, plain(cfg.data)),
            method.encoder.image_transform,
            seed=cfg.seed,
            samples=method.training_samples(),  # the method's own training samples (LinCIR), if any
        )
        with preemption_exit():
            trainer.fit(method, train_dataloaders=loader, ckpt_path=resume)
        best = checkpoint.best_model_path or None if ckpt_cfg.monitor else None
        evaluated = Path(best) if best else run_dir / "checkpoints" / "last.ckpt"
    else:
        log.info("method %s has nothing to train; evaluating only", cfg.method.kind)
        trainer = build_trainer(cfg, run_dir, [], loggers)

    metrics: dict[str, float] = {}
    if method.benchmarks:
        with preemption_exit():
            trainer.test(method, ckpt_path=best, verbose=False)
        metrics = metrics_after_test(method, trainer, prefix_benchmark=True)
    if trainer.global_rank == 0:
        write_examples(cfg, method, benchmarks, run_dir, loggers)
        log_wandb_summary(loggers, metrics, run_dir)
        write_run_info(run_dir, cfg, "train", metrics, evaluated, benchmark_names)
        print_metrics(f"{cfg.get('label') or cfg.method.kind} ({cfg.backbone.name}) -> {run_dir}", metrics)
    return metrics


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint to resume from, after refusing to overwrite a run directory that holds a run.

    Raises:
        FileExistsError: ``run_dir`` already holds checkpoints or results and ``resume`` is not set.
        FileNotFoundError: ``resume`` is a path that does not exist.
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume is None:
        previous = [p for p in (last, run_dir / "metrics.json", run_dir / "run_info.json") if p.exists()]
        previous += sorted((run_dir / "checkpoints").glob("*.ckpt")) if not previous else []
        if previous and is_global_zero():  # DDP children start after rank 0 and share the dir
            raise FileExistsError(
                f"{run_dir} already holds a run ({previous[0].name} exists). To continue it, add "
                f"resume=last; to start a new run, use another hydra.run.dir (or delete {run_dir})."
            )
        return None
    if resume == "last":
        if not last.is_file():
            log.info("resume=last: no %s yet; starting from scratch", last)
            return None
        resume = str(last)
    elif not Path(resume).expanduser().is_file():
        raise FileNotFoundError(
            f"resume={resume!r}: no such checkpoint; pass resume=last (this run dir's last.ckpt) or a .ckpt path"
        )
    if is_global_zero():
        for stale in remove_stale_temp_files(run_dir / "checkpoints"):
            log.info("removed %s, left by a write that was killed", stale)
    log.info("resuming from %s", resume)
    return str(Path(resume).expanduser())


@contextlib.contextmanager
def preemption_exit() -> Iterator[None]:
    """Lightning stops on SIGTERM (after LastCheckpoint saved, or during evaluation) with a SystemExit of
    status 0; make that status 143 instead, so nothing mistakes the run for a finished one."""
    try:
        yield
    except SIGTERMException as err:
        log.warning("SIGTERM: stopped before the run finished (no results written)")
        raise Preempted() from err


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Returns ``optimized_metric`` for hyper-parameter sweepers (Optuna) when it is set."""
    metrics = train(cfg)
    key = cfg.get("optimized_metric")
    if not key:
        return None
    if key not in metrics:
        raise KeyError(f"optimized_metric {key!r} is not among this run's metrics: {sorted(metrics)}")
    return metrics[key]


def main() -> None:
    """``zscir-train``: a missing sweeper/launcher plugin is named with its pip line before Hydra starts."""
    check_plugins(sys.argv[1:])
    try:
        check_renamed_overrides(sys.argv[1:])
    except ValueError as err:
        raise SystemExit(f"zscir-train: error: {err}") from None
    hydra_main()


if __name__ == "__main__":
    main()
