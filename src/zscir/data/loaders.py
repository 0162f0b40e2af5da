"""Training data loaders built from a ``data`` config (in-memory corpora resumable mid-epoch: see
``zscir.data.samplers``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch.utils.data import DataLoader, Dataset, IterableDataset

from zscir.data.corpora import (
    ImageCaptionDataset,
    TextDataset,
    collate_skip_none,
    load_captioned_images,
)
from zscir.data.samplers import ResumableDataLoader
from zscir.data.text_corpora import (
    CaptionSource,
    StreamingSamples,
    caption_samples,
    expand_text_sources,
    load_captions,
)


@dataclass
class DataConfig:
    """A training corpus and how to batch it.

    ``kind``: ``image_caption`` or ``text`` (caption files: ``.txt`` lines, ``.jsonl``, ``.parquet``, or the
    ``.txt`` captions of webdataset ``.tar`` shards; a file, a directory, a glob or a brace range).
    Image–caption ``format``: ``shards`` (tar shards: a directory, glob or brace range), ``folder`` (images +
    ``<stem>.txt`` captions, beside them or in ``captions_dir``), ``jsonl`` (``{"image", "caption"}`` per
    line, images under ``image_root``) or ``images`` (a folder of images, no captions: SEARLE).
    """

    kind: str = "image_caption"
    path: str = "???"
    format: str = "shards"
    captions_dir: str | None = None
    image_root: str | None = None
    batch_size: int = 128
    num_workers: int = 2
    shuffle: bool = True
    drop_last: bool = True
    #: use only the first N samples (None: all)
    max_samples: int | None = None
    #: text: the jsonl key / parquet column holding the caption (None: "caption", else "text")
    text_field: str | None = None
    #: text: stream the files (an endless IterableDataset split over ranks and workers; needs
    #: trainer.max_steps) instead of loading every caption into memory
    streaming: bool = False
    #: text, streaming: samples held in the shuffle buffer (0: file order)
    shuffle_buffer: int = 10_000


class TextSamples(Protocol):
    """What a text-only method (LinCIR) supplies to turn caption files into its training samples."""

    def dataset(self, sources: list[CaptionSource]) -> Dataset: ...

    def stream(self, sources: list[CaptionSource], shuffle_buffer: int, seed: int) -> IterableDataset: ...

    def collate(self, items: list[dict]) -> dict: ...


def build_train_loader(
    cfg: DataConfig, image_transform: object, seed: int = 0, text_samples: TextSamples | None = None
) -> DataLoader:
    """The training loader of ``cfg``; ``text_samples`` (a method's own text pipeline) replaces the plain
    ``{"index", "caption"}`` samples of a text corpus. In-memory corpora get a
    :class:`~zscir.data.samplers.ResumableDataLoader` (resumable mid-epoch); a streaming corpus does not
    (a resumed run restarts its stream)."""
    if cfg.kind == "text" and cfg.streaming:
        return _streaming_text_loader(cfg, seed, text_samples)
    if cfg.kind == "image_caption":
        samples = load_captioned_images(cfg.format, cfg.path, cfg.captions_dir, cfg.image_root)
        dataset = ImageCaptionDataset(samples[: cfg.max_samples], image_transform)
        collate = collate_skip_none
    elif cfg.kind == "text":
        sources = expand_text_sources(cfg.path, cfg.text_field, cfg.max_samples)
        if text_samples is not None:
            dataset, collate = text_samples.dataset(sources), text_samples.collate
        else:
            dataset, collate = TextDataset(load_captions(sources)), None
    else:
        raise ValueError(f"data.kind must be 'image_caption' or 'text', got {cfg.kind!r}")
    if len(dataset) < cfg.batch_size and cfg.drop_last:
        raise ValueError(
            f"{cfg.path}: {len(dataset)} samples is less than one batch of {cfg.batch_size} with drop_last=true"
        )
    return ResumableDataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        seed=seed,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        persistent_workers=cfg.num_workers > 0,
    )


def _streaming_text_loader(cfg: DataConfig, seed: int, text_samples: TextSamples | None) -> DataLoader:
    if cfg.max_samples is not None:
        raise ValueError(
            "data.max_samples applies to in-memory corpora; a streaming corpus reads whole files"
        )
    sources = expand_text_sources(cfg.path, cfg.text_field)
    if text_samples is not None:
        dataset, collate = text_samples.stream(sources, cfg.shuffle_buffer, seed), text_samples.collate
    else:
        dataset, collate = StreamingSamples(sources, caption_samples, cfg.shuffle_buffer, seed), None
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        persistent_workers=cfg.num_workers > 0,
    )
