"""A PNG grid to see what CAM-TI masks: image | CAM heat map | masked image | caption (noun highlighted).

Rendering only: the rows come from the method (``CamTI.cam_grid_rows``)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from zscir.utils.images import label_font
from zscir.utils.io import atomic_write

CELL = 192  # pixels per image cell
TEXT_WIDTH = 420


@dataclass
class GridRow:
    image: np.ndarray  # [H, W, 3] uint8
    heat: np.ndarray | None  # [H, W] in [0, 1], None when the caption has no noun
    masked: np.ndarray | None  # [H, W, 3] uint8: the image phi sees (hidden parts at the normalisation mean)
    caption: str
    span: tuple[int, int] | None  # the chosen noun's characters in the caption
    note: str  # e.g. "tau 0.3, background hidden, 41 % visible"


def denormalize(pixels: Tensor, transform: object) -> np.ndarray:
    """[3, H, W] normalised pixels -> [H, W, 3] uint8, using the transform's ``Normalize`` step."""
    mean, std = torch.zeros(3), torch.ones(3)
    for step in getattr(transform, "transforms", []):
        if type(step).__name__ == "Normalize":
            mean, std = torch.tensor(step.mean), torch.tensor(step.std)
    img = pixels.detach().float().cpu() * std[:, None, None] + mean[:, None, None]
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _heat_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    colour = colormaps["jet"](heat)[..., :3] * 255
    return (0.45 * image + 0.55 * colour).round().astype(np.uint8)


def _cell(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array).resize((CELL, CELL), Image.Resampling.NEAREST)


def _draw_caption(
    draw: ImageDraw.ImageDraw, xy: tuple[int, int], row: GridRow, font: ImageFont.ImageFont
) -> None:
    """The caption wrapped to the text column, the chosen noun in bold red on yellow."""
    x0, y = xy
    text = row.caption
    lo, hi = row.span or (-1, -1)
    line_h = int(font.size * 1.35) if hasattr(font, "size") else 14
    pos = 0
    for line in textwrap.wrap(text, width=max(10, TEXT_WIDTH // max(6, int(line_h * 0.5)))):
        start = text.index(line, pos)
        x = x0
        for k, ch in enumerate(line):
            absolute = start + k
            w = draw.textlength(ch, font=font)
            if lo <= absolute < hi:
                draw.rectangle([x, y, x + w, y + line_h - 2], fill=(255, 230, 0))
                draw.text((x, y), ch, font=font, fill=(200, 0, 0))
            else:
                draw.text((x, y), ch, font=font, fill=(20, 20, 20))
            x += w
        pos = start + len(line)
        y += line_h
    draw.text((x0, y + 6), row.note, font=font, fill=(90, 90, 90))


def render_cam_grid(rows: list[GridRow], title: str = "") -> Image.Image:
    font, small = label_font(16), label_font(14)
    header = 30 + (24 if title else 0)
    pad = 6
    width = 3 * (CELL + pad) + TEXT_WIDTH + pad
    canvas = Image.new("RGB", (width, header + len(rows) * (CELL + pad) + pad), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, font=font, fill=(0, 0, 0))
    for k, name in enumerate(("image", "Grad-CAM of the noun", "masked image (what phi sees)", "caption")):
        draw.text((pad + k * (CELL + pad), header - 24), name, font=small, fill=(0, 0, 0))
    blank = np.full((8, 8, 3), 200, np.uint8)
    for r, row in enumerate(rows):
        y = header + r * (CELL + pad)
        heat = _heat_overlay(row.image, row.heat) if row.heat is not None else blank
        masked = row.masked if row.masked is not None else blank
        for k, arr in enumerate((row.image, heat, masked)):
            canvas.paste(_cell(arr), (pad + k * (CELL + pad), y))
        _draw_caption(draw, (pad + 3 * (CELL + pad), y + 4), row, small)
    return canvas


def save_cam_grid(rows: list[GridRow], path: str | Path, title: str = "") -> Path:
    image = render_cam_grid(rows, title)
    return atomic_write(path, lambda f: image.save(f, format="PNG"))
