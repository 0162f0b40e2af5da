"""Launch: naming a run so that every process of it agrees, and refusing launches that would misbehave
(a Hydra multirun job that Lightning would re-launch)."""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from zscir.cli.tracking import hydra_multirun


def plain_trainer(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def launcher_id() -> str | None:
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


def run_stamp() -> str:
    """The last part of a run (or sweep) directory: ``<date>_<time>_<6 hex>``, or the launcher's id
    when several processes must agree on it. A timestamp alone is not enough: jobs started in the same
    second collide, and DDP ranks may stamp different seconds."""
    return launcher_id() or f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{uuid.uuid4().hex[:6]}"


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
    """Refuse a Hydra multirun job that would be multi-process.

    Lightning starts DDP ranks > 0 by re-running ``sys.argv``; inside ``-m`` that is the whole sweep
    again (Lightning #11300, Hydra #2070): hangs, duplicated jobs, one W&B run for several. And a sweep
    started under torchrun/srun would run every job in every process. Sweep jobs are therefore
    single-process; a multi-GPU run is a single ``zscir-train`` launched by torchrun or srun, or a job of
    the submitit SLURM launcher (:func:`submitit_slurm_job`), whose tasks each run one job.
    """
    if not (hydra_multirun() if multirun is None else multirun) or submitit_slurm_job():
        return
    world = max(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")))
    if world > 1:
        raise RuntimeError(
            f"Hydra multirun (-m) inside a {world}-process launch (torchrun/srun): every process would run "
            "the whole sweep. Start the sweep as one process (each job then uses one device), or launch "
            "each multi-GPU run as a single `zscir-train trainer=ddp ...` under torchrun/srun."
        )
    trainer = plain_trainer(cfg)
    if relaunches_script(trainer):
        raise RuntimeError(
            f"Hydra multirun (-m) with trainer.strategy={trainer.get('strategy')} on "
            f"{device_count(trainer)} devices: Lightning would start the other ranks by re-running this "
            "command line, i.e. the whole sweep (Lightning #11300, Hydra #2070). Use one device per sweep "
            "job (trainer.devices=1), or trainer.strategy=ddp_spawn, or launch the multi-GPU run as a "
            "single `zscir-train trainer=ddp ...` under torchrun/srun (README: Multi-GPU)."
        )


def submitit_slurm_job() -> bool:
    """Whether this process is a task of a SLURM job started by the submitit launcher (``hydra/launcher=
    slurm``). Such a job runs one sweep job, not the sweep: submitit starts every task with srun and hands
    it that job alone, and Lightning takes the DDP ranks from SLURM instead of re-running the command line
    — so a multi-task (multi-GPU, multi-node) job inside ``-m`` is safe there."""
    from hydra.core.hydra_config import HydraConfig

    if not (HydraConfig.initialized() and os.environ.get("SLURM_JOB_ID")):
        return False
    return "submitit" in str(OmegaConf.select(HydraConfig.get(), "launcher._target_", default=""))


def is_global_zero() -> bool:
    """Rank 0 before a Trainer exists (Lightning reads the launcher's rank variables at import)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
