"""CAM maps -> masked images: which part is hidden, and how it is hidden.

``region``: ``background`` hides what the noun's CAM does not cover (map < τ), so the visible image is
the noun's region; ``object`` hides the noun's region (map ≥ τ). ``mode``: ``pixels`` sets hidden pixels
to the normalisation mean (0 after normalisation) using the pixel-resolution map; ``tokens`` drops the
hidden patch tokens (map on the patch grid) through ``Encoder.encode_image(keep=...)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zscir.backbones.base import Encoder
from zscir.cam.gradcam import upsample_cams

REGIONS = ("background", "object")
MODES = ("pixels", "tokens")


def visible(maps: Tensor, tau: float, region: str) -> Tensor:
    """Boolean map of what stays visible: ``maps >= tau`` (region=background) or ``maps < tau`` (object)."""
    if region not in REGIONS:
        raise ValueError(f"mask_region must be one of {REGIONS}, got {region!r}")
    return maps >= tau if region == "background" else maps < tau


def visible_pixels(grid_maps: Tensor, size: tuple[int, int], tau: float, region: str) -> Tensor:
    """[B, H, W] bool: what stays visible, decided on the pixel-resolution CAM (upsampled as grad-cam does)."""
    return visible(upsample_cams(grid_maps, size), tau, region)


def mask_pixels(pixels: Tensor, grid_maps: Tensor, tau: float, region: str) -> Tensor:
    """``pixels`` [B, 3, H, W] with hidden pixels set to 0, the normalisation mean."""
    keep = visible_pixels(grid_maps.to(pixels.device), tuple(pixels.shape[-2:]), tau, region)
    return pixels * keep[:, None].to(pixels.dtype)


def encode_visible_tokens(encoder: Encoder, pixels: Tensor, keep: Tensor) -> Tensor:
    """Image features [B, D] from only the visible patch tokens; ``keep`` [B, grid_h, grid_w] bool.

    Samples keep different numbers of patches, so samples are grouped by their count and each group is
    one ``encode_image(keep=...)`` call (exact; no padding tokens that attention would see). A sample
    with no visible patch is encoded from its class token alone.
    """
    flat = keep.flatten(1).to(pixels.device)
    counts = flat.sum(1)
    out: Tensor | None = None
    for count in counts.unique().tolist():
        rows = (counts == count).nonzero().squeeze(1)
        # stable sort puts the kept patch indices first, in increasing order
        idx = torch.sort((~flat[rows]).to(torch.uint8), dim=1, stable=True).indices[:, :count]
        feats = encoder.encode_image(pixels[rows], keep=idx)
        if out is None:
            out = feats.new_empty(pixels.shape[0], feats.shape[1])
        out[rows] = feats
    assert out is not None
    return out


def masked_features(
    encoder: Encoder, pixels: Tensor, grid_maps: Tensor, tau: float, region: str, mode: str
) -> tuple[Tensor, Tensor]:
    """Features [B, D] of the masked images and the visible fraction of each image [B]."""
    if mode == "pixels":
        keep = visible_pixels(grid_maps.to(pixels.device), tuple(pixels.shape[-2:]), tau, region)
        return encoder.encode_image(pixels * keep[:, None].to(pixels.dtype)), keep.flatten(1).float().mean(1)
    if mode == "tokens":
        keep = visible(grid_maps.to(pixels.device), tau, region)
        return encode_visible_tokens(encoder, pixels, keep), keep.flatten(1).float().mean(1)
    raise ValueError(f"mask_mode must be one of {MODES}, got {mode!r}")
