"""Images and dataset errors shared by benchmarks and training corpora: one image reference
(:class:`ImageRef`, a file or a member of a tar shard, optionally cropped), one way to open it as RGB
(:func:`load_rgb`), and the errors a missing or malformed dataset raises."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFont


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


def load_rgb(
    path: Path, box: tuple[float, float, float, float] | None = None, span: tuple[int, int] | None = None
) -> Image.Image:
    """Open an image as RGB (RGBA, L, P, CMYK are converted, as the official loaders do).

    ``span`` = (offset, size) reads the image's bytes from inside ``path`` (a tar shard member).

    Raises:
        ImageLoadError: the file is missing, or it (or the span) does not decode as an image.
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
            image = to_rgb(im)
    except FileNotFoundError as err:
        raise ImageLoadError(f"image file is missing: {where}") from err
    except Exception as err:  # PIL raises several types for truncated or non-image files
        raise ImageLoadError(f"cannot decode image {where}: {type(err).__name__}: {err}") from err
    if box is not None:
        image = image.crop(box)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode. 16-bit and float greyscale are rescaled first: PIL's own ``convert``
    clips them to 255, which turns an ordinary 16-bit PNG into a white image."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0  # [0, 1] floats, else already 0..255
        else:
            scale = 1 / 257  # 16-bit range 0..65535 -> 0..255
        image = Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8))  # mode L
    return image.convert("RGB")


#: file suffixes taken as images when a folder is listed (:func:`list_images`), lower case
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, by suffix: :data:`IMAGE_SUFFIXES`, any case),
    sorted by path; hidden files and folders (``.name``) are left out.

    Raises:
        DatasetLayoutError: ``folder`` is not a directory, or holds no image.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetLayoutError(f"image folder {folder} does not exist")
    images = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not images:
        raise DatasetLayoutError(
            f"image folder {folder} holds no image (looked for {', '.join(IMAGE_SUFFIXES)} files, recursively)"
        )
    return images


def label_font(size: int = 11) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` px for labels on result grids (the scalable one where Pillow has
    FreeType, >= 10.1; else the fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()
