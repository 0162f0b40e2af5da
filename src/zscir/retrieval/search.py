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

On CPUs with native bfloat16 matrix units (AMX / AVX512-BF16), :func:`topk_search` over a large gallery
first scores every item in bfloat16 (~3× faster than float32 there), keeps only the items whose float32
score can still reach the top-k by a rigorous error bound, and scores those in float32: the result is the
float32 ranking, not an approximation of it (see :func:`bf16_error_bound`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

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


def row_chunks(num_rows: int, max_rows: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the fewest chunks of at most ``max_rows`` rows covering ``num_rows``, their
    sizes differing by at most one. Even rather than ``max_rows, ..., rest`` because a BLAS product
    rounds rows differently when a chunk has very few of them (MKL switches kernels below
    :data:`MIN_BLAS_ROWS` rows): even chunks of at least that many rows keep every score bitwise equal
    to the one-product result."""
    count = -(-num_rows // max(1, max_rows))
    bounds = [i * num_rows // count for i in range(count + 1)] if count else [0]
    return list(itertools.pairwise(bounds))


#: rows below which a chunk of a float32 product may round differently from the whole product (MKL)
MIN_BLAS_ROWS = 16


def chunk_rows(num_queries: int, num_gallery: int, budget: int = DEFAULT_BUDGET) -> int:
    """Query rows whose similarities to ``num_gallery`` items fit in ``budget`` elements (at least 1)."""
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
    #: the bfloat16 copy used by the pre-filter, made on first use (:meth:`bf16`)
    _bf16: dict = field(default_factory=dict, repr=False, compare=False)

    def bf16(self) -> tuple[Tensor, float, float]:
        """``(feats_bf16 [N', D], max_j ||g_j||, max_j ||g_j − bf16(g_j)||)`` for the pre-filter of
        :func:`topk_search`, computed once per gallery: the bfloat16 features, zero rows appended up to
        N' = a multiple of :data:`PREFILTER_GROUP`. Built in blocks, so no float32 copy is made."""
        if not self._bf16:
            n, d = self.feats.shape
            padded = -(-n // PREFILTER_GROUP) * PREFILTER_GROUP
            low = torch.zeros(padded, d, dtype=torch.bfloat16, device=self.feats.device)
            norm, err = 0.0, 0.0
            for start in range(0, n, 1024):  # rows per block: small temporaries, in cache
                block = self.feats[start : start + 1024]
                low[start : start + len(block)] = block
                norm = max(norm, float(block.norm(dim=1).max()))
                err = max(err, float((block - low[start : start + len(block)].float()).norm(dim=1).max()))
            self._bf16.update(feats=low, norm=norm, err=err)
        return self._bf16["feats"], self._bf16["norm"], self._bf16["err"]

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
    for start, stop in row_chunks(q.shape[0], chunk_rows(q.shape[0], g.shape[0], budget)):
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
    prefilter: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` gallery indices and cosine scores per query, best first.

    Args:
        query_feats: [Q, D]; gallery_feats: [N, D] or a :class:`PreparedGallery` (searched as prepared);
            L2-normalised here unless ``normalized``.
        k: results per query (at most N, or N − 1 with ``exclude``).
        exclude: optional [Q] gallery index per query to leave out (CIRR's reference image); -1 = none.
        budget: number of similarity values computed at once.
        prefilter: score in bfloat16 first and in float32 only what can reach the top-k (same result,
            faster where the CPU has bfloat16 matrix units; skipped when ``k > N // 64``); None = where
            it pays (:func:`prefilter_pays`).

    Returns:
        (indices [Q, k] long, scores [Q, k] float32), both on the features' device: the float32 cosine
        ranking, ties towards the lower gallery index, with or without the pre-filter.

    Raises:
        NonFiniteFeatures: a query or gallery row holds NaN/inf.
    """
    check_finite(query_feats, "query")
    prepared = prepare_gallery(gallery_feats, budget, normalized)
    q = query_feats if normalized else normalize(query_feats)
    n = len(prepared)
    k = min(k, n - (1 if exclude is not None else 0))
    out_idx = torch.empty(q.shape[0], k, dtype=torch.long, device=q.device)
    out_val = torch.empty(q.shape[0], k, dtype=torch.float32, device=q.device)
    if prefilter is None:
        prefilter = prefilter_pays(q.shape[0], n, k, q.device, copy_made=bool(prepared._bf16))
    if prefilter and k <= n // PREFILTER_GROUP:
        chunks = _prefiltered_chunks(q, prepared, k, exclude)
    else:
        chunks = ((a, b, s, None) for a, b, s in similarity_chunks(q, prepared, budget, normalized=True))
    for start, stop, s, columns in chunks:
        if exclude is not None:
            _exclude(s, exclude[start:stop].to(s.device), columns)
        out_idx[start:stop], out_val[start:stop] = _exact_topk(s, k, columns)
        del s  # free this chunk before the next one is allocated: peak memory = one chunk
    return out_idx, out_val


def _exclude(s: Tensor, ex: Tensor, columns: Tensor | None) -> None:
    """Set each row's excluded gallery item (``ex`` [B], -1 = none) to -inf in ``s`` [B, C], whose
    columns are the gallery indices ``columns`` (ascending; None = every item)."""
    rows = torch.nonzero(ex >= 0).squeeze(1)
    if columns is None:
        s[rows, ex[rows]] = float("-inf")
        return
    pos = torch.searchsorted(columns, ex[rows]).clamp(max=len(columns) - 1)
    hit = columns[pos] == ex[rows]
    s[rows[hit], pos[hit]] = float("-inf")


def _exact_topk(s: Tensor, k: int, columns: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` of each row of ``s`` [B, C] (float32 scores of the gallery items ``columns``, ascending;
    None = every item): ``(gallery indices [B, k], scores [B, k])``, score descending, ties towards the
    lower gallery index."""
    # One extra item tells whether the k-th value is tied with an item left outside the top-k;
    # topk chooses arbitrarily among tied items, so those rows are redone with a stable sort.
    vals, idx = s.topk(min(k + 1, s.shape[1]), dim=1)
    boundary = vals[:, k] >= vals[:, k - 1] if vals.shape[1] > k else s.new_zeros(len(s), dtype=torch.bool)
    vals, idx = vals[:, :k], idx[:, :k]
    for r in torch.nonzero(boundary).squeeze(1).tolist():
        order = torch.sort(s[r], descending=True, stable=True).indices[:k]
        idx[r], vals[r] = order, s[r, order]
    # Order inside the top-k: by score, ties by index (column order is gallery order).
    idx, perm = idx.sort(dim=1)
    vals = vals.gather(1, perm)
    vals, perm = vals.sort(dim=1, descending=True, stable=True)
    idx = idx.gather(1, perm)
    return (idx if columns is None else columns[idx]), vals


#: unit round-off of bfloat16 (8 significand bits)
BF16_UNIT_ROUNDOFF = 2.0**-8
#: smallest gallery the pre-filter is used on by default: below it the float32 product is cheap anyway
PREFILTER_MIN_GALLERY = 16_384
#: fewest queries for which the pre-filter makes a gallery's bfloat16 copy by default
PREFILTER_MIN_QUERIES = 256
#: bfloat16 scores held at once by the pre-filter: at most 2**24 elements (32 MiB) and 96 query rows
PREFILTER_BUDGET, PREFILTER_ROWS = 2**24, 96
#: gallery items per group whose bfloat16 maximum is taken first; a group is only looked into when its
#: maximum can reach the top-k
PREFILTER_GROUP = 64
#: query rows rescored in float32 at once, at most: their candidate sets are merged into one product, so
#: fewer rows = fewer wasted products; chunks of at most 2·16 − 1 have at least 16 rows
#: (:data:`MIN_BLAS_ROWS`, the product's own kernel) whenever the chunk they split has
RESCORE_ROWS = 2 * MIN_BLAS_ROWS - 1


def prefilter_pays(
    num_queries: int, num_gallery: int, k: int, device: torch.device | str, copy_made: bool = False
) -> bool:
    """Whether :func:`topk_search` pre-filters in bfloat16 by default: on a CPU with native bfloat16
    matrix instructions (AMX or AVX512-BF16; elsewhere bfloat16 products are emulated and slower than
    float32), for a gallery of at least :data:`PREFILTER_MIN_GALLERY` items, ``k`` at most
    1/:data:`PREFILTER_GROUP` of it, and either :data:`PREFILTER_MIN_QUERIES` queries or a gallery whose
    bfloat16 copy is already made (``copy_made``; making it costs about what pre-filtering saves on
    ~300 queries). Not on CUDA: cuBLAS may reduce bfloat16 products in reduced precision, which the
    bound does not cover."""
    if torch.device(device).type != "cpu" or num_gallery < PREFILTER_MIN_GALLERY:
        return False
    if k > num_gallery // PREFILTER_GROUP or (num_queries < PREFILTER_MIN_QUERIES and not copy_made):
        return False
    cpu = torch.cpu
    native = (
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    )
    return bool(native)


def bf16_error_bound(
    query_feats: Tensor, gallery_norm: float, gallery_err: float, gallery_low_norm: float
) -> Tensor:
    """[Q] bound ``A`` such that, for every gallery item ``g``, the bfloat16 score ``ŝ`` (both sides rounded
    to bfloat16, products accumulated in float32, the sum rounded to bfloat16) and the float32 score
    ``s`` (a float32 matrix product, any summation order) satisfy ``|ŝ − s| ≤ A + v·|ŝ|``, with
    ``v = 2u / (1 − 2u)`` and ``u`` = :data:`BF16_UNIT_ROUNDOFF`.

    From the exact identity ``q·g − q̃·g̃ = (q − q̃)·g + q̃·(g − g̃)`` and Cauchy–Schwarz, plus the standard
    float32 dot-product bound ``γ_D Σ|x_i y_i| ≤ γ_D ||x|| ||y||`` (Higham, *Accuracy and Stability of
    Numerical Algorithms*, §3.1) for each of the two accumulations, and the final rounding to bfloat16
    (taken as two half-ulps so that truncation is covered too). A safety factor of 1.01 covers the
    float32 rounding of the norms themselves.

    Args:
        query_feats: [Q, D] float32 queries (any norm).
        gallery_norm: max_j ||g_j||; gallery_err: max_j ||g_j − bf16(g_j)||; gallery_low_norm: an upper
            bound of max_j ||bf16(g_j)|| (``gallery_norm + gallery_err``).
    """
    d = query_feats.shape[1]
    gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
    q_low = query_feats.bfloat16().float()
    q_norm, q_low_norm = query_feats.norm(dim=1), q_low.norm(dim=1)
    q_err = (query_feats - q_low).norm(dim=1)
    rounding = q_err * gallery_norm + q_low_norm * gallery_err
    accumulation = gamma * (q_low_norm * gallery_low_norm + q_norm * gallery_norm)
    return 1.01 * (rounding + accumulation)


def _at_most_bf16(x: Tensor) -> Tensor:
    """The bfloat16 values ``≤ x`` (float32) closest to it, up to one ulp below (lowering by a full
    relative ulp before rounding to nearest can never land above ``x``)."""
    return (x - x.abs() * 2.0**-7 - torch.finfo(torch.float32).tiny).bfloat16()


def _prefiltered_chunks(
    q: Tensor, prepared: PreparedGallery, k: int, exclude: Tensor | None
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """Yield ``(start, stop, scores [B, C], columns [C])``: float32 scores of the gallery items ``columns``
    (ascending) that can still be in some row's top-``k`` (or tied with its k-th item).

    Every item is scored in bfloat16 (``ŝ``). With ``A``, ``v`` the bound of :func:`bf16_error_bound`, an
    item can only reach a row's float32 top-k if ``ŝ + A + v|ŝ| ≥ L``, where ``L = t − A − v|t|`` and
    ``t`` is any value with k items scoring ``ŝ ≥ t`` — here the k-th largest maximum of the groups of
    :data:`PREFILTER_GROUP` items (each group maximum is a different item). Groups whose maximum passes
    are looked into; the passing items are scored in float32, by the same matrix product as the
    unfiltered path (bitwise the same scores), and duplicates keep the score of their first copy.
    Requires ``k ≤ N // PREFILTER_GROUP``.
    """
    low, g_norm, g_err = prepared.bf16()
    n, padded = len(prepared), low.shape[0]
    v = 2 * BF16_UNIT_ROUNDOFF / (1 - 2 * BF16_UNIT_ROUNDOFF)
    rows = max(1, min(PREFILTER_ROWS, PREFILTER_BUDGET // padded))
    chunks = row_chunks(q.shape[0], rows)
    d = q.shape[1]
    # One scratch buffer holds a chunk's bfloat16 scores, then (once they are reduced to candidates) the
    # gallery rows gathered for the float32 rescoring: allocating both afresh for every chunk fragments
    # the allocator's heap (peak RSS ~100 MiB higher at N 100k), and holding both at once costs more.
    scratch = torch.empty(
        max((b - a for a, b in chunks), default=0) * padded * 2, dtype=torch.uint8, device=low.device
    )
    for start, stop in chunks:
        qc = q[start:stop]
        bound = bf16_error_bound(qc, g_norm, g_err, g_norm + g_err)
        # gallery × queries (not queries × gallery): oneDNN then packs the small query block instead of
        # re-packing the whole gallery on every call, ~2× faster; the scores are [N', B]
        s_low = scratch[: len(qc) * padded * 2].view(torch.bfloat16).view(padded, len(qc))
        torch.matmul(low, qc.bfloat16().T, out=s_low)
        s_low[n:] = float("-inf")  # the padding rows
        if exclude is not None:  # through the [B, N'] view: the same helper as the float32 scores
            _exclude(s_low.T, exclude[start:stop].to(s_low.device), None)
        groups = s_low.view(-1, PREFILTER_GROUP, len(qc))  # [N' / G, G, B]
        group_max = groups.amax(1).T  # [B, N' / G]
        kth = group_max.topk(k, dim=1, sorted=False).values.amin(1).float()
        reach = kth - bound - v * kth.abs() - bound  # ŝ + v|ŝ| must reach this
        tau = _at_most_bf16(torch.where(reach >= 0, reach / (1 + v), reach / (1 - v)))
        row, group = torch.nonzero(group_max >= tau[:, None], as_tuple=True)
        passing = groups[group, :, row] >= tau[row, None]  # [pairs, G]
        pair, offset = torch.nonzero(passing, as_tuple=True)
        cand_row, cand_item = row[pair], group[pair] * PREFILTER_GROUP + offset
        del s_low, groups, group_max, passing
        for a, b in row_chunks(stop - start, RESCORE_ROWS):
            mine = (cand_row >= a) & (cand_row < b)
            columns = _with_first_copies(torch.unique(cand_item[mine]), prepared.duplicates)
            if scratch.numel() < len(columns) * d * 4:  # rare: more candidates than the scores took
                scratch = torch.empty(len(columns) * d * 4, dtype=torch.uint8, device=low.device)
            gathered = scratch[: len(columns) * d * 4].view(torch.float32).view(len(columns), d)
            torch.index_select(prepared.feats, 0, columns, out=gathered)
            s = qc[a:b] @ gathered.T
            _copy_duplicate_scores(s, columns, prepared.duplicates)
            yield start + a, start + b, s, columns


def _with_first_copies(columns: Tensor, duplicates: tuple[Tensor, Tensor] | None) -> Tensor:
    """``columns`` (ascending) plus the first copy of every duplicate among them, ascending."""
    if duplicates is None:
        return columns
    present = torch.isin(duplicates[0], columns)
    return torch.unique(torch.cat([columns, duplicates[1][present]])) if bool(present.any()) else columns


def _copy_duplicate_scores(s: Tensor, columns: Tensor, duplicates: tuple[Tensor, Tensor] | None) -> None:
    """Give every duplicate among ``columns`` the score of its first copy (also among them) in ``s``."""
    if duplicates is None:
        return
    present = torch.isin(duplicates[0], columns)
    if bool(present.any()):
        rows, first = duplicates[0][present], duplicates[1][present]
        s[:, torch.searchsorted(columns, rows)] = s[:, torch.searchsorted(columns, first)]


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
