"""Application plumbing shared by the entry points: config location and validation, run directories,
benchmarks from configs, first-use provisioning (synthetic world, synthetic-world backbone), trainer and
loggers, and writing results. The library (``zscir.backbones``, ``methods``, ``data``, ``metrics``,
``retrieval``) never imports this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from zscir.backbones import BackboneLoadError
from zscir.backbones.errors import missing_checkpoint_message
from zscir.cli.safe_loggers import start_failsafe
from zscir.data.benchmarks import Benchmark, build_benchmark
from zscir.data.loaders import DataConfig
from zscir.data.synthetic import SynthConfig, generate_world, world_manifest
from zscir.methods import method_class, parse_config
from zscir.utils.io import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger("zscir")

REPO_ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = Path(os.environ.get("ZSCIR_CONF_DIR", REPO_ROOT / "conf"))


def _root() -> str:
    return os.environ.get("ZSCIR_ROOT", str(REPO_ROOT))


def _launcher_id() -> str | None:
    """An id that every process of one multi-process launch shares, from the environment alone (the
    run directory is named before any process group exists): ``$ZSCIR_RUN_ID``; srun with several
    tasks: ``slurm-<job>-<step>``; torchrun: ``torchrun-<rdzv id>``, or without ``--rdzv-id``/
    ``--standalone`` ``torchrun-<host>-<agent pid>-<agent start>`` (the local workers' common parent;
    nodes of a multi-node run need ``--rdzv-id`` or ``$ZSCIR_RUN_ID`` to agree). None for a
    single-process run."""
    if os.environ.get("ZSCIR_RUN_ID"):
        return os.environ["ZSCIR_RUN_ID"]
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and os.environ.get("SLURM_JOB_ID"):
        step = os.environ.get("SLURM_STEP_ID")
        return f"slurm-{os.environ['SLURM_JOB_ID']}" + (f"-{step}" if step else "")
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rdzv = os.environ["TORCHELASTIC_RUN_ID"]
        if rdzv and rdzv != "none":
            return f"torchrun-{rdzv[:12]}"
        return f"torchrun-{socket.gethostname()}-{os.getppid()}-{_process_start(os.getppid())}"
    return None


def _process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from /proc; else today's date), so that a
    recycled agent pid does not name an old run's directory."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return f"{datetime.now():%Y%m%d}"


def _run_stamp() -> str:
    """The last part of a run (or sweep) directory: ``<date>_<time>_<6 hex>``, or the launcher's id
    when several processes must agree on it. A timestamp alone is not enough: jobs started in the same
    second collide, and DDP ranks may stamp different seconds (STYLE.md §5, pitfall 2)."""
    return _launcher_id() or f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{uuid.uuid4().hex[:6]}"


def _run_id() -> str:
    """One id per run, shared by every process of it (kept for configs that still use ``${run_id:}``)."""
    for var in ("ZSCIR_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if os.environ.get(var) and os.environ[var] != "none":
            return os.environ[var][:12]
    return uuid.uuid4().hex[:6]


def _from_run(run_dir: str | None, key: str, default: Any = None) -> Any:
    """``key`` of the training run ``run_dir``'s saved config (``default`` when there is none), so an
    evaluation of a run is filed under that run's method, backbone and seed."""
    if not run_dir:
        return default
    saved = Path(str(run_dir)).expanduser() / "resolved_config.yaml"
    if not saved.is_file():
        return default  # evaluate() reports the bad run_dir with a clear message
    return OmegaConf.select(OmegaConf.load(saved), key, default=default)


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
        OmegaConf.register_new_resolver("run_stamp", _run_stamp, use_cache=True)
        OmegaConf.register_new_resolver("from_run", _from_run)
        OmegaConf.register_new_resolver("cpu_precision", _cpu_precision, use_cache=True)


register_resolvers()


# ---- schemas --------------------------------------------------------------------------------------
@dataclass
class BackboneConfig:
    """An encoder: ``kind`` (open_clip | hf_clip | hf_blip | lavis_blip), ``model`` (name, hub id, local dir
    or tiny). The BLIP kinds also take the text and image options of ``build_hf_blip``/``build_lavis_blip``
    (None: the kind's default)."""

    name: str = "???"
    kind: str = "open_clip"
    model: str = "???"
    pretrained: str | None = None
    checkpoint: str | None = None
    init_seed: int = 0
    cache_dir: str | None = None
    #: experiment config that produces ``checkpoint`` when it is missing (the synthetic-world CLIP)
    train_recipe: str | None = None
    #: BLIP only (None: the kind's default): BERT tokenizer folder or cached hub name (lavis_blip), input
    #: resolution (lavis_blip), text length, whether padding is masked out of the text attention, caption
    #: preprocessing (none | blip_caption)
    tokenizer: str | None = None
    image_size: int | None = None
    context_length: int | None = None
    text_attention_mask: bool | None = None
    caption_preprocess: str | None = None
    #: image preprocessing in front of the backbone's own: default | targetpad (pad to targetpad_ratio
    #: first, as SEARLE does; zscir.backbones.transforms)
    transform: str = "default"
    targetpad_ratio: float = 1.25


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
    #: also write last.ckpt every N optimizer steps (0: only at epoch ends and on SIGTERM); what a
    #: killed run can resume from mid-epoch
    every_n_train_steps: int = 0


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
        "optimized_metric",
        "visualize",
        "visualize_k",
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
        "visualize",
        "visualize_k",
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
    check_trainer_keys(plain(cfg.trainer))
    parse_config(SynthConfig, plain(cfg.synth))
    if task == "train":
        parse_config(DataConfig, plain(cfg.data))
        parse_config(CheckpointConfig, plain(cfg.checkpoint))
    for bench in benchmark_configs(cfg):
        parse_config(BenchmarkConfig, {k: bench[k] for k in ("kind", "root", "split", "name") if k in bench})


def check_trainer_keys(trainer_cfg: dict) -> None:
    """``trainer`` takes any ``lightning.Trainer`` keyword; a typo fails now, with the likely intended name."""
    import difflib
    import inspect

    known = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(trainer_cfg) - known)
    if unknown:
        hints = [
            f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
            for k in unknown
        ]
        raise ValueError(
            f"unknown trainer option(s) {', '.join(hints)}: the trainer group takes lightning.Trainer arguments"
        )


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
    """Generate the synthetic world if anything this run reads lives under it and it is not there yet,
    or was generated with other ``synth`` settings than this run's (it is then regenerated)."""
    root = Path(cfg.paths.synthetic_dir)
    wanted = [b.get("root", "") for b in benchmark_configs(cfg)]
    if cfg.get("data"):
        wanted.append(str(cfg.data.path))
    if not any(str(Path(w)).startswith(str(root)) for w in wanted):
        return
    synth = parse_config(SynthConfig, plain(cfg.synth))
    marker = root / "world.json"
    if not marker.is_file():
        log.info("generating the synthetic shapes world in %s (first use)", root)
    elif json.loads(marker.read_text()) != world_manifest(synth):
        log.warning(
            "the synthetic world in %s was generated with other synth settings; regenerating it", root
        )
    generate_world(root, synth)  # reuses a matching world (adding files newer versions write)


def ensure_backbone(cfg: DictConfig) -> None:
    """Train the backbone's recipe when its checkpoint is missing (the synthetic-world CLIP on first use),
    or when the recipe trained it on another synthetic world than this run's ``synth`` settings describe.

    What a recipe-trained checkpoint was trained from is recorded beside it
    (``<checkpoint>.zscir-recipe.json``: the recipe and the world's manifest); a checkpoint without
    that record (weights from elsewhere) is used as it is.
    """
    checkpoint, recipe = cfg.backbone.get("checkpoint"), cfg.backbone.get("train_recipe")
    if not checkpoint:
        return
    if not recipe:
        if not Path(checkpoint).is_file():
            raise BackboneLoadError(missing_checkpoint_message(cfg.backbone.kind, checkpoint))
        return
    source = {"recipe": recipe, "world": world_manifest(parse_config(SynthConfig, plain(cfg.synth)))}
    record = Path(f"{checkpoint}.zscir-recipe.json")
    if Path(checkpoint).is_file():
        if not record.is_file() or json.loads(record.read_text()) == source:
            return
        log.warning(
            "backbone %s: %s was trained on another synthetic world than this run's synth settings "
            "describe; retraining it with experiment=%s",
            cfg.backbone.name,
            checkpoint,
            recipe,
        )
    else:
        log.info(
            "backbone %s: %s is missing; training it with experiment=%s (first use)",
            cfg.backbone.name,
            checkpoint,
            recipe,
        )
    from zscir.cli.train import train

    recipe_cfg = compose_config(
        "train", [f"experiment={recipe}", f"trainer.accelerator={cfg.trainer.accelerator}"]
    )
    with open_dict(recipe_cfg):
        recipe_cfg.paths = cfg.paths
        recipe_cfg.synth = cfg.synth
        # one run directory per source: an interrupted training continues (resume=last) instead of
        # starting over, and a training for another world never resumes this one's
        digest = hashlib.sha1(json.dumps(source, sort_keys=True).encode()).hexdigest()[:12]
        recipe_cfg.paths.run_dir = str(Path(cfg.paths.output_dir) / "backbones" / cfg.backbone.name / digest)
        recipe_cfg.method.export_backbone = checkpoint
        recipe_cfg.resume = "last"
    train(recipe_cfg)  # the old record stays until then: an interrupted retraining is retried next time
    if not Path(checkpoint).is_file():
        raise BackboneLoadError(f"experiment={recipe} finished but did not write {checkpoint}")
    atomic_write_json(record, source)


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, inside or outside a running Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)


# ---- launch -------------------------------------------------------------------------------------
def device_count(trainer: dict) -> int:
    """Processes per node that ``trainer`` (Trainer kwargs) asks for (``auto``/-1: what is visible)."""
    devices, accelerator = trainer.get("devices", "auto"), str(trainer.get("accelerator", "auto"))
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if str(devices) in ("auto", "-1"):
        import torch

        gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return torch.cuda.device_count() if gpu else 1
    return int(devices)


def relaunches_script(trainer: dict) -> bool:
    """Whether Lightning would start the other ranks by re-running this command line (``sys.argv``):
    a multi-device ``ddp``-style strategy not launched externally. ``ddp_spawn``/``ddp_fork`` start
    their workers in-process and are safe."""
    strategy = str(trainer.get("strategy", "auto")).lower()
    if any(s in strategy for s in ("spawn", "fork", "notebook")) or strategy in ("dp", "single_device"):
        return False
    return device_count(trainer) * int(trainer.get("num_nodes") or 1) > 1


def check_launch(cfg: DictConfig, multirun: bool | None = None) -> None:
    """Refuse a Hydra multirun job that would be multi-process (STYLE.md §5, pitfall 1).

    Lightning starts DDP ranks > 0 by re-running ``sys.argv``; inside ``-m`` that is the whole sweep
    again (Lightning #11300, Hydra #2070): hangs, duplicated jobs, one W&B run for several. And a sweep
    started under torchrun/srun would run every job in every process. Sweep jobs are therefore
    single-process; a multi-GPU run is a single ``zscir-train`` launched by torchrun or srun.
    """
    from zscir.cli.tracking import hydra_multirun

    if not (hydra_multirun() if multirun is None else multirun):
        return
    world = max(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")))
    if world > 1:
        raise RuntimeError(
            f"Hydra multirun (-m) inside a {world}-process launch (torchrun/srun): every process would run "
            "the whole sweep. Start the sweep as one process (each job then uses one device), or launch "
            "each multi-GPU run as a single `zscir-train trainer=ddp ...` under torchrun/srun."
        )
    trainer = plain(cfg.trainer)
    if relaunches_script(trainer):
        raise RuntimeError(
            f"Hydra multirun (-m) with trainer.strategy={trainer.get('strategy')} on "
            f"{device_count(trainer)} devices: Lightning would start the other ranks by re-running this "
            "command line, i.e. the whole sweep (Lightning #11300, Hydra #2070). Use one device per sweep "
            "job (trainer.devices=1), or trainer.strategy=ddp_spawn, or launch the multi-GPU run as a "
            "single `zscir-train trainer=ddp ...` under torchrun/srun (README: Multi-GPU)."
        )


# ---- trainer --------------------------------------------------------------------------------------
def build_loggers(cfg: DictConfig) -> list:
    """The configured loggers, started now and guarded: one that cannot start (W&B unreachable, not
    logged in) is dropped with a warning, and one that fails later is disabled with a warning; neither
    ever fails the run (see ``zscir.cli.safe_loggers``). W&B gets this run's identity (see
    ``zscir.cli.tracking``)."""
    from zscir.cli.tracking import wandb_settings

    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None:
            continue
        try:
            conf = plain(conf)
            if str(conf.get("_target_", "")).endswith("WandbLogger"):
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


def wandb_examples(cfg: DictConfig) -> int:
    """Retrieval examples per benchmark to log to W&B (``logger.wandb.examples``; 0 without W&B)."""
    return int(OmegaConf.select(cfg, "logger.wandb.examples", default=0) or 0)


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


# ---- results --------------------------------------------------------------------------------------
#: what an evaluation leaves in its run directory (submission files come with metrics.json or features)
RESULT_FILES = ("metrics.json", "run_info.json", "features*.npz", "retrievals")


def refuse_existing_results(run_dir: Path) -> None:
    """Refuse to evaluate into a run directory that already holds results: they are never replaced.

    Under a fixed run id (``$ZSCIR_RUN_ID``, srun, torchrun) every ``zscir-eval`` of one method names the
    same directory, so a second evaluation would otherwise overwrite the first one's ``metrics.json``.
    Every rank checks (the files appear only when rank 0 finishes), so all refuse together.

    Raises:
        FileExistsError: naming the results found, what produced them, and how to choose another place.
    """
    found = sorted(p for pattern in RESULT_FILES for p in run_dir.glob(pattern))
    if not found:
        return
    info_file = run_dir / "run_info.json"
    what = ""
    if info_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            info = json.loads(info_file.read_text())
            what = f" (a {info.get('task')} run of {info.get('label')} on {', '.join(info.get('benchmarks') or [])})"
    launcher = _launcher_id()
    why = (
        f" Every zscir-eval of this method under the run id {launcher!r} ($ZSCIR_RUN_ID, or the srun/torchrun "
        "launch) lands in this directory."
        if launcher and run_dir.name == launcher
        else ""
    )
    raise FileExistsError(
        f"{run_dir} already holds results{what}: {', '.join(p.name for p in found)}; zscir-eval never replaces "
        f"them.{why} Evaluate into another directory: hydra.run.dir=<dir> (e.g. {run_dir}-<benchmark>)"
        f"{' or another ZSCIR_RUN_ID' if why else ''}; or move or delete {run_dir}."
    )


def flat_metrics(eval_results: dict[str, dict], prefix_benchmark: bool) -> dict[str, float]:
    out = {}
    for bench, result in eval_results.items():
        for metric, value in result["metrics"].items():
            out[f"{bench}/{metric}" if prefix_benchmark else metric] = float(value)
    return out


def metrics_after_test(method: Any, trainer: L.Trainer, prefix_benchmark: bool) -> dict[str, float]:
    """Metrics of the last ``trainer.test``. With ``ddp_spawn``/``ddp_fork`` the evaluation ran in
    worker processes, so this process's ``method.eval_results`` is empty: read the logged
    ``test/<benchmark>/<metric>`` values Lightning brings back instead."""
    if method.eval_results:
        return flat_metrics(method.eval_results, prefix_benchmark)
    out = {}
    for key, value in trainer.callback_metrics.items():
        if key.startswith("test/"):
            name = key[len("test/") :]
            out[name if prefix_benchmark else name.split("/", 1)[1]] = float(value)
    return out


def is_global_zero() -> bool:
    """Rank 0 before a Trainer exists (Lightning reads the launcher's rank variables at import)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def write_resolved_config(run_dir: Path, cfg: DictConfig) -> None:
    """Saved at the start of a run, so a run that is still going or crashed can be re-evaluated."""
    if is_global_zero():
        atomic_write_text(run_dir / "resolved_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def write_run_info(
    run_dir: Path, cfg: DictConfig, task: str, metrics: dict[str, float], checkpoint: Path | None = None
) -> None:
    """``run_info.json``, ``metrics.json`` and ``resolved_config.yaml``; ``checkpoint``: the weights
    the metrics were computed with (``zscir-eval run_dir=`` reloads it)."""
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
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        info["checkpoint"] = str(
            checkpoint.relative_to(run_dir) if checkpoint.is_relative_to(run_dir) else checkpoint
        )
    atomic_write_json(run_dir / "run_info.json", info)
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_text(run_dir / "resolved_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def write_examples(
    cfg: DictConfig, method: Any, benchmarks: list[Benchmark], run_dir: Path, loggers: list
) -> list[Path]:
    """Retrieval examples after an evaluation (rank 0): ``visualize=N`` PNG grids per benchmark under
    ``<run_dir>/retrievals/<benchmark>/``, and ``logger.wandb.examples`` of them as a W&B table."""
    from zscir.cli.tracking import is_wandb, log_wandb_examples
    from zscir.retrieval.visualize import pick_queries, retrieve, write_grids

    n_png, k = int(cfg.get("visualize") or 0), int(cfg.get("visualize_k") or 5)
    wandb_loggers = [lg for lg in loggers if is_wandb(lg)]
    n_wandb = wandb_examples(cfg) if wandb_loggers else 0
    if not (n_png or n_wandb):
        return []
    paths = []
    for bench in benchmarks:
        feats = method.eval_results.get(bench.name, {}).get("features")
        if feats is None:
            log.warning("no features of %s in this process (ddp_spawn?): no retrieval examples", bench.name)
            continue
        for_png, for_wandb = (
            pick_queries(len(bench.queries), n_png),
            pick_queries(len(bench.queries), n_wandb),
        )
        items = {it.query_index: it for it in retrieve(bench, *feats, sorted({*for_png, *for_wandb}), k)}
        if for_png:
            paths += write_grids(bench, [items[i] for i in for_png], run_dir / "retrievals" / bench.name, k)
        for lg in wandb_loggers:
            log_wandb_examples(lg, bench, [items[i] for i in for_wandb], k)
    if paths:
        log.info("wrote %d retrieval grids under %s", len(paths), run_dir / "retrievals")
    return paths


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
