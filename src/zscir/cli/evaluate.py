"""``zscir-eval``: evaluate a method — zero-shot, from a checkpoint, or from a training run directory.

    zscir-eval method=sum backbone=clip_vit_l14 benchmark=cirr benchmark.root=/data/CIRR benchmark.split=test1
    zscir-eval method=lincir backbone=hf_clip_vit_l14 ckpt_path=/runs/x/checkpoints/last.ckpt benchmark=circo
    zscir-eval run_dir=outputs/train/lincir/2026-11-23_10-00-00_ab12cd benchmark=synthetic_circo
    zscir-eval run_dir=... benchmark=synthetic_cirr visualize=8   # + retrieval grids (PNG) per query

Writes ``metrics.json`` (flat, percent), ``features.npz`` and, for unlabelled test splits, the server
submission files into the run directory. A run directory that already holds results (e.g. another
evaluation under the same ``$ZSCIR_RUN_ID``) is refused, never overwritten.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from zscir.api import load_checkpoint
from zscir.api import run_config as load_run  # the name callers of zscir.cli.evaluate know
from zscir.backbones import backbone_fingerprint
from zscir.cli.config import CONF_DIR, TRAIN_ONLY_KEYS, check_plugins, check_renamed_overrides, plain
from zscir.cli.outputs import (
    metrics_after_test,
    print_metrics,
    refuse_existing_results,
    write_examples,
    write_features,
    write_run_info,
    write_submissions,
)
from zscir.cli.run import build_loggers, build_trainer, prepare_run
from zscir.cli.tracking import finish_wandb, log_wandb_summary
from zscir.cli.train import train
from zscir.methods import RetrievalMethod
from zscir.retrieval.cache import GalleryCache

log = logging.getLogger("zscir")


def from_run_dir(cfg: DictConfig) -> None:
    """Take the method, backbone, seed, label, experiment and tags of the run ``cfg.run_dir``, and its
    checkpoint unless ``ckpt_path`` is given, so no training override has to be repeated. The benchmark,
    trainer and eval settings stay this command's."""
    saved, ckpt = load_run(cfg.run_dir)
    with open_dict(cfg):
        cfg.method, cfg.backbone, cfg.seed = saved.method, saved.backbone, saved.seed
        cfg.label = cfg.label or saved.get("label")
        cfg.experiment_name = cfg.get("experiment_name") or saved.get("experiment_name")
        cfg.tags = list(dict.fromkeys([*(saved.get("tags") or []), *(cfg.get("tags") or [])]))
        cfg.ckpt_path = cfg.ckpt_path or (str(ckpt) if ckpt else None)
    log.info("evaluating run %s (method %s, checkpoint %s)", cfg.run_dir, cfg.method.kind, cfg.ckpt_path)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate one method on ``benchmark`` (or ``eval_benchmarks``); returns the metrics.

    Raises:
        FileExistsError: the run directory already holds results.
        FileNotFoundError: ``run_dir`` or ``ckpt_path`` does not exist, or the run has no checkpoint.
        ValueError: an invalid config, or nothing to evaluate.
    """
    with open_dict(cfg):  # an experiment's training settings (data, checkpoint selection) do not apply
        for key in TRAIN_ONLY_KEYS:
            cfg.pop(key, None)
    if cfg.get("run_dir"):
        from_run_dir(cfg)
    run = prepare_run(cfg, "eval", train_recipe=train, before_provision=refuse_existing_results)
    method, benchmarks, run_dir = run.method, run.benchmarks, run.run_dir
    if cfg.get("ckpt_path"):
        load_checkpoint(method, cfg.ckpt_path)
    elif cfg.get("run_dir") and method.trains:
        raise FileNotFoundError(
            f"run {cfg.run_dir} trained {cfg.method.kind} but has no checkpoint (checkpoints/last.ckpt); "
            "pass ckpt_path=... to evaluate other weights"
        )
    if not benchmarks:
        raise ValueError("nothing to evaluate: set benchmark=<name> or eval_benchmarks=[...]")
    method.attach_benchmarks(
        benchmarks,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.eval.num_workers,
        cache=GalleryCache(cfg.paths.cache_dir) if cfg.eval.cache_gallery else None,
    )
    loggers = build_loggers(cfg, run.benchmark_names)
    failed = True
    try:
        for lg in loggers:
            lg.log_hyperparams(plain(cfg))
        trainer = build_trainer(cfg, run_dir, [], loggers)
        trainer.test(method, verbose=False)
        metrics = metrics_after_test(method, trainer, prefix_benchmark=len(benchmarks) > 1)
        if trainer.global_rank == 0:
            _write_outputs(cfg, method, benchmarks, run_dir, metrics, loggers, run.benchmark_names)
        failed = False
    finally:  # each evaluation (each job of `zscir-eval -m`) is its own W&B run
        finish_wandb(loggers, failed=failed)
    return metrics


def _write_outputs(
    cfg: DictConfig,
    method: RetrievalMethod,
    benchmarks: list,
    run_dir: Path,
    metrics: dict[str, float],
    loggers: list,
    benchmark_names: list[str],
) -> None:
    for bench in benchmarks:
        feats = method.eval_results.get(bench.name, {}).get("features")
        if feats is None:
            continue
        if cfg.save_features:
            name = "features.npz" if len(benchmarks) == 1 else f"features_{bench.name}.npz"
            write_features(run_dir / name, bench, *feats)
        if bench.split in bench.submission_splits:
            for path in write_submissions(run_dir, bench, *feats):
                log.info("wrote submission file %s", path)
    write_examples(cfg, method, benchmarks, run_dir, loggers)
    log_wandb_summary(loggers, metrics, run_dir)
    checkpoint = Path(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    write_run_info(run_dir, cfg, "eval", metrics, checkpoint, benchmark_names)
    print_metrics(
        f"{cfg.get('label') or cfg.method.kind} ({cfg.backbone.name}, {backbone_fingerprint(plain(cfg.backbone))[:8]}) -> {run_dir}",
        metrics,
    )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def command_line_benchmark(overrides: list[str]) -> list[str]:
    """``overrides`` plus ``eval_benchmarks=[]`` when they choose an ``experiment`` and a ``benchmark`` but
    no ``eval_benchmarks``: the benchmark named on the command line is evaluated, not the experiment's
    training benchmarks (its ``eval_benchmarks``, which would otherwise replace ``benchmark``)."""
    keys = {o.lstrip("+~").partition("=")[0] for o in overrides}
    if {"experiment", "benchmark"} <= keys and "eval_benchmarks" not in keys:
        return ["eval_benchmarks=[]", *overrides]  # first: Hydra takes options (--cfg job) after overrides
    return overrides


def main() -> None:
    """``zscir-eval``: a missing launcher plugin is named with its pip line before Hydra starts."""
    check_plugins(sys.argv[1:])
    try:
        check_renamed_overrides(sys.argv[1:])
    except ValueError as err:
        raise SystemExit(f"zscir-eval: error: {err}") from None
    sys.argv[1:] = command_line_benchmark(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
