"""Shared by the resume and DDP tests: zscir-train in a subprocess (with a clear failure report and no
orphans), the loss trajectory of a run, and checkpoint comparisons."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import small_world_overrides

REPO = Path(__file__).resolve().parents[1]
PAUSING_TRAIN = REPO / "tests" / "helpers" / "pausing_train.py"

#: a tiny CLIP trained for 2 epochs of 4 steps (64 samples, batch 16), deterministic
TINY_CLIP_RUN = [
    "experiment=tiny_synthetic_clip",
    "trainer.precision=32-true",
    "trainer.deterministic=true",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "data.max_samples=64",
    "data.batch_size=16",
]


def base_overrides(data_dir: Path, output_dir: Path) -> list[str]:
    """What the ``compose`` fixture adds, for runs composed by hand or launched as a subprocess."""
    return [
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={output_dir}",
        "eval.num_workers=0",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
        *small_world_overrides(),
    ]


def subprocess_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "HYDRA_FULL_ERROR": "1", **extra}


def start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start ``python <args>`` in its own session (so all its processes can be killed), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=subprocess_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no output)"


def run_train(overrides: list[str], log: Path, timeout: float = 300) -> None:
    """``python -m zscir.cli.train <overrides>`` to completion; fails with the output's tail otherwise."""
    proc = start(["-m", "zscir.cli.train", *overrides], log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"zscir-train did not finish in {timeout} s:\n{tail(log)}") from None
    finally:
        kill_group(proc)
    assert rc == 0, f"zscir-train exited with {rc}:\n{tail(log)}"


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    """Wait until ``path`` exists (the process paused there); fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before pausing:\n{tail(log)}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"the run did not reach the pause within {timeout} s:\n{tail(log)}")
        time.sleep(0.1)
    return path.read_text()


def loss_trajectory(run_dir: Path) -> dict[int, float]:
    """``train/loss`` by step from every CSV log version of a run (a resumed run adds a version)."""
    losses: dict[int, float] = {}
    for file in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(file, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def max_weight_difference(a: dict, b: dict) -> float:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    return max(float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"])
