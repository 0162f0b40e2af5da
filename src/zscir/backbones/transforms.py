"""Image preprocessing options shared by every backbone (``backbone.transform``).

``targetpad``: before the backbone's own resize and centre crop, an image whose longer side exceeds
``ratio`` × its shorter side is padded with black, symmetrically, until the two sides are ``ratio``
apart; the crop then keeps (almost) the whole image instead of cutting its ends off. Baldrati et al.
introduced it for conditioned image retrieval ("Effective conditioned and composed image retrieval
combining CLIP-based features", CVPR 2022); SEARLE evaluates and trains with ratio 1.25 and its README
says its numbers need it.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

#: the ``backbone.transform`` values
TRANSFORMS = ("default", "targetpad")


class TargetPad:
    """Pad a PIL image whose aspect ratio (long side / short side) is at least ``ratio`` so that it becomes
    ``ratio``: ``int((long / ratio - side) / 2)`` black pixels on both ends of the short side."""

    def __init__(self, ratio: float = 1.25):
        if ratio < 1.0:
            raise ValueError(f"targetpad ratio must be >= 1, got {ratio}")
        self.ratio = ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if max(w, h) / min(w, h) < self.ratio:
            return image
        side = max(w, h) / self.ratio
        pad_w, pad_h = max(int((side - w) / 2), 0), max(int((side - h) / 2), 0)
        return TF.pad(image, [pad_w, pad_h, pad_w, pad_h], fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return f"TargetPad(ratio={self.ratio})"


def with_transform(
    transform: Callable, transform_id: str, kind: str = "default", ratio: float = 1.25
) -> tuple[Callable, str]:
    """The backbone's image transform (PIL → tensor) and its id, with the preprocessing option ``kind``
    in front of it; the id changes with the option, so feature caches never mix the two.

    Raises:
        ValueError: ``kind`` is not one of :data:`TRANSFORMS`.
    """
    if kind not in TRANSFORMS:
        raise ValueError(f"backbone.transform must be one of {TRANSFORMS}, got {kind!r}")
    if kind == "default":
        return transform, transform_id
    return T.Compose([TargetPad(ratio), transform]), f"targetpad{ratio:g}+{transform_id}"
