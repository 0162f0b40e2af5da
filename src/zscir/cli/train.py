"""``zscir-train``: train a method (if it has anything to train), then evaluate it on ``eval_benchmarks``.

zscir-train experiment=demo method=lincir
zscir-train -m method=pli,lincir seed=0,1,2 backbone=tiny_synthetic
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from zscir.cli.common import (
    CONF_DIR,
    benchmark_configs,
    build_benchmarks,
    build_loggers,
    build_trainer,
    ensure_backbone,
    ensure_synthetic_world,
    flat_metrics,
    parse_config,
    plain,
    print_metrics,
    validate_config,
    write_run_info,
)
from zscir.data.loaders import DataConfig, build_train_loader
from zscir.methods import build_method
from zscir.retrieval.cache import GalleryCache

log = logging.getLogger("zscir")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate one run described by ``cfg``; returns its metrics (``<benchmark>/<metric>``)."""
    validate_config(cfg, "train")
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_synthetic_world(cfg)
    ensure_backbone(cfg)
    L.seed_everything(cfg.seed, workers=True)

    method = build_method(plain(cfg.backbone), plain(cfg.method))
    method.attach_benchmarks(
        build_benchmarks(benchmark_configs(cfg)),
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.eval.num_workers,
        cache=GalleryCache(cfg.paths.cache_dir) if cfg.eval.cache_gallery else None,
    )
    loggers = build_loggers(cfg)
    for lg in loggers:
        lg.log_hyperparams(plain(cfg))

    best = None
    if method.trains:
        ckpt_cfg = cfg.checkpoint
        checkpoint = ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="epoch_{epoch:03d}",
            auto_insert_metric_name=False,
            save_last=True,
            monitor=ckpt_cfg.monitor,
            mode=ckpt_cfg.mode,
            save_top_k=1 if ckpt_cfg.monitor else 0,
            every_n_epochs=ckpt_cfg.every_n_epochs,
        )
        callbacks = [checkpoint] + ([LearningRateMonitor(logging_interval="step")] if loggers else [])
        trainer = build_trainer(cfg, run_dir, callbacks, loggers)
        loader = build_train_loader(
            parse_config(DataConfig, plain(cfg.data)), method.encoder.image_transform, seed=cfg.seed
        )
        resume = cfg.get("resume")
        if resume == "last":
            resume = (
                str(run_dir / "checkpoints" / "last.ckpt")
                if (run_dir / "checkpoints" / "last.ckpt").is_file()
                else None
            )
        trainer.fit(method, train_dataloaders=loader, ckpt_path=resume)
        best = checkpoint.best_model_path or None if ckpt_cfg.monitor else None
    else:
        log.info("method %s has nothing to train; evaluating only", cfg.method.name)
        trainer = build_trainer(cfg, run_dir, [], loggers)

    metrics: dict[str, float] = {}
    if method.benchmarks:
        trainer.test(method, ckpt_path=best, verbose=False)
        metrics = flat_metrics(method.eval_results, prefix_benchmark=True)
    if trainer.global_rank == 0:
        write_run_info(run_dir, cfg, "train", metrics)
        print_metrics(f"{cfg.get('label') or cfg.method.name} ({cfg.backbone.name}) -> {run_dir}", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
