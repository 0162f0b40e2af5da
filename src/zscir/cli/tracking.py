"""Run identity, W&B plumbing and the throughput callback used by the entry points.

Run identity: a run's name is its run directory's name (``<date>_<time>_<id>``, or the launcher's job
id), prefixed by the sweep's name for multirun jobs. Every process of one run computes the same run
directory (see ``run_stamp`` in ``launch.py`` and Lightning's re-launch, which passes rank 0's
``hydra.run.dir``), and only rank 0 ever creates the W&B run, so the W&B run id and name are rank 0's
run name. A resumed run (same run directory) therefore re-attaches to its W&B run (``resume="allow"``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("zscir")

#: keys of ``logger.wandb`` that are zscir's, not ``WandbLogger``'s
WANDB_OWN_KEYS = ("examples",)


def hydra_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (False outside Hydra, e.g. in tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_name() -> str | None:
    """The sweep directory's name when this is a multirun job. Read from the job's actual output
    directory (``<sweep dir>/<job subdir>``), not by re-resolving ``hydra.sweep.dir``."""
    if not hydra_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir).parent.name


def mark_latest_sweep() -> None:
    """Point ``<sweep dir>/../latest`` at this multirun's sweep directory, so the report command needs no
    timestamp (``zscir-report outputs/train/multirun/latest``). Jobs of one sweep all write the same
    link; it is replaced atomically. Best effort: a file system without symlinks just has no link."""
    if not hydra_multirun():
        return
    from hydra.core.hydra_config import HydraConfig

    sweep = Path(HydraConfig.get().runtime.output_dir).parent
    link, tmp = sweep.parent / "latest", sweep.parent / f".latest.{sweep.name}"
    try:
        if link.is_symlink() and link.readlink() == Path(sweep.name):
            return
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(sweep.name, target_is_directory=True)
        tmp.replace(link)
    except OSError as err:
        log.debug("no 'latest' link for %s (%s)", sweep, err)


def wandb_safe(text: str, limit: int = 64) -> str:
    """``text`` as a valid W&B run id (letters, digits, ``_``, ``-``; at most ``limit`` characters,
    long names keep a hash of the full name so they stay unique)."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "run"
    if len(clean) <= limit:
        return clean
    digest = hashlib.sha1(clean.encode()).hexdigest()[:8]
    return f"{clean[: limit - 9]}-{digest}"


def run_name(run_dir: Path) -> str:
    """This run's name: the run directory's name, prefixed by the sweep's name inside a multirun."""
    sweep = sweep_name()
    return wandb_safe(f"{sweep}_{run_dir.name}" if sweep else run_dir.name)


def wandb_settings(conf: dict, cfg: Any, run_dir: Path, benchmarks: list[str]) -> dict:
    """``WandbLogger`` kwargs from ``logger.wandb`` (zscir's own keys removed), filling what is null:
    id = name = the run name; group = the sweep's name for multirun jobs, else the experiment (or
    method); tags += ``method:``/``backbone:``/``benchmark:`` tags; job_type = the task."""
    conf = dict(conf)
    for key in WANDB_OWN_KEYS:
        conf.pop(key, None)
    name = run_name(run_dir)
    if not conf.get("id") and not conf.get("version"):
        conf["id"] = name
    conf["name"] = conf.get("name") or conf.get("id") or conf.get("version")
    conf["group"] = conf.get("group") or sweep_name() or cfg.get("experiment_name") or cfg.method.kind
    conf["job_type"] = conf.get("job_type") or cfg.get("task_name")
    tags = [str(t) for t in (conf.get("tags") or [])]
    tags += [f"method:{cfg.method.kind}", f"backbone:{cfg.backbone.name}"]
    tags += [f"benchmark:{b}" for b in benchmarks]
    conf["tags"] = [t[:64] for t in dict.fromkeys(tags)]  # W&B caps tags at 64 characters
    conf["save_dir"] = conf.get("save_dir") or str(run_dir)
    return conf


def is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


def finish_wandb(loggers: list, failed: bool = False) -> None:
    """``wandb.finish()`` after every run, so the next job of a multirun (same process) starts its own
    W&B run instead of Lightning re-using this one. Never raises."""
    if not any(is_wandb(lg) for lg in loggers):
        return
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
    except Exception as err:  # a W&B problem never fails a run
        log.warning("wandb.finish failed (%s: %s)", type(err).__name__, err)


def log_wandb_summary(loggers: list, metrics: dict[str, float], run_dir: Path) -> None:
    """Final metrics into the W&B run summary (``final/<benchmark>/<metric>``) and the run directory."""
    for lg in loggers:
        if not is_wandb(lg):
            continue
        try:
            run = lg.experiment
            for key, value in metrics.items():
                run.summary[f"final/{key}"] = value
            run.summary["run_dir"] = str(run_dir)
        except Exception as err:
            log.warning("could not write the W&B summary (%s: %s)", type(err).__name__, err)


def log_wandb_examples(logger: Any, benchmark: Any, items: list, k: int) -> None:
    """Retrieval examples of one benchmark as a ``wandb.Table`` of images, logged as
    ``examples/<benchmark>``: reference, modification text, top-k results (ground truths captioned
    "GT"), the main ground truth and its rank."""
    try:
        import wandb

        columns = ["query_id", "reference", "modification", *[f"top{r}" for r in range(1, k + 1)]]
        columns += ["target", "target_rank"]
        table = wandb.Table(columns=columns)
        for item in items:
            q = item.query
            ref = (
                wandb.Image(benchmark.load_image(q.reference), caption=q.reference.image_id)
                if q.reference
                else None
            )
            results = []
            for g in item.ranked:
                image = benchmark.gallery[g]
                mark = " (GT)" if image.image_id in q.target_ids else ""
                results.append(wandb.Image(benchmark.load_image(image), caption=image.image_id + mark))
            results += [None] * (k - len(results))
            index = benchmark.gallery_index()
            main = q.target_ids[0] if q.target_ids and q.target_ids[0] in index else None
            target = (
                wandb.Image(benchmark.load_image(benchmark.gallery[index[main]]), caption=main)
                if main
                else None
            )
            table.add_data(q.query_id, ref, " / ".join(q.texts), *results, target, item.target_rank)
        logger.experiment.log({f"examples/{benchmark.name}": table})
    except Exception as err:
        log.warning("could not log W&B retrieval examples (%s: %s)", type(err).__name__, err)


def batch_size_of(batch: Any) -> int:
    """Samples in a training batch: the length of its first tensor or list (a dict's first value)."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()), [])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (list, tuple)):
        batch = batch[0]  # a (texts, ...) tuple
    if isinstance(batch, (list, tuple)) and batch and hasattr(batch[0], "shape"):
        batch = batch[0]  # a (pixels, ...) tuple
    if hasattr(batch, "shape") and len(batch.shape):
        return int(batch.shape[0])
    return len(batch) if isinstance(batch, (list, tuple)) else 0  # e.g. {"skipped": n}: nothing trained


class Throughput(Callback):
    """Logs training throughput: ``train/samples_per_sec`` (all ranks together, over the last ``window``
    batches, data loading included) every batch, and ``train/epoch_samples_per_sec`` per epoch."""

    def __init__(self, window: int = 10):
        self.window = window
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._epoch_start = 0.0
        self._epoch_samples = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._marks.clear()
        self._marks.append((time.perf_counter(), 0))
        self._epoch_start, self._epoch_samples = time.perf_counter(), 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = batch_size_of(batch) * trainer.world_size
        self._epoch_samples += n
        self._marks.append((time.perf_counter(), self._marks[-1][1] + n if self._marks else n))
        (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
        if t1 > t0:
            pl_module.log("train/samples_per_sec", (s1 - s0) / (t1 - t0), on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.perf_counter() - self._epoch_start
        if elapsed > 0 and self._epoch_samples:
            pl_module.log(
                "train/epoch_samples_per_sec", self._epoch_samples / elapsed, on_step=False, on_epoch=True
            )
