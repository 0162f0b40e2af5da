"""The bfloat16 pre-filter of ``topk_search`` returns the float32 ranking itself, not an approximation.

Reference for every comparison: the plain way, one float32 product over the whole query × gallery matrix
and a stable descending sort (ties towards the lower gallery index) — computed here, independently of
zscir's chunking, candidate selection and tie handling.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zscir.retrieval import search
from zscir.retrieval.search import (
    bf16_error_bound,
    prefilter_pays,
    prepare_gallery,
    row_chunks,
    topk_search,
)


def reference(q: torch.Tensor, g: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
    """Top-k of the full float32 product, stable sort (lower index first among equal scores)."""
    s = F.normalize(q.float(), dim=-1) @ F.normalize(g.float(), dim=-1).T
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0).squeeze(1)
        s[rows, exclude[rows]] = float("-inf")
    vals, idx = torch.sort(s, dim=1, descending=True, stable=True)
    return idx[:, :k], vals[:, :k]


def both(q, g, k, exclude=None):
    on = topk_search(q, g, k, exclude=exclude, prefilter=True)
    off = topk_search(q, g, k, exclude=exclude, prefilter=False)
    return on, off


@pytest.mark.parametrize("k", [1, 10, 50])
def test_random_features_give_the_float32_ranking_bit_for_bit(k):
    torch.manual_seed(0)
    q, g = torch.randn(40, 256), torch.randn(20_000, 256)
    ref_idx, ref_val = reference(q, g, k)
    (idx, val), (idx_off, val_off) = both(q, g, k)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(val, ref_val)  # the same float32 product, not a re-derived score
    assert torch.equal(idx_off, ref_idx)
    assert torch.equal(val_off, ref_val)


def test_clustered_features_with_duplicates_and_exclusion():
    """Real CLIP features sit in a narrow cone (all cosines high and close): many items near the k-th
    score, duplicates (the same image twice) and an excluded reference per query."""
    torch.manual_seed(1)
    centre = torch.randn(1, 128) * 4
    q, g = torch.randn(48, 128) + centre, torch.randn(16_384, 128) + centre
    g[9000:9100] = g[100:200]
    g[12_000] = g[12_001]
    exclude = torch.randint(0, len(g), (len(q),))
    exclude[::4] = -1
    ref_idx, ref_val = reference(q, g, 50, exclude)
    (idx, val), _ = both(q, g, 50, exclude)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(val, ref_val)
    assert not bool((idx == exclude[:, None]).any())


def test_scores_that_bfloat16_cannot_tell_apart_are_ranked_by_their_float32_values():
    """Items whose scores differ only below bfloat16's resolution (all round to the same bfloat16 value)
    around the k-th place, plus exact ties: the pre-filter must keep all of them and the float32 product
    must decide, ties towards the lower index."""
    torch.manual_seed(2)
    d = 64
    q = F.normalize(torch.randn(20, d), dim=-1)
    base = F.normalize(q.mean(0, keepdim=True), dim=-1)
    perp = F.normalize(torch.randn(200, d), dim=-1)
    near = F.normalize(base + 1e-3 * perp, dim=-1)  # 200 items within ~1e-6 of each other in score
    far = F.normalize(torch.randn(20_000, d), dim=-1)
    g = torch.cat([far[:7000], near, near[:50], far[7000:]])  # 50 exact ties with earlier items
    s = q @ g.T
    assert bool((s[:, 7000:7250].bfloat16() == s[:, 7000:7001].bfloat16()).float().mean() > 0.5)
    ref_idx, ref_val = reference(q, g, 60)
    (idx, val), _ = both(q, g, 60)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(val, ref_val)


def test_error_bound_holds_on_features_with_a_wide_dynamic_range():
    """The bound of the bfloat16 scores (``|ŝ − s| ≤ A + v|ŝ|``) on features whose entries span six orders
    of magnitude and on near-parallel pairs (large scores), measured against the float64 product."""
    torch.manual_seed(3)
    d = 512
    scale = torch.logspace(-3, 3, d)[torch.randperm(d)]
    q = F.normalize(torch.randn(64, d) * scale, dim=-1)
    g = torch.cat([F.normalize(torch.randn(4000, d) * scale, dim=-1), q + 1e-3 * torch.randn(64, d)])
    prepared = prepare_gallery(g)
    low, g_norm, g_err = prepared.bf16()
    s_low = (low @ q.bfloat16().T).T[:, : len(g)].double()
    s32 = q @ prepared.feats.T
    bound = bf16_error_bound(q, g_norm, g_err, g_norm + g_err).double()[:, None]
    v = 2 * search.BF16_UNIT_ROUNDOFF / (1 - 2 * search.BF16_UNIT_ROUNDOFF)
    err = (s_low - s32.double()).abs()
    assert bool((err <= bound + v * s_low.abs()).all())
    assert float((err / (bound + v * s_low.abs())).max()) > 0.05  # the bound is not vacuous


def test_chunks_never_leave_a_few_rows_alone():
    """A chunk of very few query rows makes MKL use another kernel, which rounds differently: the old
    ``max, max, ..., rest`` chunking gave a 5-row remainder scores unequal to the one-product ones."""
    assert row_chunks(547, 271) == [(0, 182), (182, 364), (364, 547)]
    assert min(b - a for a, b in row_chunks(1000, 31)) == 30  # not 32 × 31 and a last chunk of 8
    assert row_chunks(10, 64) == [(0, 10)]
    assert row_chunks(0, 8) == []
    torch.manual_seed(4)
    q, g = torch.randn(2 * 271 + 5, 256), torch.randn(4000, 256)
    budget = 271 * 4000  # 271 rows per chunk of the unfiltered path
    _, val = topk_search(q, g, 20, budget=budget, prefilter=False)
    _, ref_val = reference(q, g, 20)
    assert torch.equal(val, ref_val)


def test_prefilter_is_used_only_where_it_pays():
    assert not prefilter_pays(100, 1000, 50, "cpu")  # small gallery: float32 is cheap
    assert not prefilter_pays(100, 123_403, 5000, "cpu")  # k too large for the groups
    assert not prefilter_pays(100, 123_403, 50, "cuda")  # cuBLAS may reduce bf16 in reduced precision
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert prefilter_pays(800, 123_403, 50, "cpu") == native
    assert not prefilter_pays(100, 123_403, 50, "cpu")  # few queries: the bfloat16 copy would not pay
    assert prefilter_pays(100, 123_403, 50, "cpu", copy_made=True) == native


def test_a_forced_prefilter_with_k_too_large_for_the_groups_still_ranks_exactly():
    torch.manual_seed(5)
    q, g = torch.randn(16, 64), torch.randn(640, 64)
    idx, val = topk_search(q, g, 11, prefilter=True)  # 11 > 640 // 64: the unfiltered path
    ref_idx, ref_val = reference(q, g, 11)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(val, ref_val)
