"""Retrieval examples: what a method ranked first for a few queries, as PNG grids (and W&B tables).

Each grid is one row: the reference image, then the top-k gallery images best first, then (on labelled
splits) the main ground truth with its rank; ground-truth images are outlined in green and the
modification text is written above. Rankings follow the benchmark's rules: CIRR removes the reference
from its gallery and GeneCIS ranks only each query's candidates; ties go to the lower gallery index, as
in :mod:`zscir.retrieval.search`. Needs only Pillow and torch (no Hydra, no W&B).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor

from zscir.benchmarks.base import Benchmark, ImageRef, Query
from zscir.retrieval.search import check_finite, normalize
from zscir.utils.images import label_font
from zscir.utils.io import atomic_write

#: layout of a grid, in pixels (public so callers can predict a grid's size)
PAD = 8
HEADER_LINES = 3
LINE = 14
CAPTION_LINES = 2
BORDER = 4
GT_COLOR = (30, 170, 60)
REF_COLOR = (90, 110, 200)


@dataclass(frozen=True)
class Retrieved:
    """One query's retrieval: ``ranked`` gallery indices best first, their cosine ``scores``, and the
    1-based rank of the main ground truth in the full ranking (None on unlabelled splits)."""

    query_index: int
    query: Query
    ranked: tuple[int, ...]
    scores: tuple[float, ...]
    target_rank: int | None


def pick_queries(num_queries: int, n: int) -> list[int]:
    """``n`` query positions spread evenly over the split (deterministic), so examples are not all
    from the first few reference images."""
    if n <= 0 or num_queries == 0:
        return []
    if n >= num_queries:
        return list(range(num_queries))
    step = (num_queries - 1) / max(1, n - 1)
    return sorted({round(i * step) for i in range(n)})


def retrieve(
    benchmark: Benchmark, query_feats: Tensor, gallery_feats: Tensor, indices: list[int], k: int = 5
) -> list[Retrieved]:
    """Top-``k`` gallery images of the queries at ``indices`` (features aligned with the benchmark).

    Raises:
        NonFiniteFeatures: a query or gallery row holds NaN/inf (its ranking would be meaningless).
    """
    if not indices:
        return []
    check_finite(query_feats, f"{benchmark.name} query", [q.query_id for q in benchmark.queries])
    check_finite(gallery_feats, f"{benchmark.name} gallery", [g.image_id for g in benchmark.gallery])
    index = benchmark.gallery_index()
    q = normalize(query_feats[indices])
    g = normalize(gallery_feats)
    scores = q @ g.T
    # CIRR deletes the reference from the ranking; the other gallery benchmarks keep it (docs/benchmarks.md)
    excludes_reference = getattr(benchmark, "excludes_reference", benchmark.kind == "cirr")
    out = []
    for row, qi in enumerate(indices):
        query = benchmark.queries[qi]
        s = scores[row].clone()
        if query.candidate_ids:  # GeneCIS: rank this query's candidates only
            allowed = torch.full_like(s, float("-inf"))
            cand = torch.tensor([index[c] for c in query.candidate_ids])
            allowed[cand] = s[cand]
            s = allowed
        elif excludes_reference and query.reference is not None and query.reference.image_id in index:
            s[index[query.reference.image_id]] = float("-inf")
        order = torch.sort(s, descending=True, stable=True).indices
        valid = int(torch.isfinite(s).sum())
        order = order[:valid]
        target_rank = None
        if query.target_ids and query.target_ids[0] in index:
            hit = torch.nonzero(order == index[query.target_ids[0]])
            target_rank = int(hit[0, 0]) + 1 if hit.numel() else None
        top = order[:k].tolist()
        out.append(Retrieved(qi, query, tuple(top), tuple(float(s[i]) for i in top), target_rank))
    return out


def grid_size(k: int, labelled: bool, tile: int = 128) -> tuple[int, int]:
    """(width, height) of a grid with ``k`` results (``labelled``: plus a ground-truth column)."""
    columns = 1 + k + (1 if labelled else 0)
    width = PAD + columns * (tile + PAD)
    height = PAD + HEADER_LINES * LINE + PAD + tile + CAPTION_LINES * LINE + PAD
    return width, height


def _thumb(image: Image.Image, tile: int) -> Image.Image:
    """``image`` scaled (up or down) to fit a ``tile`` square, centred on white (aspect ratio kept)."""
    image = ImageOps.contain(image, (tile, tile))
    canvas = Image.new("RGB", (tile, tile), "white")
    canvas.paste(image, ((tile - image.width) // 2, (tile - image.height) // 2))
    return canvas


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def render_grid(benchmark: Benchmark, item: Retrieved, k: int, tile: int = 128) -> Image.Image:
    """One query's grid (see the module docstring). Its size is :func:`grid_size` whatever the text."""
    labelled = benchmark.labelled
    width, height = grid_size(k, labelled, tile)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    chars = max(10, (width - 2 * PAD) // 6)
    text = " / ".join(item.query.texts)
    lines = textwrap.wrap(f"query {item.query.query_id}: {text}", chars)
    if len(lines) > HEADER_LINES:
        lines = [*lines[: HEADER_LINES - 1], _short(" ".join(lines[HEADER_LINES - 1 :]), chars)]
    for i, line in enumerate(lines):
        draw.text((PAD, PAD + i * LINE), line, fill="black", font=font)
    top = PAD + HEADER_LINES * LINE + PAD
    targets = set(item.query.target_ids)
    tile_chars = max(6, tile // 6)

    def cell(column: int, ref: ImageRef | None, captions: list[str], outline: tuple | None) -> None:
        x = PAD + column * (tile + PAD)
        if ref is not None:
            canvas.paste(_thumb(benchmark.load_image(ref), tile), (x, top))
        else:
            draw.rectangle([x, top, x + tile - 1, top + tile - 1], fill=(235, 235, 235))
        if outline is not None:
            draw.rectangle([x, top, x + tile - 1, top + tile - 1], outline=outline, width=BORDER)
        for i, caption in enumerate(captions[:CAPTION_LINES]):
            draw.text((x, top + tile + 2 + i * LINE), _short(caption, tile_chars), fill="black", font=font)

    ref = item.query.reference
    cell(0, ref, ["reference", ref.image_id if ref else "(text only)"], REF_COLOR)
    for r, (g, score) in enumerate(zip(item.ranked, item.scores), 1):
        image = benchmark.gallery[g]
        is_gt = image.image_id in targets
        cell(
            r,
            image,
            [f"#{r}  cos {score:.3f}" + ("  GT" if is_gt else ""), image.image_id],
            GT_COLOR if is_gt else None,
        )
    if labelled:
        main = item.query.target_ids[0] if item.query.target_ids else None
        where = benchmark.gallery_index().get(main) if main else None
        rank = f"rank {item.target_rank}" if item.target_rank else "not ranked"
        cell(
            1 + k,
            benchmark.gallery[where] if where is not None else None,
            [f"target ({rank})", main or "–"],
            GT_COLOR,
        )
    return canvas


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:60] or "query"


def write_grids(
    benchmark: Benchmark, items: list[Retrieved], out_dir: str | Path, k: int, tile: int = 128
) -> list[Path]:
    """One ``<position>_<query id>.png`` per retrieved query under ``out_dir``; returns the paths."""
    paths = []
    for item in items:
        image = render_grid(benchmark, item, k, tile)
        path = Path(out_dir) / f"{item.query_index:05d}_{safe_name(item.query.query_id)}.png"
        paths.append(atomic_write(path, lambda f, im=image: im.save(f, format="PNG")))
    return paths
