"""Configuration: where the configs are, the resolvers they use, the schema of every group, validation,
composition from Python, and the benchmarks a run evaluates (resolved once, from the composed config)."""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from zscir.api import PACKAGE_CONF
from zscir.cli.launch import run_stamp
from zscir.data.loaders import DataConfig
from zscir.data.synthetic import SynthConfig
from zscir.methods import method_class, parse_config

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
        "benchmarks",
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
        "benchmarks",
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


def validate_config(cfg: DictConfig, task: str, benchmarks: list[dict] | None = None) -> None:
    """Fail at start-up, by name, on any unknown or mistyped key in any group (``benchmarks``: the
    resolved benchmark configs; None: resolved from ``cfg``).

    Raises:
        ValueError: an unknown top-level key, trainer option or benchmark; or a key a group's schema lacks
            or a value of the wrong type (an omegaconf ``ValidationError``/``ConfigKeyError``, both ValueErrors
            or KeyErrors naming the key).
    """
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
    for bench in benchmark_configs(cfg) if benchmarks is None else benchmarks:
        parse_config(BenchmarkConfig, {k: bench[k] for k in ("kind", "root", "split", "name") if k in bench})


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
    """Compose ``zscir/conf/<config_name>.yaml`` with overrides, inside or outside a running Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)
