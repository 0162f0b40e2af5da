"""Caption → image retrieval on a held-out image–caption corpus (how well a backbone aligns the two
modalities; used to report the synthetic-world CLIP's R@1). Queries are captions with no reference
image; each caption's own image is its only positive."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from zscir.benchmarks.base import Benchmark, Query
from zscir.data.corpora import load_image_caption_corpus
from zscir.metrics.functional import recall_from_ranks
from zscir.retrieval.search import target_ranks


class CaptionToImage(Benchmark):
    kind = "caption_to_image"
    metric_names = ("recall@1", "recall@5", "recall@10")

    def __init__(self, root: str | Path, split: str = "val", name: str | None = None):
        super().__init__(root, split, name)
        samples = load_image_caption_corpus(self.root / split)
        self.gallery = [s.image for s in samples]
        self.queries = [Query(s.key, None, (s.caption,), (s.key,)) for s in samples]

    def score(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, float]:
        index = self.gallery_index()
        target = torch.tensor([index[q.target_ids[0]] for q in self.queries])
        return recall_from_ranks(target_ranks(query_feats, gallery_feats, target), (1, 5, 10))
