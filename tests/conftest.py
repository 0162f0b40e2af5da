"""Shared fixtures: a small synthetic world (generated once per session), config composition on
temporary paths, and an offline environment (no hub, W&B offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from zscir.data.synthetic import SynthConfig, generate_world

SMALL_WORLD = dict(
    corpus_train=256,
    corpus_val=64,
    text_captions=512,
    shard_size=128,
    cirr_val_sets=6,
    cirr_test_sets=3,
    circo_val=8,
    circo_test=4,
    circo_pool=40,
)


def small_world_overrides() -> list[str]:
    return [f"synth.{k}={v}" for k, v in SMALL_WORLD.items()]


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete synthetic world at data/synthetic under a session temp dir; returns the data dir."""
    data_dir = tmp_path_factory.mktemp("data")
    generate_world(data_dir / "synthetic", SynthConfig(**SMALL_WORLD))
    return data_dir


@pytest.fixture
def compose(small_world: Path, tmp_path: Path):
    """compose(config_name, overrides) with data in the small world and outputs in tmp_path."""
    from zscir.cli.config import compose_config

    def _compose(config_name: str = "train", overrides: list[str] | None = None):
        base = [
            f"paths.data_dir={small_world}",
            f"paths.output_dir={tmp_path / 'outputs'}",
            f"paths.run_dir={tmp_path / 'run'}",
            "eval.num_workers=0",
            *small_world_overrides(),
        ]
        if config_name == "train":
            base += ["data.num_workers=0", "trainer.enable_progress_bar=false"]
        return compose_config(config_name, base + list(overrides or []))

    return _compose
