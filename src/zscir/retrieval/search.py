"""Chunked similarity search with a defined tie order.

Never materialises the full Q×N similarity matrix: queries are processed in chunks sized to a memory
budget, and only ``k`` indices per query are kept. Ties are broken towards the lower gallery index
(the order a stable sort gives), so results do not depend on the device or the sort implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: similarity elements computed at once (float32): 2**25 ≈ 128 MiB per chunk
DEFAULT_BUDGET = 2**25


def normalize(x: Tensor) -> Tensor:
    """L2-normalise rows in float32 (metrics are never computed in reduced precision)."""
    return F.normalize(x.float(), dim=-1)


def chunk_rows(num_queries: int, num_gallery: int, budget: int = DEFAULT_BUDGET) -> int:
    return max(1, min(num_queries, budget // max(1, num_gallery)))


def topk_search(
    query_feats: Tensor,
    gallery_feats: Tensor,
    k: int,
    exclude: Tensor | None = None,
    budget: int = DEFAULT_BUDGET,
    normalized: bool = False,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` gallery indices and cosine scores per query, best first.

    Args:
        query_feats: [Q, D]; gallery_feats: [N, D]; L2-normalised here unless ``normalized``.
        k: results per query (at most N, or N − 1 with ``exclude``).
        exclude: optional [Q] gallery index per query to leave out (CIRR's reference image); -1 = none.
        budget: number of similarity values computed at once.

    Returns:
        (indices [Q, k] long, scores [Q, k] float32), both on the features' device.
    """
    q = query_feats if normalized else normalize(query_feats)
    g = gallery_feats if normalized else normalize(gallery_feats)
    n = g.shape[0]
    k = min(k, n - (1 if exclude is not None else 0))
    out_idx = torch.empty(q.shape[0], k, dtype=torch.long, device=q.device)
    out_val = torch.empty(q.shape[0], k, dtype=torch.float32, device=q.device)
    step = chunk_rows(q.shape[0], n, budget)
    for start in range(0, q.shape[0], step):
        s = q[start : start + step] @ g.T
        if exclude is not None:
            ex = exclude[start : start + step].to(s.device)
            rows = torch.nonzero(ex >= 0).squeeze(1)
            s[rows, ex[rows]] = float("-inf")
        # One extra item tells whether the k-th value is tied with an item left outside the top-k;
        # topk chooses arbitrarily among tied items, so those rows are redone with a stable sort.
        vals, idx = s.topk(min(k + 1, s.shape[1]), dim=1)
        boundary = (
            vals[:, k] >= vals[:, k - 1] if vals.shape[1] > k else s.new_zeros(len(s), dtype=torch.bool)
        )
        vals, idx = vals[:, :k], idx[:, :k]
        for r in torch.nonzero(boundary).squeeze(1).tolist():
            order = torch.sort(s[r], descending=True, stable=True).indices[:k]
            idx[r], vals[r] = order, s[r, order]
        # Order inside the top-k: by score, ties by index.
        idx, perm = idx.sort(dim=1)
        vals = vals.gather(1, perm)
        vals, perm = vals.sort(dim=1, descending=True, stable=True)
        out_idx[start : start + step] = idx.gather(1, perm)
        out_val[start : start + step] = vals
        del s  # free this chunk before the next one is allocated: peak memory = one chunk
    return out_idx, out_val


def target_ranks(
    query_feats: Tensor,
    gallery_feats: Tensor,
    target: Tensor,
    exclude: Tensor | None = None,
    candidates: Tensor | None = None,
    budget: int = DEFAULT_BUDGET,
) -> Tensor:
    """0-based rank of each query's target gallery item, counting ties towards the lower index.

    Args:
        target: [Q] gallery index of the target.
        exclude: optional [Q] gallery index removed from the ranking (-1 = none); it is never counted.
        candidates: optional [Q, C] gallery indices; the rank is then among these only (CIRR subset).
            The target must be one of them.

    Equal to the position of the target in a stable descending sort of the (restricted) scores, but
    computed by counting, without sorting.
    """
    q, g = normalize(query_feats), normalize(gallery_feats)
    ranks = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
    n = g.shape[0] if candidates is None else candidates.shape[1]
    step = chunk_rows(q.shape[0], n, budget)
    for start in range(0, q.shape[0], step):
        stop = min(start + step, q.shape[0])
        tgt = target[start:stop].to(q.device)
        if candidates is None:
            s = q[start:stop] @ g.T
            index = torch.arange(g.shape[0], device=q.device).expand_as(s)
        else:
            index = candidates[start:stop].to(q.device)
            if not bool((index == tgt[:, None]).any(1).all()):
                raise ValueError("a target is not among its query's candidates")
            s = torch.einsum("qd,qcd->qc", q[start:stop], g[index])
        # recompute the target's score exactly as it appears in s, so ties are exact ties
        t_score = (
            torch.where(index == tgt[:, None], s, torch.full_like(s, float("-inf")))
            .max(1, keepdim=True)
            .values
        )
        ahead = (s > t_score) | ((s == t_score) & (index < tgt[:, None]))
        if exclude is not None:
            ahead &= index != exclude[start:stop].to(q.device)[:, None]
        ranks[start:stop] = ahead.sum(1)
    return ranks
