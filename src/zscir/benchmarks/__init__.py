"""Benchmarks in their official on-disk layouts.

``build_benchmark(kind, root, split, name=None, **options)`` is the one way to load one; ``BENCHMARKS``
maps each kind to its class (imported lazily). Options are the class's own keyword arguments
(FashionIQ ``category``; GeneCIS ``task``, ``vg_dir``, ``coco_dir``); an unknown one fails by name.
"""

from __future__ import annotations

import importlib
import inspect

from zscir.benchmarks.base import (
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
    "benchmark_class",
    "build_benchmark",
]

BENCHMARKS: dict[str, str] = {
    "fashioniq": "zscir.benchmarks.fashioniq:FashionIQ",
    "cirr": "zscir.benchmarks.cirr:CIRR",
    "circo": "zscir.benchmarks.circo:CIRCO",
    "genecis": "zscir.benchmarks.genecis:GeneCIS",
    "caption_to_image": "zscir.benchmarks.caption_to_image:CaptionToImage",
    "custom": "zscir.benchmarks.custom:Custom",
}


def benchmark_class(kind: str) -> type[Benchmark]:
    """The class registered for ``kind`` in :data:`BENCHMARKS`.

    Raises:
        KeyError: ``kind`` is not registered (the message lists the known kinds).
    """
    if kind not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {kind!r}; available: {', '.join(sorted(BENCHMARKS))}")
    module, name = BENCHMARKS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def build_benchmark(
    kind: str, root: str, split: str, name: str | None = None, **options: object
) -> Benchmark:
    """Load benchmark ``kind`` (:data:`BENCHMARKS`) from ``root``, split ``split``, with its own options.

    Raises:
        KeyError: ``kind`` is not registered.
        ValueError: an option the benchmark class does not take.
    """
    cls = benchmark_class(kind)
    accepted = [
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root", "split", "name")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"benchmark {kind!r} has no option(s) {unknown}; its options: {accepted or 'none'}")
    return cls(root, split, name=name, **options)
