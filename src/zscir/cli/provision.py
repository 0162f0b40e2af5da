"""First-use provisioning: the synthetic world and a backbone trained by its recipe (the synthetic-world
CLIP), made when a run needs them and they are missing or stale. Training a recipe is the caller's
``train`` function, so this module never imports the training entry point."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from zscir.backbones import BackboneLoadError
from zscir.backbones.errors import missing_checkpoint_message
from zscir.cli.config import benchmark_configs, compose_config, parse_config, plain
from zscir.data.synthetic import SynthConfig, generate_world, world_manifest
from zscir.utils.io import atomic_write_json

log = logging.getLogger("zscir")


def ensure_synthetic_world(cfg: DictConfig, benchmarks: list[dict] | None = None) -> None:
    """Generate the synthetic world if anything this run reads (``benchmarks``: the resolved benchmark
    configs, None: resolved from ``cfg``; the training data) lives under it and it is not there yet, or
    was generated with other ``synth`` settings than this run's (it is then regenerated)."""

    root = Path(cfg.paths.synthetic_dir)
    wanted = [b.get("root", "") for b in (benchmark_configs(cfg) if benchmarks is None else benchmarks)]
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


def ensure_backbone(cfg: DictConfig, train: Callable[[DictConfig], Any]) -> None:
    """Train the backbone's recipe when its checkpoint is missing (the synthetic-world CLIP on first use),
    or when the recipe trained it on another synthetic world than this run's ``synth`` settings describe.

    What a recipe-trained checkpoint was trained from is recorded beside it
    (``<checkpoint>.zscir-recipe.json``: the recipe and the world's manifest); a checkpoint without
    that record (weights from elsewhere) is used as it is. ``train`` runs the recipe (``zscir.cli.train.train``).

    Raises:
        BackboneLoadError: the checkpoint is missing and has no recipe, or the recipe did not write it.
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
