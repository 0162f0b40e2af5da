"""What a run leaves behind: results (refused when already there), metrics, run info, features,
submission files and retrieval examples."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf

from zscir.benchmarks import Benchmark
from zscir.cli.config import benchmark_configs
from zscir.cli.launch import is_global_zero, launcher_id
from zscir.cli.tracking import is_wandb, log_wandb_examples
from zscir.evaluation.visualize import pick_queries, retrieve, write_grids
from zscir.utils.io import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger("zscir")


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
    launcher = launcher_id()
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


def write_resolved_config(run_dir: Path, cfg: DictConfig) -> None:
    """Saved at the start of a run, so a run that is still going or crashed can be re-evaluated."""
    if is_global_zero():
        atomic_write_text(run_dir / "resolved_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def write_run_info(
    run_dir: Path,
    cfg: DictConfig,
    task: str,
    metrics: dict[str, float],
    checkpoint: Path | None = None,
    benchmarks: list[str] | None = None,
) -> None:
    """``run_info.json``, ``metrics.json`` and ``resolved_config.yaml``; ``checkpoint``: the weights
    the metrics were computed with (``zscir-eval run_dir=`` reloads it); ``benchmarks``: the names of
    what the run evaluated (None: resolved from ``cfg``). ``run_info.json`` also records what the run
    ran on (:func:`environment_record`)."""

    info = {
        "task": task,
        "label": cfg.get("label") or cfg.method.kind,
        "method": cfg.method.kind,
        "backbone": cfg.backbone.name,
        "seed": int(cfg.seed),
        "benchmarks": benchmarks
        if benchmarks is not None
        else [b.get("name") or b["kind"] for b in benchmark_configs(cfg)],
        "tags": list(cfg.get("tags") or []),
        "experiment": cfg.get("experiment_name"),
        **environment_record(),
    }
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        info["checkpoint"] = str(
            checkpoint.relative_to(run_dir) if checkpoint.is_relative_to(run_dir) else checkpoint
        )
    atomic_write_json(run_dir / "run_info.json", info)
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_text(run_dir / "resolved_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


#: distributions whose versions ``run_info.json`` records (None when not installed)
RECORDED_PACKAGES = ("zscir", "torch", "lightning", "open_clip_torch", "transformers", "spacy", "grad-cam")


def environment_record() -> dict[str, Any]:
    """What a run ran on, for ``run_info.json``: ``git`` (``{"commit", "dirty"}`` of the checkout zscir's
    code was imported from; None when that is not a git checkout, e.g. an installed wheel), ``versions``
    (Python and :data:`RECORDED_PACKAGES`), ``devices`` (the visible CUDA devices' names, else the CPU)
    and ``command`` (the command line; for a sweep job also its ``overrides``)."""
    import platform

    import torch

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # with its build's local tag (+cu130, +cpu), which metadata drops
    if torch.cuda.is_available():
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        devices = [f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"]
    record: dict[str, Any] = {
        "git": git_state(Path(__file__).resolve().parent),
        "versions": versions,
        "devices": devices,
        "command": shlex.join(sys.argv),
    }
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        record["overrides"] = list(HydraConfig.get().overrides.task)
    return record


def git_state(where: Path) -> dict[str, Any] | None:
    """``{"commit": <sha>, "dirty": <uncommitted changes to tracked files>}`` of the git checkout holding
    ``where``; None outside a checkout or without git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def wandb_examples(cfg: DictConfig) -> int:
    """Retrieval examples per benchmark to log to W&B (``logger.wandb.examples``; 0 without W&B)."""
    return int(OmegaConf.select(cfg, "logger.wandb.examples", default=0) or 0)


def write_examples(
    cfg: DictConfig, method: Any, benchmarks: list[Benchmark], run_dir: Path, loggers: list
) -> list[Path]:
    """Retrieval examples after an evaluation (rank 0): ``visualize=N`` PNG grids per benchmark under
    ``<run_dir>/retrievals/<benchmark>/``, and ``logger.wandb.examples`` of them as a W&B table."""
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
