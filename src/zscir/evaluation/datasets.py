"""Datasets that feed benchmark galleries and queries to a method."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from zscir.benchmarks.base import Benchmark


class GalleryDataset(Dataset):
    """``{"index": position in benchmark.gallery, "pixels": transformed image}``."""

    def __init__(self, benchmark: Benchmark, transform: Callable):
        self.benchmark, self.transform = benchmark, transform

    def __len__(self) -> int:
        return len(self.benchmark.gallery)

    def __getitem__(self, i: int) -> dict:
        ref = self.benchmark.gallery[i]
        return {"index": i, "pixels": self.transform(self.benchmark.load_image(ref))}


class QueryDataset(Dataset):
    """``{"index", "pixels" (reference image, zeros for text-only queries), "texts" (caption variants)}``."""

    def __init__(self, benchmark: Benchmark, transform: Callable, image_size: int):
        self.benchmark, self.transform, self.image_size = benchmark, transform, image_size

    def __len__(self) -> int:
        return len(self.benchmark.queries)

    def __getitem__(self, i: int) -> dict:
        q = self.benchmark.queries[i]
        if q.reference is None:
            pixels = torch.zeros(3, self.image_size, self.image_size)
        else:
            pixels = self.transform(self.benchmark.load_image(q.reference))
        return {"index": i, "pixels": pixels, "texts": q.texts}


def collate_queries(items: list[dict]) -> dict:
    """Stack pixels and indices; ``texts`` becomes one list of captions per variant."""
    n_variants = {len(it["texts"]) for it in items}
    if len(n_variants) != 1:
        raise ValueError(
            f"all queries of a benchmark need the same number of caption variants, got {n_variants}"
        )
    return {
        "index": torch.tensor([it["index"] for it in items]),
        "pixels": torch.stack([it["pixels"] for it in items]),
        "texts": [[it["texts"][v] for it in items] for v in range(n_variants.pop())],
    }
