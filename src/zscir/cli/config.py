"""Configuration: where the configs are, the resolvers they use, the schema of every group, validation,
composition from Python, and the benchmarks a run evaluates (resolved once, from the composed config)."""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from zscir.api import PACKAGE_CONF
from zscir.benchmarks import Benchmark
from zscir.cli.launch import run_stamp
from zscir.data.loaders import DataConfig
from zscir.data.synthetic import SynthConfig
from zscir.methods import check_method_keys, method_class, parse_config, renamed_name_message
from zscir.utils.run_config import RUN_CONFIG, load_run_config

#: the configs shipped inside the package (``zscir/conf``), or ``$ZSCIR_CONF_DIR``
CONF_DIR = Path(os.environ.get("ZSCIR_CONF_DIR", PACKAGE_CONF))


def _root() -> str:
    """``paths.root_dir``: ``$ZSCIR_ROOT``, else the current directory (the repository root for ``make``)."""
    return os.environ.get("ZSCIR_ROOT") or os.getcwd()


def user_config_dir() -> Path:
    """The per-user config folder searched after the package's own configs: ``$ZSCIR_CONFIG_DIR``, else
    ``$XDG_CONFIG_HOME/zscir`` (``~/.config/zscir``). Its ``local/default.yaml``, when present, is merged
    last into every run (per-machine paths); its other files add config options (``backbone/mine.yaml``)."""
    if os.environ.get("ZSCIR_CONFIG_DIR"):
        return Path(os.environ["ZSCIR_CONFIG_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser() / "zscir"


def _searchpath() -> str:
    """``hydra.searchpath`` entry of the primary configs: the user config folder when it exists (a missing
    one would make Hydra warn on every run), else the package configs again (searching them twice changes
    nothing)."""
    folder = user_config_dir()
    return f"file://{folder.resolve() if folder.is_dir() else CONF_DIR}"


def _from_run(run_dir: str | None, key: str, default: Any = None) -> Any:
    """``key`` of the training run ``run_dir``'s saved config (``default`` when there is none), so an
    evaluation of a run is filed under that run's method, backbone and seed."""
    if not run_dir:
        return default
    saved = Path(str(run_dir)).expanduser()
    if not (saved / RUN_CONFIG).is_file():
        return default  # evaluate() reports the bad run_dir with a clear message
    return OmegaConf.select(load_run_config(saved), key, default=default)


def _cpu_precision() -> str:
    """bf16 autocast where the CPU has native bf16 units (≈1.3× faster here), else fp32."""
    import torch

    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        supported = False
    return "bf16-mixed" if supported else "32-true"


def register_resolvers() -> None:
    """``${zscir_root:}``, ``${zscir_searchpath:}``, ``${run_stamp:}``, ``${from_run:dir,key,default}``,
    ``${cpu_precision:}``."""
    if not OmegaConf.has_resolver("zscir_root"):
        OmegaConf.register_new_resolver("zscir_root", _root)
        OmegaConf.register_new_resolver("zscir_searchpath", _searchpath)
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
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
    #: open_clip only: the MLP activation the weights were trained with (true: QuickGELU, as OpenAI's
    #: CLIP; false: GELU; null: the pretrained tag's, else the architecture's)
    quick_gelu: bool | None = None
    #: hf_clip / hf_blip: the hub revision (branch, tag or commit) of ``model``; part of the fingerprint
    revision: str | None = None
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


#: top-level keys of both root configs (train.yaml, eval.yaml)
_COMMON_ROOT_KEYS = {
    "backbone",
    "benchmarks",
    "eval",
    "eval_benchmarks",
    "experiment_name",
    "hydra",
    "label",
    "logger",
    "method",
    "paper",
    "paths",
    "seed",
    "synth",
    "tags",
    "task_name",
    "trainer",
    "visualize",
    "visualize_k",
}
#: training-only keys; an experiment file sets some of them, and zscir-eval accepts and ignores them there
#: (``zscir-eval experiment=<x>`` evaluates that experiment's checkpoint)
TRAIN_ONLY_KEYS = {"checkpoint", "data", "optimized_metric", "resume"}
ROOT_KEYS = {
    "train": _COMMON_ROOT_KEYS | TRAIN_ONLY_KEYS,
    "eval": _COMMON_ROOT_KEYS | TRAIN_ONLY_KEYS | {"benchmark", "ckpt_path", "run_dir", "save_features"},
}


def validate_config(cfg: DictConfig, task: str, benchmarks: list[dict] | None = None) -> None:
    """Fail at start-up, by name, on any unknown or mistyped key in any group (``benchmarks``: the
    resolved benchmark configs; None: resolved from ``cfg``).

    Raises:
        ValueError: an unknown top-level key, trainer option or benchmark; a method selected with
            ``method.name`` (renamed to ``method.kind``); or a key a group's schema lacks or a value of the
            wrong type (an omegaconf ``ValidationError``/``ConfigKeyError``, both ValueErrors
            or KeyErrors naming the key).
    """
    unknown = set(cfg.keys()) - ROOT_KEYS[task]
    if unknown:
        raise ValueError(
            f"unknown top-level config key(s) {sorted(unknown)}; allowed: {sorted(ROOT_KEYS[task])}"
        )
    parse_config(BackboneConfig, plain(cfg.backbone))
    check_method_keys(cfg.method)
    parse_config(method_class(cfg.method.kind).Config, plain(cfg.method))
    parse_config(EvalConfig, plain(cfg.eval))
    check_trainer_keys(plain(cfg.trainer))
    parse_config(SynthConfig, plain(cfg.synth))
    if task == "train":
        parse_config(DataConfig, plain(cfg.data))
        parse_config(CheckpointConfig, plain(cfg.checkpoint))
    benchmarks = benchmark_configs(cfg) if benchmarks is None else benchmarks
    for bench in benchmarks:
        parse_config(BenchmarkConfig, {k: bench[k] for k in ("kind", "root", "split", "name") if k in bench})
    check_loggers(cfg)
    check_backbone_fits(cfg, benchmarks)
    missing = OmegaConf.is_missing(cfg, "optimized_metric")
    if task == "train" and (missing or (optuna_sweep() and not cfg.optimized_metric)):
        names = ", ".join(b.get("name") or b["kind"] for b in benchmarks) or "none"
        raise ValueError(
            "an Optuna search needs the metric it maximises: add optimized_metric=<benchmark>/<metric>, "
            f"e.g. optimized_metric=cirr/recall@1 (this run's benchmarks: {names})"
        )


def check_trainer_keys(trainer_cfg: dict) -> None:
    """``trainer`` takes any ``lightning.Trainer`` keyword; a typo fails now, with the likely intended name."""
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


#: optional packages a logger needs: ``_target_`` class name -> (module, pip line)
LOGGER_PACKAGES = {
    "TensorBoardLogger": ("tensorboard", "pip install 'zscir[tensorboard]'"),
    "WandbLogger": ("wandb", "pip install wandb"),
    "MLFlowLogger": ("mlflow", "pip install mlflow"),
    "CometLogger": ("comet_ml", "pip install comet-ml"),
    "NeptuneLogger": ("neptune", "pip install neptune"),
}


def installed(module: str) -> bool:
    """Whether ``module`` (dotted) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def check_loggers(cfg: DictConfig) -> None:
    """Refuse, at start-up, a requested logger whose class or package cannot be imported (a logger that is
    installed but cannot reach its server is only dropped with a warning, see ``zscir.cli.run``).

    Raises:
        ModuleNotFoundError: naming the logger and the pip line that installs what it needs.
    """
    for name, conf in (cfg.get("logger") or {}).items():
        target = str((conf or {}).get("_target_") or "")
        module, _, cls = target.rpartition(".")
        needed, hint = LOGGER_PACKAGES.get(cls, (None, None))
        if needed is not None and not installed(needed):
            raise ModuleNotFoundError(
                f"logger={name} needs the {needed!r} package, which is not installed: {hint}"
            )
        if module and not installed(module.split(".")[0]):
            raise ModuleNotFoundError(f"logger={name}: its class {target} cannot be imported (no {module!r})")


def check_backbone_fits(cfg: DictConfig, benchmarks: list[dict]) -> None:
    """Refuse the synthetic-world backbone (one with a ``train_recipe``: a toy CLIP trained on the shapes
    world, the default) on a benchmark outside the synthetic world: its numbers would mean nothing.

    Raises:
        ValueError: naming the benchmarks and the ``backbone=`` choice to make.
    """
    if not cfg.backbone.get("train_recipe"):
        return
    world = Path(str(cfg.paths.synthetic_dir)).expanduser().resolve()
    real = [
        b.get("name") or b["kind"]
        for b in benchmarks
        if not Path(str(b.get("root", ""))).expanduser().resolve().is_relative_to(world)
    ]
    if real:
        raise ValueError(
            f"backbone={cfg.backbone.name} is a toy CLIP trained on the synthetic shapes world, but this run "
            f"evaluates {', '.join(real)} (outside {world}). Choose a real backbone, e.g. backbone=clip_vit_l14 "
            "or backbone=hf_clip_vit_l14 (conf/backbone/)."
        )


def optuna_sweep() -> bool:
    """Whether this process is a job of a Hydra sweep run by the Optuna sweeper."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    return "optuna" in str(OmegaConf.select(HydraConfig.get(), "sweeper._target_", default="")).lower()


def check_metric_key(setting: str, value: str, benchmarks: Sequence[Benchmark], prefix: str = "") -> None:
    """Refuse, before any training, a metric ``value`` (``<prefix><benchmark>/<metric>``) that this run
    never computes: ``setting`` (``optimized_metric``, ``checkpoint.monitor``) names it in the message. The
    benchmark must be one of ``benchmarks``, on a split with ground truth, and log that metric.

    Raises:
        ValueError: naming the setting, the benchmarks of this run, their metrics and what to change.
    """
    key = value.removeprefix(prefix)
    name, _, metric = key.partition("/")
    by_name = {b.name: b for b in benchmarks}
    if name not in by_name:
        raise ValueError(
            f"{setting}={value!r} names benchmark {name!r}, which this run does not evaluate "
            f"(eval_benchmarks: {sorted(by_name) or 'none'}); add {name} to eval_benchmarks or use one of those"
        )
    bench = by_name[name]
    if not bench.labelled:
        raise ValueError(
            f"{setting}={value!r}: {name} is evaluated on split {bench.split!r}, which has no ground "
            f"truth; use a labelled split ({name}.split=val)"
        )
    if bench.metric_names and metric not in bench.metric_names:
        raise ValueError(
            f"{setting}={value!r}: {name} logs no metric {metric!r}; its metrics: {list(bench.metric_names)}"
        )


def check_monitor(monitor: str | None, benchmarks: Sequence[Benchmark]) -> None:
    """Refuse a ``checkpoint.monitor`` that the per-epoch validation never logs (Lightning notices only
    when the first epoch ends). ``val/<benchmark>/<metric>`` is checked with :func:`check_metric_key`;
    other monitors (e.g. ``train/loss``) are not."""
    if monitor and monitor.startswith("val/"):
        check_metric_key("checkpoint.monitor", monitor, benchmarks, prefix="val/")


def check_run_metrics(cfg: DictConfig, benchmarks: Sequence[Benchmark], trains: bool) -> None:
    """``optimized_metric`` and (for a method that trains) ``checkpoint.monitor`` against the benchmarks
    this run built; called before any training step."""
    if cfg.get("optimized_metric"):
        check_metric_key("optimized_metric", cfg.optimized_metric, benchmarks)
    if trains and cfg.get("checkpoint"):
        check_monitor(cfg.checkpoint.get("monitor"), benchmarks)


#: Hydra plugins a config group may select: (group, option pattern) -> (module, pip line)
PLUGINS = {
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "pip install 'zscir[optuna]'"),
    ("hydra/launcher", "submitit|slurm|local"): (
        "hydra_plugins.hydra_submitit_launcher",
        "pip install 'zscir[slurm]'",
    ),
}


def check_plugins(overrides: Sequence[str]) -> None:
    """Before Hydra starts: a sweeper or launcher plugin selected on the command line (``hydra/sweeper=``,
    ``hydra/launcher=``) or by a chosen ``hparams_search``/``experiment`` file that is not installed
    ends the program with the pip line that installs it (Hydra alone says only that the option is unknown).

    Raises:
        SystemExit: a selected plugin is missing.
    """
    chosen = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("hydra/sweeper", "hydra/launcher"):
            chosen.append((key, value))
        elif key in ("hparams_search", "experiment") and value:
            path = CONF_DIR / key / f"{value}.yaml"
            text = path.read_text() if path.is_file() else ""
            chosen += re.findall(r"override /(hydra/(?:sweeper|launcher)):\s*(\w+)", text)
    for group, value in chosen:
        for (plugin_group, pattern), (module, hint) in PLUGINS.items():
            if group == plugin_group and re.search(pattern, value) and not installed(module):
                raise SystemExit(f"{group}={value} needs the Hydra plugin {module.split('.')[-1]}: {hint}")


def check_renamed_overrides(overrides: Sequence[str]) -> None:
    """Before Hydra composes: an override of ``method.name`` (renamed to ``method.kind``) is refused with
    the new key (Hydra alone would say only that the key is not in the config).

    Raises:
        ValueError: naming the renamed key and the override to write instead.
    """
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "method.name":
            raise ValueError(renamed_name_message(value or "<method>"))


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# ---- benchmarks -----------------------------------------------------------------------------------
def benchmark_configs(cfg: DictConfig) -> list[dict]:
    """The benchmark configs a run evaluates, resolved: ``eval_benchmarks`` (names of the composed
    ``benchmarks`` group, i.e. of zscir/conf/benchmark/*.yaml with this run's ``benchmarks.<name>.*`` overrides,
    or whole dicts) when given, else ``benchmark``. ``prepare_run`` calls it once per run.

    Raises:
        ValueError: a name that is not a benchmark config.
    """
    if not cfg.get("eval_benchmarks") and cfg.get("benchmark"):
        return [plain(cfg.benchmark)]
    known = cfg.get("benchmarks") or {}
    out = []
    for entry in cfg.get("eval_benchmarks") or []:
        if isinstance(entry, str):
            if entry not in known:
                raise ValueError(f"unknown benchmark {entry!r} in eval_benchmarks; known: {sorted(known)}")
            out.append(plain(known[entry]))
        else:
            out.append(plain(entry))
    return out


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``zscir/conf/<config_name>.yaml`` with overrides, inside or outside a running Hydra app.

    Raises:
        ValueError: an override of ``method.name`` (:func:`check_renamed_overrides`).
    """
    check_renamed_overrides(overrides)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)
