"""Sweeps through the submitit launcher (``hydra/launcher=local|slurm``, pip install 'zscir[slurm]')."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from conftest import small_world_overrides
from zscir.cli import config
from zscir.cli.launch import check_launch
from zscir.cli.report import main as report_main

SRC = Path(__file__).resolve().parents[1] / "src"
SUBMITIT = config.installed("hydra_plugins.hydra_submitit_launcher")
needs_submitit = pytest.mark.skipif(
    not SUBMITIT, reason="hydra-submitit-launcher is not installed (pip install 'zscir[slurm]')"
)


@pytest.mark.parametrize("launcher", ["slurm", "local"])
@needs_submitit
def test_the_launcher_configs_compose(launcher):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        cfg = compose("train", [f"hydra/launcher={launcher}"], return_hydra_config=True)
    target = {"slurm": "SlurmLauncher", "local": "LocalLauncher"}[launcher]
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.launcher.tasks_per_node == 1
    assert cfg.hydra.launcher.gpus_per_node == (1 if launcher == "slurm" else 0)


def test_a_task_of_a_submitit_slurm_job_may_be_one_rank_of_a_ddp_run(monkeypatch):
    """srun starts one task per GPU, each running the one sweep job it was handed: no re-launch."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        cfg = compose("train", ["trainer=ddp", "trainer.devices=8"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.launcher = {
            "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
        }
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    HydraConfig.instance().set_config(cfg)
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        check_launch(cfg)
        monkeypatch.delenv("SLURM_JOB_ID")  # the same sweep under a plain srun: every task runs it all
        with pytest.raises(RuntimeError, match="every process"):
            check_launch(cfg)
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.slow
@needs_submitit
def test_a_two_job_sweep_through_submitit_local_then_report(small_world, tmp_path):
    out = tmp_path / "outputs"
    command = [
        sys.executable,
        "-m",
        "zscir.cli.train",
        "-m",
        "hydra/launcher=local",
        "hydra.launcher.timeout_min=20",
        "method=image_only,sum",
        "backbone=tiny",
        "eval_benchmarks=[synthetic_cirr]",
        f"paths.data_dir={small_world}",
        f"paths.output_dir={out}",
        "eval.num_workers=0",
        "trainer.enable_progress_bar=false",
        *small_world_overrides(),
    ]
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (sweep,) = [p for p in (out / "train" / "multirun").iterdir() if not p.is_symlink()]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0_image_only_tiny_seed0", "1_sum_tiny_seed0"]  # one sweep directory for both jobs
    submitted = [p for p in (sweep / ".submitit").iterdir() if p.name != "%j"]  # %j: the array's files
    assert len(submitted) == 2  # each job ran as its own submitit job (a folder per job id)
    for job in jobs:
        assert (sweep / job / "metrics.json").is_file()
        assert (sweep / job / "run_info.json").is_file()
    report_main([str(sweep)])
    rows = list(csv.DictReader((sweep / "results.csv").read_text().splitlines()))
    assert sorted(r["method"] for r in rows) == ["image_only", "sum"]
