"""Chunked similarity search with a defined tie order.

Never materialises the full Q×N similarity matrix: queries are processed in chunks sized to a memory
budget, and only ``k`` indices per query are kept. Ties are broken towards the lower gallery index
(the order a stable sort gives), so results do not depend on the device or the sort implementation.

Identical gallery features always score identically: a BLAS matrix product may round the same dot
product differently depending on a row's position, which would turn an exact tie (the same image
twice in a gallery) into an arbitrary order. Duplicate gallery rows are therefore found once (a row
hash, then an exact comparison) and given the score of their first copy.

Non-finite features are refused (:func:`check_finite`) wherever features enter a ranking or a store:
NaN compares false with everything, so a NaN query ranks its target first (100 % recall) and a NaN
gallery row is first in every list.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: similarity elements computed at once (float32): 2**25 ≈ 128 MiB per chunk
DEFAULT_BUDGET = 2**25


#: the usual reasons a backbone yields NaN/inf features, named by :func:`check_finite` unless the caller
#: knows better (the evaluation loop tells the two apart from the weights and ``trainer.precision``)
LIKELY_CAUSE = (
    "likely cause: precision (fp16/bf16 overflow in the backbone; evaluate with trainer.precision=32-true) "
    "or the checkpoint (broken weights holding NaN/inf; check the checkpoint or backbone weights file)"
)
#: ids named in a :class:`NonFiniteFeatures` message
SHOWN_IDS = 5


class NonFiniteFeatures(ValueError):
    """Features hold NaN or ±inf, so any ranking, score or stored copy of them would be meaningless.

    Attributes:
        problem: what is wrong (how many rows, which ids), without the cause.
        cause: the likely cause and what to do.
    """

    def __init__(self, problem: str, cause: str = LIKELY_CAUSE):
        super().__init__(f"{problem}; {cause}")
        self.problem, self.cause = problem, cause

    def __reduce__(self) -> tuple:  # rebuilt from both parts when it crosses processes (ddp_spawn)
        return NonFiniteFeatures, (self.problem, self.cause)

    def with_cause(self, cause: str) -> NonFiniteFeatures:
        """The same error with a more specific ``cause``."""
        return NonFiniteFeatures(self.problem, cause)


def check_finite(
    feats: Tensor | np.ndarray, what: str, ids: Sequence[str] | None = None, cause: str = LIKELY_CAUSE
) -> None:
    """Refuse features holding NaN/inf before they are ranked, scored or stored.

    Args:
        feats: [N, ...] features (tensor or array); row i is bad when any of its values is NaN or ±inf.
        what: what the rows are, for the message (e.g. ``"cirr query"``).
        ids: the N row ids; without them the message names row positions.
        cause: the likely cause and fix, appended to the message.

    Raises:
        NonFiniteFeatures: naming how many rows are bad, the ids of the first :data:`SHOWN_IDS`, and ``cause``.
    """
    t = torch.as_tensor(feats)
    if not t.is_floating_point() or t.numel() == 0:
        return
    # a finite float32 sum proves every value finite (NaN or ±inf would make it NaN or ±inf) in one pass
    # without a mask; only when the sum is not finite (bad values, or an overflowing sum) are rows checked
    if bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all()):
        return
    bad = torch.nonzero(~torch.isfinite(t).reshape(t.shape[0], -1).all(1)).squeeze(1).tolist()
    shown = [str(ids[i]) for i in bad[:SHOWN_IDS]] if ids is not None else bad[:SHOWN_IDS]
    more = f" and {len(bad) - SHOWN_IDS} more" if len(bad) > SHOWN_IDS else ""
    raise NonFiniteFeatures(
        f"{len(bad)} of {t.shape[0]} {what} feature rows hold NaN/inf ({'ids' if ids is not None else 'rows'} "
        f"{shown}{more}); refusing to rank, score or store them (NaN compares false with everything: a NaN "
        "query puts its target first, a NaN gallery row tops every list)",
        cause,
    )


def normalize(x: Tensor) -> Tensor:
    """L2-normalise rows in float32 (metrics are never computed in reduced precision)."""
    return F.normalize(x.float(), dim=-1)


def chunk_rows(num_queries: int, num_gallery: int, budget: int = DEFAULT_BUDGET) -> int:
    return max(1, min(num_queries, budget // max(1, num_gallery)))


#: columns that go into the duplicate-row hash (spread over the feature dimension)
HASH_COLUMNS = 64


def duplicate_rows(g: Tensor, budget: int = DEFAULT_BUDGET) -> tuple[Tensor, Tensor] | None:
    """``(rows, first)``: every row of ``g`` equal to an earlier row, and the index of that row's first
    copy; None when all rows are distinct. Memory stays within ``budget`` elements beyond ``g``.

    Rows are bucketed by a hash of the bits of :data:`HASH_COLUMNS` spread-out columns (cheap next to
    the similarity product), and only rows sharing a bucket are compared exactly, on every column.
    """
    if g.shape[0] < 2:
        return None
    cols = torch.arange(0, g.shape[1], max(1, g.shape[1] // HASH_COLUMNS), device=g.device)
    bits = torch.arange(1, len(cols) + 1, device=g.device, dtype=torch.int64) * 2654435761 % (2**31 - 1)
    hashes = torch.empty(g.shape[0], dtype=torch.int64, device=g.device)
    step = max(1, budget // len(cols))
    for start in range(0, g.shape[0], step):  # wrap-around int64 arithmetic: a hash, not a number
        block = g[start : start + step, cols].contiguous().view(torch.int32).long()
        hashes[start : start + step] = (block * bits).sum(1)
    _, inverse, counts = torch.unique(hashes, return_inverse=True, return_counts=True)
    if int(counts.max()) == 1:
        return None
    rows, first = [], []
    for group in torch.nonzero(counts > 1).squeeze(1).tolist():
        members = torch.nonzero(inverse == group).squeeze(1)  # ascending: gallery order
        # exact comparison on every column (bits, so -0.0 != 0.0 and NaN == NaN bitwise)
        _, same = torch.unique(g[members].contiguous().view(torch.int32), dim=0, return_inverse=True)
        for cls in torch.unique(same).tolist():
            copies = members[same == cls].tolist()
            rows += copies[1:]
            first += [copies[0]] * (len(copies) - 1)
    if not rows:
        return None
    return torch.tensor(rows, device=g.device), torch.tensor(first, device=g.device)


@dataclass(frozen=True, eq=False)
class PreparedGallery:
    """A gallery ready to be searched: its L2-normalised float32 features and its duplicate-row map.

    Both depend on the gallery alone, so they are computed once per gallery (:func:`prepare_gallery`)
    and reused by every ranking over it (validation metrics, test submission, each evaluation), instead
    of once per call (at N = 123k × 768 normalising takes ~0.4 s and a copy of the gallery, the duplicate
    map ~0.2 s). Every ranking function here takes one wherever it takes gallery features.

    Attributes:
        feats: [N, D] float32, L2-normalised rows.
        duplicates: ``(rows, first)`` as :func:`duplicate_rows` gives them, or None.
    """

    feats: Tensor
    duplicates: tuple[Tensor, Tensor] | None

    @property
    def shape(self) -> torch.Size:
        return self.feats.shape

    def __len__(self) -> int:
        return self.feats.shape[0]


def prepare_gallery(
    gallery_feats: Tensor | PreparedGallery, budget: int = DEFAULT_BUDGET, normalized: bool = False
) -> PreparedGallery:
    """Check, normalise (unless ``normalized``) and index the duplicates of ``gallery_feats`` [N, D] once.

    Raises:
        NonFiniteFeatures: a gallery row holds NaN/inf.
    """
    if isinstance(gallery_feats, PreparedGallery):
        return gallery_feats
    check_finite(gallery_feats, "gallery")
    g = gallery_feats if normalized else normalize(gallery_feats)
    return PreparedGallery(g, duplicate_rows(g, budget))


def similarity_chunks(
    query_feats: Tensor,
    gallery_feats: Tensor | PreparedGallery,
    budget: int = DEFAULT_BUDGET,
    normalized: bool = False,
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(start, stop, scores[stop - start, N])`` cosine similarities, a few query rows at a time;
    identical gallery rows get bitwise identical scores. ``gallery_feats`` may be a
    :class:`PreparedGallery` (then it is used as prepared; ``normalized`` applies to the queries).

    Raises:
        NonFiniteFeatures: a query or gallery row holds NaN/inf (every ranking passes here).
    """
    check_finite(query_feats, "query")
    prepared = prepare_gallery(gallery_feats, budget, normalized)
    q = query_feats if normalized else normalize(query_feats)
    g, duplicates = prepared.feats, prepared.duplicates
    step = chunk_rows(q.shape[0], g.shape[0], budget)
    for start in range(0, q.shape[0], step):
        stop = min(start + step, q.shape[0])
        s = q[start:stop] @ g.T
        if duplicates is not None:
            s[:, duplicates[0]] = s[:, duplicates[1]]
        yield start, stop, s
        del s  # the consumer deletes its reference too: one chunk alive at a time


def topk_search(
    query_feats: Tensor,
    gallery_feats: Tensor | PreparedGallery,
    k: int,
    exclude: Tensor | None = None,
    budget: int = DEFAULT_BUDGET,
    normalized: bool = False,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` gallery indices and cosine scores per query, best first.

    Args:
        query_feats: [Q, D]; gallery_feats: [N, D] or a :class:`PreparedGallery` (searched as prepared);
            L2-normalised here unless ``normalized``.
        k: results per query (at most N, or N − 1 with ``exclude``).
        exclude: optional [Q] gallery index per query to leave out (CIRR's reference image); -1 = none.
        budget: number of similarity values computed at once.

    Returns:
        (indices [Q, k] long, scores [Q, k] float32), both on the features' device.
    """
    n = gallery_feats.shape[0]
    k = min(k, n - (1 if exclude is not None else 0))
    out_idx = torch.empty(query_feats.shape[0], k, dtype=torch.long, device=query_feats.device)
    out_val = torch.empty(query_feats.shape[0], k, dtype=torch.float32, device=query_feats.device)
    for start, stop, s in similarity_chunks(query_feats, gallery_feats, budget, normalized):
        if exclude is not None:
            ex = exclude[start:stop].to(s.device)
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
        out_idx[start:stop] = idx.gather(1, perm)
        out_val[start:stop] = vals
        del s  # free this chunk before the next one is allocated: peak memory = one chunk
    return out_idx, out_val


def target_ranks(
    query_feats: Tensor,
    gallery_feats: Tensor | PreparedGallery,
    target: Tensor,
    exclude: Tensor | None = None,
    candidates: Tensor | None = None,
    budget: int = DEFAULT_BUDGET,
) -> Tensor:
    """0-based rank of each query's target gallery item, counting ties towards the lower index.

    Args:
        gallery_feats: [N, D] or a :class:`PreparedGallery`.
        target: [Q] gallery index of the target.
        exclude: optional [Q] gallery index removed from the ranking (-1 = none); it is never counted.
        candidates: optional [Q, C] gallery indices; the rank is then among these only (CIRR subset),
            in the order they take in the global ranking. The target must be one of them; -1 pads rows
            with fewer candidates.

    Equal to the position of the target in a stable descending sort of the (restricted) scores, but
    computed by counting, without sorting.

    Raises:
        ValueError: a target is not among its query's candidates.
    """
    (ranks,) = target_ranks_many(query_feats, gallery_feats, target, [(exclude, candidates)], budget)
    return ranks


def target_ranks_many(
    query_feats: Tensor,
    gallery_feats: Tensor | PreparedGallery,
    target: Tensor,
    rankings: Sequence[tuple[Tensor | None, Tensor | None]],
    budget: int = DEFAULT_BUDGET,
) -> list[Tensor]:
    """:func:`target_ranks` for several ``(exclude, candidates)`` rankings of the same queries, from one
    pass over the similarity chunks (CIRR needs the global and the subset rank: the similarity matrix is
    computed once, not twice). Returns one [Q] rank tensor per entry of ``rankings``.

    Raises:
        ValueError: a target is not among its query's candidates.
    """
    out = [torch.empty(query_feats.shape[0], dtype=torch.long, device=query_feats.device) for _ in rankings]
    for start, stop, s in similarity_chunks(query_feats, gallery_feats, budget):
        tgt = target[start:stop].to(s.device)
        for ranks, (exclude, candidates) in zip(out, rankings):
            ex = None if exclude is None else exclude[start:stop].to(s.device)
            cand = None if candidates is None else candidates[start:stop].to(s.device)
            ranks[start:stop] = _chunk_ranks(s, tgt, ex, cand)
        del s
    return out


def _chunk_ranks(s: Tensor, tgt: Tensor, exclude: Tensor | None, candidates: Tensor | None) -> Tensor:
    """[B] ranks of the targets ``tgt`` in one chunk of scores ``s`` [B, N] (not modified)."""
    if candidates is None:
        index = torch.arange(s.shape[1], device=s.device).expand_as(s)
    else:
        index = candidates
        if not bool((index == tgt[:, None]).any(1).all()):
            raise ValueError("a target is not among its query's candidates")
        s = s.gather(1, index.clamp(min=0))
    t_score = s.gather(1, tgt[:, None]) if candidates is None else _score_of(s, index, tgt)
    ahead = (s > t_score) | ((s == t_score) & (index < tgt[:, None]))
    if candidates is not None:
        ahead &= index >= 0
    if exclude is not None:
        ahead &= index != exclude[:, None]
    return ahead.sum(1)


def _score_of(s: Tensor, index: Tensor, tgt: Tensor) -> Tensor:
    """[B, 1] score of each row's target among its candidate columns."""
    return (
        torch.where(index == tgt[:, None], s, torch.full_like(s, float("-inf"))).max(1, keepdim=True).values
    )


def rank_candidates(
    query_feats: Tensor,
    gallery_feats: Tensor | PreparedGallery,
    candidates: Tensor,
    k: int,
    budget: int = DEFAULT_BUDGET,
) -> Tensor:
    """The first ``k`` of each query's candidate gallery indices ([Q, C], -1 = padding) in the order of
    the global ranking (score descending, ties towards the lower gallery index); -1 fills rows with
    fewer than ``k`` candidates. The CIRR subset ranking."""
    k = min(k, candidates.shape[1])
    out = torch.full((query_feats.shape[0], k), -1, dtype=torch.long, device=query_feats.device)
    for start, stop, s in similarity_chunks(query_feats, gallery_feats, budget):
        index = candidates[start:stop].to(s.device)
        scores = s.gather(1, index.clamp(min=0)).masked_fill(index < 0, float("-inf"))
        for r in range(stop - start):  # C is small (5 for CIRR): a per-row stable sort is cheap
            valid = index[r] >= 0
            idx, sc = index[r][valid], scores[r][valid]
            idx, perm = idx.sort()
            order = torch.sort(sc[perm], descending=True, stable=True).indices[:k]
            out[start + r, : order.numel()] = idx[order]
        del s, scores
    return out
