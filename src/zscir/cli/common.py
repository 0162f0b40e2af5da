"""Application plumbing shared by the entry points: config location and validation, run directories,
benchmarks from configs, first-use provisioning (synthetic world, synthetic-world backbone), trainer and
loggers, and writing results. The library (``zscir.backbones``, ``methods``, ``data``, ``metrics``,
``retrieval``) never imports this module.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from zscir.backbones import BackboneLoadError
from zscir.data.benchmarks import Benchmark, build_benchmark
from zscir.data.loaders import DataConfig
from zscir.data.synthetic import SynthConfig, generate_world
from zscir.methods import method_class, parse_config
from zscir.utils.io import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger("zscir")

REPO_ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = Path(os.environ.get("ZSCIR_CONF_DIR", REPO_ROOT / "conf"))


def _root() -> str:
    return os.environ.get("ZSCIR_ROOT", str(REPO_ROOT))


def _run_id() -> str:
    """One id per run, shared by every process of it (torchrun sets TORCHELASTIC_RUN_ID; SLURM a job id)."""
    for var in ("ZSCIR_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if os.environ.get(var) and os.environ[var] != "none":
            return os.environ[var][:12]
    return uuid.uuid4().hex[:6]


def _cpu_precision() -> str:
    """bf16 autocast where the CPU has native bf16 units (≈1.3× faster here), else fp32."""
    import torch

    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        supported = False
    return "bf16-mixed" if supported else "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("zscir_root"):
        OmegaConf.register_new_resolver("zscir_root", _root)
        OmegaConf.register_new_resolver("run_id", _run_id, use_cache=True)
        OmegaConf.register_new_resolver("cpu_precision", _cpu_precision, use_cache=True)


register_resolvers()


# ---- schemas --------------------------------------------------------------------------------------
@dataclass
class BackboneConfig:
    """An encoder: ``kind`` (open_clip | hf_clip | hf_blip), ``model`` (name, hub id, local dir or tiny)."""

    name: str = "???"
    kind: str = "open_clip"
    model: str = "???"
    pretrained: str | None = None
    checkpoint: str | None = None
    init_seed: int = 0
    cache_dir: str | None = None
    #: experiment config that produces ``checkpoint`` when it is missing (the synthetic-world CLIP)
    train_recipe: str | None = None


@dataclass
class BenchmarkConfig:
    kind: str = "???"
    root: str = "???"
    split: str = "val"
    name: str | None = None


@dataclass
class CheckpointConfig:
    #: metric that selects the best checkpoint, e.g. ``val/synthetic_cirr/recall@1`` (None: last)
    monitor: str | None = None
    mode: str = "max"
    every_n_epochs: int = 1


@dataclass
class EvalConfig:
    batch_size: int = 128
    num_workers: int = 2
    #: reuse gallery features of an unchanged gallery (see zscir.retrieval.cache)
    cache_gallery: bool = True


ROOT_KEYS = {
    "train": {
        "task_name",
        "tags",
        "seed",
        "label",
        "paths",
        "backbone",
        "method",
        "data",
        "trainer",
        "logger",
        "eval_benchmarks",
        "eval",
        "checkpoint",
        "resume",
        "synth",
        "experiment_name",
        "hydra",
    },
    "eval": {
        "task_name",
        "tags",
        "seed",
        "label",
        "paths",
        "backbone",
        "method",
        "trainer",
        "logger",
        "benchmark",
        "eval_benchmarks",
        "eval",
        "ckpt_path",
        "run_dir",
        "synth",
        "experiment_name",
        "save_features",
        "hydra",
    },
}


def validate_config(cfg: DictConfig, task: str) -> None:
    """Fail at start-up, by name, on any unknown or mistyped key in any group."""
    unknown = set(cfg.keys()) - ROOT_KEYS[task]
    if unknown:
        raise ValueError(
            f"unknown top-level config key(s) {sorted(unknown)}; allowed: {sorted(ROOT_KEYS[task])}"
        )
    parse_config(BackboneConfig, plain(cfg.backbone))
    parse_config(method_class(cfg.method.name).Config, plain(cfg.method))
    parse_config(EvalConfig, plain(cfg.eval))
    parse_config(SynthConfig, plain(cfg.synth))
    if task == "train":
        parse_config(DataConfig, plain(cfg.data))
        parse_config(CheckpointConfig, plain(cfg.checkpoint))
    for bench in benchmark_configs(cfg):
        parse_config(BenchmarkConfig, {k: bench[k] for k in ("kind", "root", "split", "name") if k in bench})


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# ---- benchmarks -----------------------------------------------------------------------------------
def benchmark_configs(cfg: DictConfig) -> list[dict]:
    """The benchmark configs a run evaluates: ``eval_benchmarks`` (names or dicts) when given, else ``benchmark``."""
    if not cfg.get("eval_benchmarks") and cfg.get("benchmark"):
        return [plain(cfg.benchmark)]
    out = []
    for entry in cfg.get("eval_benchmarks") or []:
        if isinstance(entry, str):
            file = CONF_DIR / "benchmark" / f"{entry}.yaml"
            if not file.is_file():
                known = sorted(p.stem for p in (CONF_DIR / "benchmark").glob("*.yaml"))
                raise ValueError(f"unknown benchmark {entry!r} in eval_benchmarks; known: {known}")
            node = OmegaConf.merge({"paths": cfg.paths}, {"benchmark": OmegaConf.load(file)})
            out.append(plain(node.benchmark))
        else:
            out.append(plain(entry))
    return out


def build_benchmarks(configs: list[dict]) -> list[Benchmark]:
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


# ---- first-use provisioning -----------------------------------------------------------------------
def ensure_synthetic_world(cfg: DictConfig) -> None:
    """Generate the synthetic world if anything this run reads lives under it and it is not there yet."""
    root = Path(cfg.paths.synthetic_dir)
    wanted = [b.get("root", "") for b in benchmark_configs(cfg)]
    if cfg.get("data"):
        wanted.append(str(cfg.data.path))
    if any(str(Path(w)).startswith(str(root)) for w in wanted) and not (root / "world.json").is_file():
        log.info("generating the synthetic shapes world in %s (first use)", root)
        generate_world(root, parse_config(SynthConfig, plain(cfg.synth)))


def ensure_backbone(cfg: DictConfig) -> None:
    """Train the backbone's recipe when its checkpoint is missing (the synthetic-world CLIP on first use)."""
    checkpoint, recipe = cfg.backbone.get("checkpoint"), cfg.backbone.get("train_recipe")
    if not checkpoint or Path(checkpoint).is_file():
        return
    if not recipe:
        raise BackboneLoadError(f"backbone checkpoint {checkpoint} does not exist")
    from zscir.cli.train import train

    log.info(
        "backbone %s: %s is missing; training it with experiment=%s (first use)",
        cfg.backbone.name,
        checkpoint,
        recipe,
    )
    recipe_cfg = compose_config(
        "train", [f"experiment={recipe}", f"trainer.accelerator={cfg.trainer.accelerator}"]
    )
    with open_dict(recipe_cfg):
        recipe_cfg.paths = cfg.paths
        recipe_cfg.synth = cfg.synth
        recipe_cfg.paths.run_dir = str(Path(cfg.paths.output_dir) / "backbones" / cfg.backbone.name)
        recipe_cfg.method.export_backbone = checkpoint
    train(recipe_cfg)
    if not Path(checkpoint).is_file():
        raise BackboneLoadError(f"experiment={recipe} finished but did not write {checkpoint}")


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, inside or outside a running Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)


# ---- trainer --------------------------------------------------------------------------------------
def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None:
            continue
        try:
            loggers.append(instantiate(conf))
        except Exception as err:  # e.g. W&B unreachable or not logged in: never fail the run for a logger
            log.warning(
                "logger %s could not start (%s: %s); continuing without it", name, type(err).__name__, err
            )
    return loggers


def build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list | None = None, loggers: list | None = None
) -> L.Trainer:
    kwargs = plain(cfg.trainer)
    return L.Trainer(
        default_root_dir=str(run_dir), callbacks=callbacks or [], logger=loggers or False, **kwargs
    )


# ---- results --------------------------------------------------------------------------------------
def flat_metrics(eval_results: dict[str, dict], prefix_benchmark: bool) -> dict[str, float]:
    out = {}
    for bench, result in eval_results.items():
        for metric, value in result["metrics"].items():
            out[f"{bench}/{metric}" if prefix_benchmark else metric] = float(value)
    return out


def write_run_info(run_dir: Path, cfg: DictConfig, task: str, metrics: dict[str, float]) -> None:
    info = {
        "task": task,
        "label": cfg.get("label") or cfg.method.name,
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "seed": int(cfg.seed),
        "benchmarks": [b.get("name") or b["kind"] for b in benchmark_configs(cfg)],
        "tags": list(cfg.get("tags") or []),
        "experiment": cfg.get("experiment_name"),
    }
    atomic_write_json(run_dir / "run_info.json", info)
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_text(run_dir / "resolved_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def write_features(path: Path, benchmark: Benchmark, query_feats: Any, gallery_feats: Any) -> None:
    """``features.npz``: ``query_ids``/``query_feats``/``gallery_ids``/``gallery_feats`` (GeneCIS:
    ``candidate_ids``/``candidate_feats`` instead of the gallery); ``zscir-score`` re-scores it."""
    arrays = benchmark.feature_arrays(query_feats, gallery_feats)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def write_submissions(
    run_dir: Path, benchmark: Benchmark, query_feats: Any, gallery_feats: Any
) -> list[Path]:
    return [
        atomic_write_json(run_dir / name, obj, indent=None)
        for name, obj in benchmark.submission(query_feats, gallery_feats).items()
    ]


def print_metrics(title: str, metrics: dict[str, float]) -> None:
    width = max((len(k) for k in metrics), default=10)
    lines = [title] + [f"  {k:<{width}}  {v:7.2f}" for k, v in metrics.items()]
    print("\n".join(lines), flush=True)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
