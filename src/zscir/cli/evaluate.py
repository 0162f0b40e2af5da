"""``zscir-eval``: evaluate a method — zero-shot, from a checkpoint, or from a training run directory.

    zscir-eval method=sum backbone=clip_vit_l14 benchmark=cirr benchmark.root=/data/CIRR benchmark.split=test1
    zscir-eval method=lincir backbone=hf_clip_vit_l14 ckpt_path=/runs/x/checkpoints/last.ckpt benchmark=circo
    zscir-eval run_dir=outputs/train/lincir/2026-11-23_10-00-00_ab12cd benchmark=synthetic_circo

Writes ``metrics.json`` (flat, percent), ``features.npz`` and, for unlabelled test splits, the server
submission files into the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from zscir.backbones import backbone_fingerprint
from zscir.cli.common import (
    CONF_DIR,
    benchmark_configs,
    build_benchmarks,
    build_loggers,
    build_trainer,
    ensure_backbone,
    ensure_synthetic_world,
    flat_metrics,
    plain,
    print_metrics,
    validate_config,
    write_features,
    write_run_info,
    write_submissions,
)
from zscir.methods import RetrievalMethod, build_method
from zscir.retrieval.cache import GalleryCache

log = logging.getLogger("zscir")


def load_run(run_dir: str | Path) -> tuple[DictConfig, Path | None]:
    """The saved config of a training run and its best (else last) checkpoint, if it has one."""
    run_dir = Path(run_dir).expanduser()
    config = run_dir / "resolved_config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a zscir run directory (no resolved_config.yaml)")
    ckpts = run_dir / "checkpoints"
    best = sorted(p for p in ckpts.glob("epoch_*.ckpt")) if ckpts.is_dir() else []
    ckpt = best[-1] if best else (ckpts / "last.ckpt" if (ckpts / "last.ckpt").is_file() else None)
    return OmegaConf.load(config), ckpt


def load_checkpoint(method: RetrievalMethod, path: str | Path) -> None:
    """Load a zscir checkpoint into ``method`` after checking it was trained with this method and backbone."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    method.on_load_checkpoint(checkpoint)
    method.load_state_dict(checkpoint["state_dict"])
    stat = path.stat()
    method.weights_tag = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate one method on ``benchmark`` (or ``eval_benchmarks``); returns the metrics."""
    if cfg.get("run_dir"):
        saved, ckpt = load_run(cfg.run_dir)
        with open_dict(cfg):
            cfg.method, cfg.backbone = saved.method, saved.backbone
            cfg.label = cfg.label or saved.get("label")
            cfg.ckpt_path = cfg.ckpt_path or (str(ckpt) if ckpt else None)
    validate_config(cfg, "eval")
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_synthetic_world(cfg)
    ensure_backbone(cfg)
    torch.manual_seed(cfg.seed)

    method = build_method(plain(cfg.backbone), plain(cfg.method))
    if cfg.get("ckpt_path"):
        load_checkpoint(method, cfg.ckpt_path)
    benchmarks = build_benchmarks(benchmark_configs(cfg))
    if not benchmarks:
        raise ValueError("nothing to evaluate: set benchmark=<name> or eval_benchmarks=[...]")
    method.attach_benchmarks(
        benchmarks,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.eval.num_workers,
        cache=GalleryCache(cfg.paths.cache_dir) if cfg.eval.cache_gallery else None,
    )
    trainer = build_trainer(cfg, run_dir, [], build_loggers(cfg))
    trainer.test(method, verbose=False)
    metrics = flat_metrics(method.eval_results, prefix_benchmark=len(benchmarks) > 1)
    if trainer.global_rank == 0:
        for bench in benchmarks:
            feats = method.eval_results[bench.name]["features"]
            if feats is None:
                continue
            if cfg.save_features:
                name = "features.npz" if len(benchmarks) == 1 else f"features_{bench.name}.npz"
                write_features(run_dir / name, bench, *feats)
            if bench.split in bench.submission_splits:
                for path in write_submissions(run_dir, bench, *feats):
                    log.info("wrote submission file %s", path)
        write_run_info(run_dir, cfg, "eval", metrics)
        print_metrics(
            f"{cfg.get('label') or cfg.method.name} ({cfg.backbone.name}, {backbone_fingerprint(plain(cfg.backbone))[:8]}) -> {run_dir}",
            metrics,
        )
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
