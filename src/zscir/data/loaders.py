"""Training data loaders built from a ``data`` config (in-memory corpora resumable mid-epoch: see
``zscir.data.samplers``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision import transforms as T

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
    #: image-caption: train on random crops, ``RandomResizedCrop(scale=random_crop_scale)`` (bicubic), in
    #: place of the encoder's evaluation resize + centre crop (e.g. [0.9, 1.0], open_clip's and Pic2Word's
    #: training crop); None: the evaluation transform
    random_crop_scale: list[float] | None = None
    #: text, in memory: group captions of similar length into batches, sorting windows of this many
    #: batches by caption length (``zscir.data.samplers``; 0: off). The text tower then runs over
    #: similar lengths instead of the longest caption of a random batch; each sample's loss is unchanged.
    length_buckets: int = 0


class TrainingSamples(Protocol):
    """A method's own training samples (:meth:`RetrievalMethod.training_samples`), built from the corpus
    that the ``data`` config names, read by the loader: for ``kind=text`` a list of caption sources, for
    ``kind=image_caption`` a list of :class:`~zscir.data.corpora.CaptionedImage`. LinCIR's self-masking
    pipeline is one; a method with per-image state (SEARLE's pseudo-tokens) or its own image pipeline
    (Pic2Word) supplies another, without touching the loader or the entry points."""

    #: the ``data.kind`` values it can build samples from
    data_kinds: tuple[str, ...]

    def dataset(self, corpus: list) -> Dataset: ...

    def collate(self, items: list[dict]) -> dict: ...

    #: streaming text corpora only: an endless stream of samples
    def stream(self, sources: list[CaptionSource], shuffle_buffer: int, seed: int) -> IterableDataset: ...


def build_train_loader(
    cfg: DataConfig, image_transform: object, seed: int = 0, samples: TrainingSamples | None = None
) -> DataLoader:
    """The training loader of ``cfg``; ``samples`` (a method's own pipeline) replaces the plain samples of
    the corpus (``{"index", "pixels", "caption", "key"}`` image-caption pairs, ``{"index", "caption"}``
    captions). In-memory corpora get a :class:`~zscir.data.samplers.ResumableDataLoader` (resumable
    mid-epoch); a streaming corpus does not (a resumed run restarts its stream).

    Raises:
        ValueError: an unknown ``data.kind``, a kind ``samples`` cannot use, or less than one batch of data.
    """
    if cfg.kind not in ("image_caption", "text"):
        raise ValueError(f"data.kind must be 'image_caption' or 'text', got {cfg.kind!r}")
    if samples is not None and cfg.kind not in samples.data_kinds:
        raise ValueError(
            f"data.kind={cfg.kind} cannot feed this method, which trains on data.kind in {list(samples.data_kinds)}"
        )
    if cfg.kind == "text" and cfg.streaming:
        return _streaming_text_loader(cfg, seed, samples)
    if cfg.kind == "image_caption":
        corpus = load_captioned_images(cfg.format, cfg.path, cfg.captions_dir, cfg.image_root)[
            : cfg.max_samples
        ]
        if cfg.random_crop_scale is not None:
            image_transform = random_crop_transform(image_transform, cfg.random_crop_scale)
        if samples is not None:
            dataset, collate = samples.dataset(corpus), samples.collate
        else:
            dataset, collate = ImageCaptionDataset(corpus, image_transform), collate_skip_none
    else:
        sources = expand_text_sources(cfg.path, cfg.text_field, cfg.max_samples)
        if samples is not None:
            dataset, collate = samples.dataset(sources), samples.collate
        else:
            dataset, collate = TextDataset(load_captions(sources)), None
    if len(dataset) < cfg.batch_size and cfg.drop_last:
        raise ValueError(
            f"{cfg.path}: {len(dataset)} samples is less than one batch of {cfg.batch_size} with drop_last=true"
        )
    lengths = None
    if cfg.length_buckets > 0:
        if not hasattr(dataset, "lengths"):
            raise ValueError(
                f"data.length_buckets needs a text corpus; {type(dataset).__name__} has no lengths"
            )
        lengths = dataset.lengths()
    return ResumableDataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        seed=seed,
        drop_last=cfg.drop_last,
        lengths=lengths,
        bucket_batches=cfg.length_buckets,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        persistent_workers=cfg.num_workers > 0,
    )


def _to_rgb(image: object) -> object:
    return image.convert("RGB")


def random_crop_transform(eval_transform: object, scale: list[float] | tuple[float, float]) -> T.Compose:
    """The training counterpart of an encoder's evaluation transform: RGB, ``RandomResizedCrop`` to the
    same output size with area ``scale`` and bicubic resampling, then the same ``ToTensor`` + ``Normalize``.

    This is open_clip's training transform (``image_transform(is_train=True)``) and Pic2Word's
    (``model/clip.py`` ``_transform``, scale (0.9, 1.0)). The output size is read from the evaluation
    transform's ``CenterCrop`` (or a square ``Resize``), the normalisation from its ``Normalize``; any
    padding or resizing it does before is replaced by the crop.

    Raises:
        ValueError: ``scale`` is not ``0 < lo <= hi <= 1``, or ``eval_transform`` is not a torchvision
            ``Compose`` with a ``Normalize`` and a fixed output size.
    """
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"random_crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(scale)}")
    steps = list(getattr(eval_transform, "transforms", []))
    norm = next((t for t in steps if isinstance(t, T.Normalize)), None)
    sizes = [t.size for t in steps if isinstance(t, T.CenterCrop)]
    sizes += [t.size for t in steps if isinstance(t, T.Resize) and isinstance(t.size, (tuple, list))]
    if norm is None or not sizes:
        raise ValueError(
            f"random_crop_scale needs an evaluation transform with a Normalize and a fixed output size "
            f"(CenterCrop or square Resize); this backbone's is {eval_transform!r}: set data.random_crop_scale=null"
        )
    size = sizes[0]
    return T.Compose(
        [
            _to_rgb,
            T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(norm.mean, norm.std),
        ]
    )


def _streaming_text_loader(cfg: DataConfig, seed: int, samples: TrainingSamples | None) -> DataLoader:
    if cfg.max_samples is not None:
        raise ValueError(
            "data.max_samples applies to in-memory corpora; a streaming corpus reads whole files"
        )
    sources = expand_text_sources(cfg.path, cfg.text_field)
    if samples is not None:
        dataset, collate = samples.stream(sources, cfg.shuffle_buffer, seed), samples.collate
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
