"""Chunked search and the metric core against naive oracles and hand-computed cases."""

import pytest
import torch

from zscir.metrics.functional import (
    average_precision_at_k,
    circo_metrics_from_ranking,
    cirr_metrics,
    recall_from_ranks,
)
from zscir.retrieval.search import (
    duplicate_rows,
    normalize,
    rank_candidates,
    similarity_chunks,
    target_ranks,
    topk_search,
)


def oracle_ranking(q, g, exclude=None):
    s = normalize(q) @ normalize(g).T
    if exclude is not None:
        s[torch.arange(len(s)), exclude] = float("-inf")
    return torch.sort(s, dim=1, descending=True, stable=True).indices


@pytest.mark.parametrize("budget", [7, 10_000])  # 7: one query row per chunk
def test_topk_equals_stable_full_sort(budget):
    torch.manual_seed(0)
    q, g = torch.randn(13, 8), torch.randn(40, 8)
    g[5] = g[17]  # exact duplicate gallery items: ties
    g[30] = g[17]
    q[3] = g[17]  # a query whose best match is a three-way tie
    idx, val = topk_search(q, g, 10, budget=budget)
    assert torch.equal(idx, oracle_ranking(q, g)[:, :10])
    assert torch.all(val[:, :-1] >= val[:, 1:])
    assert idx[3, :3].tolist() == [5, 17, 30]  # ties in gallery order


def test_topk_tie_at_the_cut_keeps_lowest_indices():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    q = torch.tensor([[0.0, 1.0]])
    idx, _ = topk_search(q, g, 2)
    assert idx.tolist() == [[1, 2]]


def test_topk_exclude_removes_the_reference():
    torch.manual_seed(1)
    q, g = torch.randn(6, 4), torch.randn(20, 4)
    ex = torch.tensor([0, 3, -1, 19, 7, 7])
    idx, _ = topk_search(q, g, 19, exclude=ex)
    for row, e in enumerate(ex.tolist()):
        assert e not in idx[row].tolist() or e == -1
    oracle = oracle_ranking(q[:2], g, ex[:2])[:, :19]
    assert torch.equal(idx[:2], oracle)


def test_target_ranks_equal_position_in_stable_sort():
    torch.manual_seed(2)
    q, g = torch.randn(30, 6), torch.randn(50, 6)
    g[10] = g[40]
    target = torch.randint(0, 50, (30,))
    target[0] = 40  # tied with index 10, which comes first
    q[0] = g[40]
    exclude = torch.randint(0, 50, (30,))
    exclude[exclude == target] = (exclude[exclude == target] + 1) % 50
    ranks = target_ranks(q, g, target, exclude=exclude, budget=64)
    order = oracle_ranking(q, g, exclude)
    expected = torch.tensor([(order[i] == target[i]).nonzero().item() for i in range(30)])
    assert torch.equal(ranks, expected)
    assert ranks[0].item() == 1


def test_target_ranks_among_candidates():
    g = torch.eye(4)
    q = torch.tensor([[0.1, 0.9, 0.5, 0.0]])
    # candidates 3, 2, 1 (not in gallery order): scores 0.0, 0.5, 0.9 -> target 2 is second
    assert target_ranks(q, g, torch.tensor([2]), candidates=torch.tensor([[3, 2, 1]])).tolist() == [1]
    with pytest.raises(ValueError, match="not among"):
        target_ranks(q, g, torch.tensor([0]), candidates=torch.tensor([[3, 2, 1]]))


def test_recall_from_ranks_is_percent():
    assert recall_from_ranks(torch.tensor([0, 4, 5, 60]), [1, 5, 50]) == {
        "recall@1": 25.0,
        "recall@5": 50.0,
        "recall@50": 75.0,
    }


def test_cirr_metrics_hand_computed():
    # 1-D "features" on a circle so that scores are easy to order: gallery angles
    angles = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    g = torch.stack([angles.cos(), angles.sin()], 1)
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # ranking by angle: 0,1,2,3,4,5
    target = torch.tensor([2, 5])
    reference = torch.tensor([0, 1])  # deleted from the ranking
    subset = torch.tensor([[1, 2, 3, 4, 5], [0, 2, 3, 4, 5]])
    m = cirr_metrics(q, g, target, reference, subset)
    # query 0: ranking without ref 0 -> 1,2,... target 2 at rank 1; query 1: without 1 -> 0,2,3,4,5: target 5 at rank 4
    assert m["recall@1"] == 0.0
    assert m["recall@5"] == 100.0
    assert m["recall_subset@1"] == 0.0
    assert m["recall_subset@2"] == 50.0
    assert m["recall_subset@3"] == 50.0


def test_average_precision_normalises_by_min_k_and_gt():
    ranked = torch.tensor([[7, 3, 9, 1, 2]])
    # 3 ground truths {3, 1, 8}: hits at ranks 2 and 4 -> P@2 = 1/2, P@4 = 2/4
    assert average_precision_at_k(ranked, [[3, 1, 8]], 5).item() == pytest.approx((0.5 + 0.5) / 3)
    # k = 2 < #gt: normaliser 2
    assert average_precision_at_k(ranked, [[3, 1, 8]], 2).item() == pytest.approx(0.5 / 2)
    # one GT found at rank 1 -> 1.0 whatever k (torchmetrics-style averaging would agree here)
    assert average_precision_at_k(torch.tensor([[3, 0, 0]]), [[3]], 3).item() == 1.0


def test_circo_recall_counts_only_the_first_ground_truth():
    ranked = torch.tensor([[5, 6, 7, 8, 9, *list(range(10, 55))]])
    m = circo_metrics_from_ranking(ranked, [[100, 6]])  # 6 is a GT but not the target (100)
    assert m["recall@5"] == 0.0
    assert m["map@5"] == pytest.approx(100 * (1 / 2) / 2)


def test_duplicate_rows_are_compared_on_every_column_not_only_the_hashed_ones():
    torch.manual_seed(0)
    g = torch.randn(40, 256)  # 256 dims: the hash reads every 4th column
    g[10] = g[3]
    g[20] = g[3]
    g[30] = g[5]
    g[31] = g[5]
    g[31, 1] += 1.0  # same hashed columns as row 5, a different row
    rows, first = duplicate_rows(g)
    assert sorted(zip(rows.tolist(), first.tolist())) == [(10, 3), (20, 3), (30, 5)]


def test_identical_gallery_features_always_tie_exactly():
    # a plain q @ g.T rounds the same dot product differently at different rows for some shapes
    # (BLAS gemv/gemm edge kernels, e.g. 5 queries x 33 images x 64 dims on x86 MKL)
    torch.manual_seed(0)
    g, q = torch.randn(33, 64), torch.randn(5, 64)
    copies = [19, 32]  # the same image three times
    g[copies] = g[0].clone()
    rows, first = duplicate_rows(normalize(g))
    assert (rows.tolist(), first.tolist()) == ([19, 32], [0, 0])
    assert duplicate_rows(normalize(torch.randn(33, 64))) is None
    (s,) = [chunk for _, _, chunk in similarity_chunks(q, g)]
    assert torch.equal(s[:, 19], s[:, 0])
    assert torch.equal(s[:, 32], s[:, 0])
    idx, _ = topk_search(q, g, 33)
    for row in idx.tolist():
        positions = [row.index(c) for c in [0, 19, 32]]
        assert positions == list(range(positions[0], positions[0] + 3))  # adjacent, in gallery order


def test_rank_candidates_keeps_the_global_order_and_pads():
    g = torch.eye(5)
    q = torch.tensor([[0.1, 0.9, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    cand = torch.tensor([[3, 2, 1, 4], [4, 0, -1, -1]])
    out = rank_candidates(q, g, cand, 3)
    assert out.tolist() == [[1, 2, 3], [0, 4, -1]]  # row 1: all tied, by gallery index; one pad left


def test_prepared_gallery_ranks_exactly_like_raw_features():
    """A gallery prepared once (normalised, duplicates indexed) gives every ranking bit for bit what the
    raw features give, ties included."""
    from zscir.retrieval.search import prepare_gallery

    torch.manual_seed(5)
    q, g = torch.randn(9, 8), torch.randn(30, 8)
    g[4] = g[21]
    q[2] = g[21]
    prepared = prepare_gallery(g)
    target = torch.randint(0, 30, (9,))
    subset = torch.stack([torch.randperm(30)[:4] for _ in range(9)])
    subset[:, 0] = target
    ex = (target + 1) % 30
    for budget in (8, 10_000):
        assert torch.equal(topk_search(q, prepared, 7, ex, budget)[0], topk_search(q, g, 7, ex, budget)[0])
        assert torch.equal(
            target_ranks(q, prepared, target, ex, budget=budget), target_ranks(q, g, target, ex)
        )
    assert torch.equal(rank_candidates(q, prepared, subset, 3), rank_candidates(q, g, subset, 3))
    assert cirr_metrics(q, prepared, target, ex, subset) == cirr_metrics(q, g, target, ex, subset)
    assert topk_search(q, prepared, 3)[0][2, :2].tolist() == [4, 21]  # the tie, in gallery order


def test_cirr_metrics_computes_the_similarity_matrix_once(monkeypatch):
    """Recall and subset recall come from one pass over the similarity chunks, not two."""
    import zscir.retrieval.search as search

    calls = []
    real = search.similarity_chunks

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "similarity_chunks", counting)
    g = torch.eye(4)
    q = torch.tensor([[0.9, 0.8, 0.7, 0.0]])
    m = cirr_metrics(q, g, torch.tensor([2]), torch.tensor([0]), torch.tensor([[3, 2]]))
    assert (m["recall@1"], m["recall@5"], m["recall_subset@1"]) == (0.0, 100.0, 100.0)
    assert len(calls) == 1
