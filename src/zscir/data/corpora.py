"""Training corpora: image–caption pairs and caption-only text.

Image–caption corpora come in three layouts (:func:`load_captioned_images`):

* ``shards``: webdataset-style tar shards (``<key>.jpg|png|webp`` + ``<key>.txt``, as CC3M/img2dataset
  write them). Shards are indexed once (member offsets and captions) and the index is stored next to
  them, so the dataset is map-style: shuffling, DDP sharding and exact resume all work through the
  ordinary samplers, and an image is read with one seek.
* ``folder``: image files under a folder (recursively), one caption ``<image stem>.txt`` per image,
  beside the image or in a separate captions folder (PLI's ImageNet layout: ``ImageNet1K/test/**/*.JPEG``
  + ``ImageNet1K/captions/<stem>.txt``).
* ``jsonl``: one ``{"image": <path>, "caption": <text>}`` object per line.
* ``images``: image files under a folder (recursively), no captions (for methods that use none).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from zscir.utils.images import DatasetLayoutError, ImageLoadError, ImageRef, load_rgb
from zscir.utils.io import atomic_write_json, file_stamp

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
INDEX_VERSION = 1


@dataclass(frozen=True)
class CaptionedImage:
    key: str
    image: ImageRef
    caption: str


def expand_shards(spec: str | Path) -> list[Path]:
    """Shard files from a directory, a glob, or a brace range (``shard-{00000..00099}.tar``)."""
    spec = str(spec)
    match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if match:
        lo, hi = match.group(1), match.group(2)
        paths = [
            Path(spec[: match.start()] + f"{i:0{len(lo)}d}" + spec[match.end() :])
            for i in range(int(lo), int(hi) + 1)
        ]
    elif Path(spec).expanduser().is_dir():
        paths = sorted(Path(spec).expanduser().glob("*.tar"))
    else:
        paths = sorted(Path().glob(spec)) if any(c in spec for c in "*?[") else [Path(spec)]
    paths = [p.expanduser() for p in paths]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise DatasetLayoutError(
            f"no tar shards found for {spec!r}"
            + (f" (missing: {[str(m) for m in missing[:3]]})" if missing else "")
            + "\nExpected webdataset shards with <key>.jpg/.png + <key>.txt members (img2dataset output format)."
        )
    return paths


def index_shard(path: Path) -> list[CaptionedImage]:
    """Scan one tar shard's headers; read only the (small) caption members."""
    images: dict[str, ImageRef] = {}
    captions: dict[str, str] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            ext = "." + ext.lower()
            if ext in IMAGE_EXTENSIONS:
                images[key] = ImageRef(key, path, span=(member.offset_data, member.size))
            elif ext == ".txt":
                captions[key] = tar.extractfile(member).read().decode("utf-8").strip()
    return [CaptionedImage(k, images[k], captions[k]) for k in images if k in captions]


def load_image_caption_corpus(spec: str | Path) -> list[CaptionedImage]:
    """All (image, caption) samples of a set of shards, using/refreshing the cached index per shard."""
    samples: list[CaptionedImage] = []
    for shard in tqdm(expand_shards(spec), desc="indexing shards", leave=False):
        index_file = shard.with_name(shard.name + ".zscir-index.json")
        # a shard rewritten in place (same size, even the same mtime) is re-indexed: its spans moved
        stamp = {"version": INDEX_VERSION, "file": list(file_stamp(shard))}
        entries = None
        if index_file.is_file():
            try:
                cached = json.loads(index_file.read_text())
                if cached["stamp"] == stamp:
                    entries = [
                        CaptionedImage(k, ImageRef(k, shard, span=tuple(span)), c)
                        for k, span, c in cached["samples"]
                    ]
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable shard index %s", index_file)
        if entries is None:
            entries = index_shard(shard)
            with contextlib.suppress(OSError):  # read-only dataset folder: the index is just not cached
                atomic_write_json(
                    index_file,
                    {"stamp": stamp, "samples": [[e.key, list(e.image.span), e.caption] for e in entries]},
                    indent=None,
                )
        samples.extend(entries)
    if not samples:
        raise DatasetLayoutError(f"{spec}: the shards hold no (image, .txt caption) pairs")
    kept = [s for s in samples if s.caption.strip()]
    if len(kept) < len(samples):  # nothing to learn from, and a contrastive batch would gain a blank "text"
        empty = [s.key for s in samples if not s.caption.strip()]
        log.warning(
            "%s: dropped %d of %d samples with an empty caption (e.g. %s)",
            spec,
            len(empty),
            len(samples),
            empty[:5],
        )
    if not kept:
        raise DatasetLayoutError(f"{spec}: every caption in the shards is empty")
    return kept


def load_caption_folder(root: str | Path, captions_dir: str | Path | None = None) -> list[CaptionedImage]:
    """Images under ``root`` (recursively, sorted) paired with ``<stem>.txt``, read from ``captions_dir``
    when given, else from beside each image. Images without a caption file are skipped (and counted)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(f"image folder {root} does not exist")
    caption_root = Path(captions_dir).expanduser() if captions_dir else None
    if caption_root is not None and not caption_root.is_dir():
        raise DatasetLayoutError(f"captions folder {caption_root} does not exist")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    samples, seen, missing = [], set(), 0
    for image in images:
        caption_file = (caption_root or image.parent) / f"{image.stem}.txt"
        if not caption_file.is_file():
            missing += 1
            continue
        if caption_root is not None and image.stem in seen:  # one flat captions folder: stems must be unique
            raise DatasetLayoutError(f"two images named {image.stem!r} share {caption_file}")
        seen.add(image.stem)
        key = str(image.relative_to(root).with_suffix(""))
        caption = caption_file.read_text(encoding="utf-8").strip()
        samples.append(CaptionedImage(key, ImageRef(key, image), caption))
    if missing:
        log.warning("%s: %d of %d images have no caption file; skipped", root, missing, len(images))
    if not samples:
        where = caption_root or "beside each image"
        raise DatasetLayoutError(
            f"{root}: no image with a caption: expected <stem>.txt in {where} for images {IMAGE_EXTENSIONS}"
        )
    return samples


def load_image_folder(root: str | Path) -> list[CaptionedImage]:
    """Every image under ``root`` (recursively, sorted) with an empty caption: for methods that train on
    images alone (SEARLE on the ImageNet1K test images)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(f"image folder {root} does not exist")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise DatasetLayoutError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    keys = [str(p.relative_to(root).with_suffix("")) for p in images]
    return [CaptionedImage(k, ImageRef(k, p), "") for k, p in zip(keys, images)]


def load_caption_jsonl(path: str | Path, image_root: str | Path | None = None) -> list[CaptionedImage]:
    """Samples from a jsonl file: one ``{"image": <path>, "caption": <text>}`` per line; relative image
    paths are resolved against ``image_root`` (default: the jsonl file's folder)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetLayoutError(f"jsonl corpus {file} does not exist")
    base = Path(image_root).expanduser() if image_root else file.parent
    samples = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, caption = row["image"], row["caption"]
        except (ValueError, KeyError, TypeError) as err:
            raise DatasetLayoutError(
                f'{file}:{n}: expected a JSON object with "image" and "caption", got {line[:80]!r}'
            ) from err
        key = str(Path(image).with_suffix(""))
        samples.append(CaptionedImage(key, ImageRef(key, base / image), str(caption).strip()))
    if not samples:
        raise DatasetLayoutError(f"{file}: no samples")
    return samples


def load_captioned_images(
    layout: str, path: str | Path, captions_dir: str | None = None, image_root: str | None = None
) -> list[CaptionedImage]:
    """An image–caption corpus in one of the layouts of this module: ``shards``, ``folder``, ``jsonl`` or
    ``images`` (no captions)."""
    if layout == "shards":
        return load_image_caption_corpus(path)
    if layout == "folder":
        return load_caption_folder(path, captions_dir)
    if layout == "jsonl":
        return load_caption_jsonl(path, image_root)
    if layout == "images":
        return load_image_folder(path)
    raise ValueError(f"image-caption format must be shards, folder, jsonl or images, got {layout!r}")


class ImageCaptionDataset(Dataset):
    """``{"index", "key", "stamp", "pixels", "caption"}`` (``key``: the sample's id in its shard, stable across
    runs; ``stamp``: :func:`~zscir.utils.io.file_stamp` of the file the image was read from, and its span
    in a shard, for caches keyed on images); an unreadable image yields None (skipped by the collate
    function)."""

    def __init__(self, samples: list[CaptionedImage], transform: Callable):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict | None:
        s = self.samples[i]
        try:
            image = load_rgb(s.image.path, span=s.image.span)
            stamp = ":".join(map(str, (*file_stamp(s.image.path), *(s.image.span or ()))))
        except (ImageLoadError, FileNotFoundError) as err:
            log.warning("skipping sample %s: %s", s.key, err)
            return None
        return {
            "index": i,
            "key": s.key,
            "stamp": stamp,
            "pixels": self.transform(image),
            "caption": s.caption,
        }


def collate_skip_none(items: list[dict | None]) -> dict:
    """Default collation of the readable samples; ``skipped`` counts the unreadable ones.

    Raises:
        ImageLoadError: no sample of the batch could be read — that is a broken corpus (wrong format,
            unreadable shards), not a few corrupt images, and training on it would be meaningless.
    """
    good = [it for it in items if it is not None]
    if not good:
        raise ImageLoadError(
            f"none of the {len(items)} images of a training batch could be read (see the warnings above "
            "for each one); check data.path and that the shards hold valid .jpg/.png images"
        )
    batch = torch.utils.data.default_collate(good)
    batch["skipped"] = len(items) - len(good)
    return batch


def load_text_corpus(path: str | Path) -> list[str]:
    """Captions from a ``.txt`` file (one per line; blank lines skipped)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetLayoutError(f"text corpus {file} does not exist")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


class TextDataset(Dataset):
    """``{"index", "caption"}`` over a list of captions."""

    def __init__(self, captions: list[str]):
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "caption": self.captions[i]}
