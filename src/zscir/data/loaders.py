"""Training data loaders built from a ``data`` config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from zscir.data.corpora import (
    ImageCaptionDataset,
    TextDataset,
    collate_skip_none,
    load_image_caption_corpus,
    load_text_corpus,
)


@dataclass
class DataConfig:
    """A training corpus and how to batch it.

    ``kind``: ``image_caption`` (tar shards: a directory, glob or brace range) or ``text`` (a captions file).
    """

    kind: str = "image_caption"
    path: str = "???"
    batch_size: int = 128
    num_workers: int = 2
    shuffle: bool = True
    drop_last: bool = True
    #: use only the first N samples (None: all)
    max_samples: int | None = None


def build_train_loader(cfg: DataConfig, image_transform: object, seed: int = 0) -> DataLoader:
    if cfg.kind == "image_caption":
        samples = load_image_caption_corpus(cfg.path)
        dataset = ImageCaptionDataset(samples[: cfg.max_samples], image_transform)
        collate = collate_skip_none
    elif cfg.kind == "text":
        dataset = TextDataset(load_text_corpus(cfg.path)[: cfg.max_samples])
        collate = None
    else:
        raise ValueError(f"data.kind must be 'image_caption' or 'text', got {cfg.kind!r}")
    if len(dataset) < cfg.batch_size and cfg.drop_last:
        raise ValueError(
            f"{cfg.path}: {len(dataset)} samples is less than one batch of {cfg.batch_size} with drop_last=true"
        )
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
