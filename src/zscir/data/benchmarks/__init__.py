"""Benchmarks in their official on-disk layouts.

``build_benchmark(kind, root, split, name=None, **options)`` is the one way to load one; ``BENCHMARKS``
maps each kind to its class (imported lazily).
"""

from __future__ import annotations

import importlib

from zscir.data.benchmarks.base import (
    AnnotationError,
    Benchmark,
    DatasetLayoutError,
    ImageLoadError,
    ImageRef,
    Query,
)

__all__ = [
    "BENCHMARKS",
    "AnnotationError",
    "Benchmark",
    "DatasetLayoutError",
    "ImageLoadError",
    "ImageRef",
    "Query",
    "build_benchmark",
]

BENCHMARKS: dict[str, str] = {
    "cirr": "zscir.data.benchmarks.cirr:CIRR",
    "circo": "zscir.data.benchmarks.circo:CIRCO",
    "caption_to_image": "zscir.data.benchmarks.caption_to_image:CaptionToImage",
}


def build_benchmark(
    kind: str, root: str, split: str, name: str | None = None, **options: object
) -> Benchmark:
    if kind not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {kind!r}; available: {', '.join(sorted(BENCHMARKS))}")
    module, cls = BENCHMARKS[kind].split(":")
    return getattr(importlib.import_module(module), cls)(root, split, name=name, **options)
