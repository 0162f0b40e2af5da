"""What every composed-retrieval benchmark looks like to the rest of zscir.

A :class:`Benchmark` reads one official on-disk layout and exposes a gallery (:class:`ImageRef` list)
and queries (:class:`Query` list). Every benchmark rule — which gallery, whether the reference is
removed, which ground truths count, how captions are joined — lives in the benchmark class and in
``zscir.metrics``; methods only turn queries into features.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch import Tensor


class DatasetLayoutError(FileNotFoundError):
    """A benchmark root does not hold the files the official layout prescribes."""


class AnnotationError(ValueError):
    """An annotation file is malformed (missing key, wrong type)."""


class ImageLoadError(OSError):
    """An image file is missing or cannot be decoded."""


@dataclass(frozen=True)
class ImageRef:
    """One image: its id in the benchmark's id space, its file, an optional crop box (left, top, right,
    bottom) and, for images stored inside a container (a tar shard), the (offset, size) of its bytes."""

    image_id: str
    path: Path
    box: tuple[float, float, float, float] | None = None
    span: tuple[int, int] | None = None


@dataclass(frozen=True)
class Query:
    """One composed query.

    Attributes:
        query_id: the official id (CIRR ``pairid``, CIRCO ``id``, FashionIQ triplet index), as a string.
        reference: the reference image (``None`` for text-only queries).
        texts: caption variants; their query features are L2-normalised, averaged and renormalised
            (FashionIQ's two caption orders). Most benchmarks have exactly one.
        target_ids: ground-truth gallery ids, the main target first; empty on unlabelled test splits.
        subset_ids: CIRR ``img_set`` members minus the reference (for recall_subset).
        candidate_ids: GeneCIS per-query candidates, target first; empty for gallery benchmarks.
    """

    query_id: str
    reference: ImageRef | None
    texts: tuple[str, ...]
    target_ids: tuple[str, ...] = ()
    subset_ids: tuple[str, ...] = ()
    candidate_ids: tuple[str, ...] = ()


class Benchmark(ABC):
    """A benchmark split: queries, gallery, scoring and (for test splits) submission files.

    Subclasses fill :attr:`queries` and :attr:`gallery` in ``__init__`` and implement :meth:`score`.
    """

    #: loader family, e.g. ``"cirr"``
    kind: str = ""
    #: metric names :meth:`score` returns, in display order
    metric_names: tuple[str, ...] = ()

    def __init__(self, root: str | Path, split: str, name: str | None = None):
        self.root = Path(root).expanduser()
        self.split = split
        self.name = name or self.kind
        self.queries: list[Query] = []
        self.gallery: list[ImageRef] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, queries={len(self.queries)}, gallery={len(self.gallery)})"

    @property
    def labelled(self) -> bool:
        return any(q.target_ids or q.candidate_ids for q in self.queries)

    def gallery_index(self) -> dict[str, int]:
        if not hasattr(self, "_gallery_index"):
            self._gallery_index = {ref.image_id: i for i, ref in enumerate(self.gallery)}
        return self._gallery_index

    def load_image(self, ref: ImageRef) -> Image.Image:
        return load_rgb(ref.path, ref.box, ref.span)

    @abstractmethod
    def score(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, float]:
        """Metrics in percent from features aligned with :attr:`queries` and :attr:`gallery`."""

    def submission(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, object]:
        """Server submission files for unlabelled splits: ``{file name: JSON object}``."""
        return {}

    def identity(self) -> dict:
        """What determines this benchmark's gallery (for feature caches)."""
        return {
            "kind": self.kind,
            "root": str(self.root.resolve()),
            "split": self.split,
            "gallery": [r.image_id for r in self.gallery],
        }


# ---- helpers shared by the loaders -------------------------------------------------------------------
def load_rgb(
    path: Path, box: tuple[float, float, float, float] | None = None, span: tuple[int, int] | None = None
) -> Image.Image:
    """Open an image as RGB (RGBA, L, P, CMYK are converted, as the official loaders do).

    ``span`` = (offset, size) reads the image's bytes from inside ``path`` (a tar shard member).
    """
    where = f"{path}[{span[0]}:+{span[1]}]" if span else str(path)
    try:
        if span is None:
            source = path
        else:
            with open(path, "rb") as f:
                f.seek(span[0])
                source = io.BytesIO(f.read(span[1]))
        with Image.open(source) as im:
            im.load()
            image = im.convert("RGB")
    except FileNotFoundError as err:
        raise ImageLoadError(f"image file is missing: {where}") from err
    except Exception as err:  # PIL raises several types for truncated or non-image files
        raise ImageLoadError(f"cannot decode image {where}: {type(err).__name__}: {err}") from err
    if box is not None:
        image = image.crop(box)
    return image


def read_json(path: Path, what: str, obtain: str) -> object:
    """Read an annotation file, naming the file and where the dataset comes from when it is missing."""
    if not path.is_file():
        raise DatasetLayoutError(f"missing {what}: {path}\n{obtain}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path} is not valid JSON: {err}") from err


def require_keys(record: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise AnnotationError(f"{where}: missing key(s) {missing} in record {json.dumps(record)[:200]}")


def check_root(root: Path, expected: list[str], obtain: str) -> None:
    """Fail early, listing the expected files, when ``root`` is not a dataset root."""
    if not root.is_dir() or not any((root / e).exists() for e in expected):
        listing = "\n  ".join(str(root / e) for e in expected)
        raise DatasetLayoutError(
            f"{root} does not look like the dataset root; expected:\n  {listing}\n{obtain}"
        )
