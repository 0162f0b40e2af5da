"""A small labelled set in the ``benchmark=custom`` layout (generated images), for the API, query and
custom-benchmark tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, seed: int, size: int = 40) -> Path:
    """A random-noise RGB JPEG (distinct per seed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def make_set(root: Path, n: int = 10) -> list[str]:
    """``root/images/{shoes,bags}/*.jpg`` (n images) and ``root/val.jsonl`` (4 queries with 1-2 targets);
    returns the image ids (paths relative to images/), sorted."""
    ids = [f"{'shoes' if i % 2 == 0 else 'bags'}/{i + 1:04d}.jpg" for i in range(n)]
    for seed, image_id in enumerate(ids):
        write_image(root / "images" / image_id, seed)
    queries = [
        {"reference": ids[0], "caption": "is red with a lower heel", "targets": [ids[2], ids[4]]},
        {"reference": ids[1], "caption": "in leather", "targets": [ids[3]]},
        {"reference": ids[5], "caption": "smaller", "targets": [ids[7], ids[9]]},
        {"reference": ids[6], "caption": "without straps", "targets": [ids[8]]},
    ]
    (root / "val.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    return sorted(ids)
