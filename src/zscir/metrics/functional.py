"""Pure metric functions: features (or rankings) in, percentages out.

Conventions shared by every function: cosine similarity on L2-normalised float32 features, ranking
descending with ties broken towards the lower gallery index, results in percent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from zscir.retrieval.search import target_ranks, topk_search


def recall_from_ranks(ranks: Tensor, ks: Sequence[int], prefix: str = "recall") -> dict[str, float]:
    """``{f"{prefix}@{k}": 100 · mean(rank < k)}`` from 0-based target ranks.

    Example:
        >>> recall_from_ranks(torch.tensor([0, 3, 10]), [1, 5])
        {'recall@1': 33.33333333333333, 'recall@5': 66.66666666666667}
    """
    return {f"{prefix}@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}


def cirr_metrics(
    query_feats: Tensor, gallery_feats: Tensor, target: Tensor, reference: Tensor, subset: Tensor
) -> dict[str, float]:
    """CIRR recall@{1,5,10,50} and recall_subset@{1,2,3}.

    Args:
        target: [Q] gallery index of ``target_hard``.
        reference: [Q] gallery index of the reference image, deleted from the ranking.
        subset: [Q, S] gallery indices of ``img_set.members`` minus the reference.
    """
    ranks = target_ranks(query_feats, gallery_feats, target, exclude=reference)
    sub_ranks = target_ranks(query_feats, gallery_feats, target, candidates=subset)
    return {
        **recall_from_ranks(ranks, (1, 5, 10, 50)),
        **recall_from_ranks(sub_ranks, (1, 2, 3), "recall_subset"),
    }


def average_precision_at_k(ranked: Tensor, positives: Sequence[Sequence[int]], k: int) -> Tensor:
    """CIRCO AP@k per query: Σ_{i≤k} P@i·rel_i / min(k, #positives).

    Args:
        ranked: [Q, ≥k] gallery indices, best first.
        positives: per query, the gallery indices of all ground truths.

    Example:
        >>> average_precision_at_k(torch.tensor([[5, 1, 2]]), [[1, 7, 8]], 3)
        tensor([0.1667], dtype=torch.float64)
    """
    rel = torch.stack(
        [
            torch.isin(ranked[i, :k], torch.as_tensor(list(p), dtype=ranked.dtype))
            for i, p in enumerate(positives)
        ]
    ).double()
    precision = rel.cumsum(1) / torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
    norm = torch.tensor([min(k, len(p)) for p in positives], dtype=torch.float64)
    return (precision * rel).sum(1) / norm


def circo_metrics_from_ranking(ranked: Tensor, positives: Sequence[Sequence[int]]) -> dict[str, float]:
    """CIRCO mAP@{5,10,25,50} over all ground truths and recall@{5,10,25,50} of the first one."""
    ranked = ranked.cpu()
    out = {
        f"map@{k}": 100.0 * average_precision_at_k(ranked, positives, k).mean().item()
        for k in (5, 10, 25, 50)
    }
    first = torch.tensor([p[0] for p in positives])
    for k in (5, 10, 25, 50):
        out[f"recall@{k}"] = 100.0 * (ranked[:, :k] == first[:, None]).any(1).double().mean().item()
    return out


def circo_metrics(
    query_feats: Tensor, gallery_feats: Tensor, positives: Sequence[Sequence[int]]
) -> dict[str, float]:
    """CIRCO metrics from features: top-50 over the whole gallery, reference not removed."""
    ranked, _ = topk_search(query_feats, gallery_feats, 50)
    return circo_metrics_from_ranking(ranked, positives)
