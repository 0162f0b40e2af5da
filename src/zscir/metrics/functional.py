"""Pure metric functions: features (or rankings) in, percentages out.

Conventions shared by every function: cosine similarity on L2-normalised float32 features, ranking
descending with ties broken towards the lower gallery index (GeneCIS: towards the target), results in
percent. Ids are resolved to gallery indices by the benchmark classes (``zscir.benchmarks``),
which hold each benchmark's rules; these functions only count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from zscir.retrieval.search import (
    PreparedGallery,
    check_finite,
    normalize,
    target_ranks,
    target_ranks_many,
)


def recall_from_ranks(ranks: Tensor, ks: Sequence[int], prefix: str = "recall") -> dict[str, float]:
    """``{f"{prefix}@{k}": 100 · mean(rank < k)}`` from 0-based target ranks.

    Example:
        >>> recall_from_ranks(torch.tensor([0, 3, 10, 60]), [1, 5])
        {'recall@1': 25.0, 'recall@5': 50.0}
    """
    return {f"{prefix}@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}


def fashioniq_recall(query_feats: Tensor, gallery_feats: Tensor, target: Tensor) -> dict[str, float]:
    """FashionIQ recall@{10,50} of one category: the target's rank over the whole category gallery,
    the reference image NOT removed.

    Args:
        query_feats: [Q, D]; gallery_feats: [N, D] (the category's split list, in file order).
        target: [Q] gallery index of each triplet's ``target``.

    Example:
        >>> g = torch.eye(60)
        >>> q = torch.stack([g[3], g[40] + 0.5 * g[7]])  # query 1 scores gallery item 40, then 7
        >>> fashioniq_recall(q, g, torch.tensor([3, 7]))
        {'recall@10': 100.0, 'recall@50': 100.0}
        >>> fashioniq_recall(q, g, torch.tensor([50, 7]))["recall@10"]  # 0-score ties: lower index first, rank 50
        50.0
    """
    return recall_from_ranks(target_ranks(query_feats, gallery_feats, target), (10, 50))


def fashioniq_recall_without_reference(
    query_feats: Tensor, gallery_feats: Tensor, target: Tensor, reference: Tensor
) -> dict[str, float]:
    """FashionIQ recall@{10,50} with each query's reference image removed from its ranking (PLI's
    protocol, ``evaluators/metric_calculators.py:29``; there the reference's similarity is set to the
    smallest value of the whole similarity matrix, so it ranks last: removal, short of exact ties).

    Args:
        query_feats: [Q, D]; gallery_feats: [N, D].
        target: [Q] gallery index of each query's target; reference: [Q] gallery index of its reference.

    Example:
        >>> g = torch.eye(12)
        >>> q = torch.cat([torch.linspace(1.0, 0.5, 11), torch.zeros(1)])[None]  # ranks 0, 1, ..., 11
        >>> fashioniq_recall_without_reference(q, g, torch.tensor([10]), torch.tensor([0]))["recall@10"]
        100.0
        >>> fashioniq_recall(q, g, torch.tensor([10]))["recall@10"]  # the reference counted: rank 10
        0.0
    """
    return recall_from_ranks(target_ranks(query_feats, gallery_feats, target, exclude=reference), (10, 50))


def cirr_metrics(
    query_feats: Tensor,
    gallery_feats: Tensor | PreparedGallery,
    target: Tensor,
    reference: Tensor,
    subset: Tensor,
) -> dict[str, float]:
    """CIRR recall@{1,5,10,50} and recall_subset@{1,2,3}.

    Both rankings come from one pass over the similarity matrix.

    Args:
        query_feats: [Q, D]; gallery_feats: [N, D] or a prepared gallery
            (:func:`zscir.retrieval.search.prepare_gallery`).
        target: [Q] gallery index of ``target_hard``.
        reference: [Q] gallery index of the reference image, deleted from the ranking.
        subset: [Q, S] gallery indices of ``img_set.members`` minus the reference (-1 pads shorter rows);
            its ranking is the order these take in the reference-free global ranking.

    Example:
        >>> g = torch.eye(4)
        >>> q = torch.tensor([[0.9, 0.8, 0.7, 0.0]])  # ranking 0, 1, 2, 3; 0 is the reference
        >>> m = cirr_metrics(q, g, torch.tensor([2]), torch.tensor([0]), torch.tensor([[3, 2]]))
        >>> m["recall@1"], m["recall@5"], m["recall_subset@1"]
        (0.0, 100.0, 100.0)
    """
    ranks, sub_ranks = target_ranks_many(
        query_feats, gallery_feats, target, [(reference, None), (None, subset)]
    )
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
    """CIRCO mAP@{5,10,25,50} over all ground truths and recall@{5,10,25,50} of the first one
    (``target_img_id``).

    Example:
        >>> ranked = torch.tensor([[4, 1, 2, 3, 0]])
        >>> m = circo_metrics_from_ranking(ranked, [[1, 9]])  # target 1 at rank 2, GT 9 not retrieved
        >>> m["map@5"], m["recall@5"]
        (25.0, 100.0)
    """
    ranked = ranked.cpu()
    out = {
        f"map@{k}": 100.0 * average_precision_at_k(ranked, positives, k).mean().item()
        for k in (5, 10, 25, 50)
    }
    first = torch.tensor([p[0] for p in positives])
    for k in (5, 10, 25, 50):
        out[f"recall@{k}"] = 100.0 * (ranked[:, :k] == first[:, None]).any(1).double().mean().item()
    return out


def genecis_recall(
    query_feats: Tensor, candidate_feats: Tensor, valid: Tensor | None = None, ks: Sequence[int] = (1, 2, 3)
) -> dict[str, float]:
    """GeneCIS recall@k: per query, its own candidates ``[target] + gallery`` (target at index 0) are
    ranked by cosine similarity; a hit when the target is among the first k. A candidate scoring exactly
    as the target (the same image twice in a template) ranks after it: ties count for the target.

    Args:
        query_feats: [Q, D]; candidate_feats: [Q, C, D], index 0 = the target.
        valid: optional [Q, C] bool; False marks padding in rows with fewer candidates.

    Raises:
        NonFiniteFeatures: a query, or a (non-padding) candidate of a query, holds NaN/inf.

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> c = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],   # target tied with candidate 1
        ...                   [[0.0, 1.0], [1.0, 0.1], [1.0, 0.2]]])  # target last
        >>> genecis_recall(q, c)
        {'recall@1': 50.0, 'recall@2': 50.0, 'recall@3': 100.0}
    """
    check_finite(query_feats, "query")
    real = candidate_feats if valid is None else candidate_feats.masked_fill(~valid[..., None].bool(), 0)
    check_finite(real, "candidate-set")  # row = a query's candidates; padding is never ranked
    ranks = []
    for start in range(0, query_feats.shape[0], 4096):  # bounded memory; C is small (15 in GeneCIS)
        q = normalize(query_feats[start : start + 4096])
        c = normalize(candidate_feats[start : start + 4096])
        s = (q[:, None, :] * c).sum(-1)  # not a batched matmul: identical candidates get identical scores
        ahead = s[:, 1:] > s[:, :1]
        if valid is not None:
            ahead &= valid[start : start + 4096, 1:].to(ahead.device)
        ranks.append(ahead.sum(1))
    return recall_from_ranks(torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long), ks)
