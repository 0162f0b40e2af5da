"""Benchmarks in their official on-disk layouts.

``build_benchmark(kind, root, split, name=None, **options)`` is the one way to load one; ``BENCHMARKS``
maps each kind to its class (imported lazily). Options are the class's own keyword arguments
(FashionIQ ``category``; GeneCIS ``task``, ``vg_dir``, ``coco_dir``); an unknown one fails by name.
"""

from __future__ import annotations

import importlib
import inspect

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
    "fashioniq": "zscir.data.benchmarks.fashioniq:FashionIQ",
    "cirr": "zscir.data.benchmarks.cirr:CIRR",
    "circo": "zscir.data.benchmarks.circo:CIRCO",
    "genecis": "zscir.data.benchmarks.genecis:GeneCIS",
    "caption_to_image": "zscir.data.benchmarks.caption_to_image:CaptionToImage",
}


def build_benchmark(
    kind: str, root: str, split: str, name: str | None = None, **options: object
) -> Benchmark:
    if kind not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {kind!r}; available: {', '.join(sorted(BENCHMARKS))}")
    module, name_ = BENCHMARKS[kind].split(":")
    cls = getattr(importlib.import_module(module), name_)
    accepted = [
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root", "split", "name")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"benchmark {kind!r} has no option(s) {unknown}; its options: {accepted or 'none'}")
    return cls(root, split, name=name, **options)
