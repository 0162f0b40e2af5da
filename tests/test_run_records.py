"""Reproducible run records: run_info.json names the code (git commit, dirty flag), the library versions,
the devices and the command line; W&B takes its project/entity from the environment unless configured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zscir.cli.outputs import git_state
from zscir.cli.run import plain
from zscir.cli.tracking import wandb_settings
from zscir.cli.train import train

REPO = Path(__file__).resolve().parents[1]


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_run_info_records_commit_versions_devices_and_command(compose, tmp_path, monkeypatch):
    import lightning
    import open_clip
    import spacy
    import torch
    import transformers

    monkeypatch.setattr(sys, "argv", ["zscir-train", "method=sum", "label=a b"])
    train(compose("train", ["method=sum", "backbone=tiny", "eval_benchmarks=[synthetic_cirr]"]))
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["git"]["commit"] == git("rev-parse", "HEAD", cwd=REPO)
    assert isinstance(info["git"]["dirty"], bool)
    versions = info["versions"]
    assert versions["torch"] == torch.__version__
    assert versions["lightning"] == lightning.__version__
    assert versions["open_clip_torch"] == open_clip.__version__
    assert versions["transformers"] == transformers.__version__
    assert versions["spacy"] == spacy.__version__
    assert versions["grad-cam"]
    assert info["devices"]
    if not torch.cuda.is_available():
        assert info["devices"][0].startswith("cpu")
    assert info["command"] == "zscir-train method=sum 'label=a b'"


def test_git_state_is_none_outside_a_checkout_and_sees_uncommitted_changes(tmp_path):
    assert git_state(tmp_path) is None
    git("init", "-q", cwd=tmp_path)
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py", cwd=tmp_path)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", cwd=tmp_path)
    clean = git_state(tmp_path)
    assert clean == {"commit": git("rev-parse", "HEAD", cwd=tmp_path), "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {"commit": clean["commit"], "dirty": True}


@pytest.mark.parametrize(
    ("env", "overrides", "expected"),
    [
        ({}, [], ("zscir", None)),
        ({"WANDB_PROJECT": "my-project", "WANDB_ENTITY": "my-team"}, [], ("my-project", "my-team")),
        (
            {"WANDB_PROJECT": "my-project"},
            ["logger.wandb.project=mine", "logger.wandb.entity=me"],
            ("mine", "me"),
        ),
    ],
)
def test_wandb_project_and_entity_come_from_the_environment_unless_set(
    compose, monkeypatch, env, overrides, expected
):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = compose("train", ["logger=wandb", *overrides])
    conf = wandb_settings(plain(cfg.logger.wandb), cfg, Path("/tmp/run"), ["synthetic_cirr"])
    assert (conf["project"], conf["entity"]) == expected
