"""torchmetrics wrapper: collect query and gallery features across ranks, then score a benchmark.

State is features + integer positions (into ``benchmark.queries`` / ``benchmark.gallery``), gathered
with ``cat`` across processes. ``DistributedSampler`` pads the last batch by repeating samples, so
:meth:`compute` keeps the first occurrence of each position: 2-process results equal 1-process results.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from zscir.benchmarks.base import Benchmark
from zscir.retrieval.search import check_finite


def dedupe_by_index(index: Tensor, feats: Tensor, size: int) -> Tensor | None:
    """Features ordered by position 0..size-1, duplicates dropped; None if any position is missing."""
    order = torch.argsort(index, stable=True)
    index, feats = index[order], feats[order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    index, feats = index[first], feats[first]
    if index.numel() != size or (size and int(index[-1]) != size - 1):
        return None
    return feats


class BenchmarkMetric(Metric):
    """Scores one benchmark from features gathered over all ranks.

    ``update("gallery" | "query", positions, feats)``; a gallery encoded outside the loop (feature
    cache, frozen image tower) is set with :meth:`set_gallery` on every rank instead.

    Every feature on its way to :meth:`Benchmark.score` passes :meth:`set_gallery` or :meth:`compute`,
    which refuse NaN/inf (:class:`~zscir.retrieval.search.NonFiniteFeatures`, naming the ids), so neither
    metrics nor :attr:`features` (hence no ``features.npz``, submission or retrieval grid) come from them.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, benchmark: Benchmark, **kwargs: object):
        super().__init__(**kwargs)
        self.benchmark = benchmark
        for kind in ("gallery", "query"):
            self.add_state(f"{kind}_index", default=[], dist_reduce_fx="cat")
            self.add_state(f"{kind}_feats", default=[], dist_reduce_fx="cat")
        self.fixed_gallery: Tensor | None = None
        #: features of the last successful :meth:`compute` (query, gallery), for saving to disk
        self.features: tuple[Tensor, Tensor] | None = None

    def set_gallery(self, feats: Tensor) -> None:
        if feats.shape[0] != len(self.benchmark.gallery):
            raise ValueError(
                f"{self.benchmark.name}: gallery features have {feats.shape[0]} rows, gallery has {len(self.benchmark.gallery)}"
            )
        self._check_finite("gallery", feats)
        self.fixed_gallery = feats.float()

    def update(self, kind: str, index: Tensor, feats: Tensor) -> None:
        if kind not in ("gallery", "query"):
            raise ValueError(f"kind must be 'gallery' or 'query', got {kind!r}")
        getattr(self, f"{kind}_index").append(index.long())
        getattr(self, f"{kind}_feats").append(feats.detach().float())

    def gathered(self, kind: str) -> Tensor | None:
        if kind == "gallery" and self.fixed_gallery is not None:
            return self.fixed_gallery
        index, feats = getattr(self, f"{kind}_index"), getattr(self, f"{kind}_feats")
        if isinstance(index, list) and not index:
            return None
        size = len(self.benchmark.gallery if kind == "gallery" else self.benchmark.queries)
        return dedupe_by_index(dim_zero_cat(index), dim_zero_cat(feats), size)

    def _check_finite(self, kind: str, feats: Tensor) -> None:
        items = self.benchmark.gallery if kind == "gallery" else self.benchmark.queries
        ids = [r.image_id for r in items] if kind == "gallery" else [q.query_id for q in items]
        check_finite(feats, f"{self.benchmark.name} {kind}", ids)

    def compute(self) -> dict[str, float]:
        queries, gallery = self.gathered("query"), self.gathered("gallery")
        self.features = None
        if queries is None or gallery is None:
            warnings.warn(
                f"{self.benchmark.name}: evaluation saw only part of the queries or gallery "
                "(limit_*_batches or fast_dev_run?); no metrics computed",
                stacklevel=2,
            )
            return {}
        self._check_finite("query", queries)
        self._check_finite("gallery", gallery)
        self.features = (queries.cpu(), gallery.to(queries.device).cpu())
        if not self.benchmark.labelled:
            return {}
        return self.benchmark.score(*self.features)
