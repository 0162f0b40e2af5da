"""The evaluation loop on its own: a stub compose function and a stub gallery encoder, no method, no Trainer."""

from __future__ import annotations

import torch

from benchmark_fixtures import make_cirr
from zscir.benchmarks import build_benchmark
from zscir.evaluation import EvaluationLoop


def test_the_loop_scores_a_stub_composition_as_the_benchmark_scores_its_features(tmp_path):
    cirr = build_benchmark("cirr", make_cirr(tmp_path / "CIRR"), "val")
    index, size = cirr.gallery_index(), len(cirr.gallery)
    # each query points at one gallery image: its target for every other query, else its reference
    guess = {
        q.query_id: index[q.target_ids[0]] if n % 2 == 0 else index[q.reference.image_id]
        for n, q in enumerate(cirr.queries)
    }
    composed = []

    def compose(batch):
        composed.extend(batch["query_ids"])
        return torch.eye(size)[[guess[qid.split(":", 1)[1]] for qid in batch["query_ids"]]]

    rows = iter(range(size))  # the gallery is encoded in order: image i gets the one-hot row i

    def encode_gallery(pixels):
        return torch.eye(size)[[next(rows) for _ in range(pixels.shape[0])]]

    loop = EvaluationLoop([cirr], lambda image: torch.zeros(3, 4, 4), image_size=4, batch_size=3)
    results = loop.run(compose, encode_gallery)

    expected = cirr.score(torch.eye(size)[[guess[q.query_id] for q in cirr.queries]], torch.eye(size))
    assert results["cirr"]["metrics"] == expected
    assert 0 < results["cirr"]["metrics"]["recall@1"] < 100
    assert sorted(composed) == sorted(f"cirr:{q.query_id}" for q in cirr.queries)  # each query once
    query_feats, gallery_feats = results["cirr"]["features"]
    assert torch.equal(gallery_feats, torch.eye(size))
    assert query_feats.shape == (len(cirr.queries), size)
