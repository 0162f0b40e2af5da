"""NaN/inf features are refused wherever features are ranked, scored or stored, with a message naming how many
rows, which ids and the likely cause; nothing that could pass for a result is written.

Without the checks, NaN compares false with everything: a NaN query ranks its target first (100 % recall on
CIRR and FashionIQ) and a NaN gallery row is first in every CIRCO list and submission."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from benchmark_fixtures import make_circo, make_cirr, make_fashioniq, make_genecis
from zscir.backbones import build_encoder
from zscir.benchmarks import build_benchmark
from zscir.cli.config import compose_config
from zscir.cli.evaluate import evaluate
from zscir.cli.score import main as score_main
from zscir.cli.score import score
from zscir.evaluation import EvaluationLoop
from zscir.evaluation.visualize import retrieve
from zscir.methods import build_method
from zscir.methods.base import nonfinite_cause
from zscir.retrieval.cache import GalleryCache
from zscir.retrieval.search import NonFiniteFeatures, rank_candidates, target_ranks, topk_search

TINY = {"name": "tiny", "kind": "open_clip", "model": "tiny", "init_seed": 0}
NAN = float("nan")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_fashioniq(root / "FashionIQ")
    make_cirr(root / "CIRR", layout="readme")
    make_circo(root / "CIRCO")
    make_genecis(root / "GeneCIS")
    return root


@pytest.fixture(scope="module")
def broken_weights(tmp_path_factory) -> Path:
    """The tiny backbone's weights with one entry of ``text_projection`` set to inf."""
    state = build_encoder(**TINY).model.state_dict()
    state["text_projection"][3, 5] = float("inf")
    path = tmp_path_factory.mktemp("weights") / "broken.pt"
    torch.save(state, path)
    return path


def eval_config(data: Path, run: Path, *overrides: str):
    return compose_config(
        "eval",
        [
            "backbone=tiny",
            f"paths.data_dir={data}",
            f"paths.output_dir={run.parent / 'outputs'}",
            f"paths.run_dir={run}",
            "eval.num_workers=0",
            "eval.batch_size=4",
            "trainer.enable_progress_bar=false",
            *overrides,
        ],
    )


def results_in(folder: Path) -> list[str]:
    """Files that could pass for a result: metrics, features, submissions, run info, retrieval grids."""
    if not folder.exists():
        return []
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".json", ".npz", ".png")
    )


def random_features(bench, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(bench.queries), 6, generator=g), torch.randn(len(bench.gallery), 6, generator=g)


# ---- zscir-eval and train-time validation --------------------------------------------------------------
def test_eval_refuses_the_queries_of_a_backbone_with_an_inf_weight(data, tmp_path, broken_weights):
    """The reported case: text_only on CIRR printed 100.00 for every metric."""
    run = tmp_path / "run"
    cfg = eval_config(
        data,
        run,
        "method=text_only",
        "benchmark=cirr",
        f"backbone.checkpoint={broken_weights}",
        "visualize=2",
    )
    with pytest.raises(NonFiniteFeatures) as err:
        evaluate(cfg)
    message = str(err.value)
    assert "5 of 5 cirr query feature rows hold NaN/inf" in message
    assert "['12060', '12061', '305', '17', '18']" in message  # the ids, in the benchmark's order
    assert "likely cause: the checkpoint (broken weights" in message
    assert "'encoder.model.text_projection'" in message
    assert "attn_mask" not in message  # a causal mask's -inf is not a broken weight
    assert results_in(run) == []
    # the gallery (image tower, finite) may be cached; a cached entry never holds NaN/inf
    for entry in (tmp_path / "outputs" / "cache" / "gallery").glob("*.pt"):
        assert torch.isfinite(torch.load(entry, weights_only=True)["feats"]).all()


def test_train_time_validation_refuses_them_too(data, broken_weights):
    method = build_method({**TINY, "checkpoint": str(broken_weights)}, {"kind": "text_only"})
    method.attach_benchmarks([build_benchmark("fashioniq", data / "FashionIQ", "val", category="dress")])
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(NonFiniteFeatures, match=r"3 of 3 fashioniq query feature rows .*\['0', '1', '2'\]"):
        trainer.validate(method, verbose=False)
    assert method.eval_results == {}


def test_a_nan_gallery_row_writes_no_circo_submission_features_or_cache_entry(data, tmp_path, monkeypatch):
    circo = build_benchmark("circo", data / "CIRCO", "test")
    encode = EvaluationLoop.encode_gallery_sharded

    def one_nan_row(self, benchmark, *args):
        feats = encode(self, benchmark, *args)
        feats[2] = NAN
        return feats

    monkeypatch.setattr(EvaluationLoop, "encode_gallery_sharded", one_nan_row)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteFeatures) as err:
        evaluate(eval_config(data, run, "method=sum", "benchmark=circo", "benchmark.split=test"))
    message = str(err.value)
    assert (
        f"1 of {len(circo.gallery)} circo gallery feature rows hold NaN/inf (ids ['{circo.gallery[2].image_id}'])"
        in message
    )
    assert "the weights are finite, trainer.precision=32-true" in message  # neither usual cause applies
    assert results_in(run) == []
    assert list((tmp_path / "outputs" / "cache" / "gallery").glob("*")) == []


@pytest.mark.parametrize("split", ["val", "test"])
def test_score_refuses_a_nan_circo_gallery_row_and_writes_nothing(data, tmp_path, split, capsys):
    bench = build_benchmark("circo", data / "CIRCO", split)
    q, g = random_features(bench)
    g[[4, 9]] = NAN
    arrays = bench.feature_arrays(q, g)
    np.savez(tmp_path / "f.npz", **arrays)
    out = tmp_path / "out"
    argv = ["--benchmark", "circo", "--root", str(data / "CIRCO"), "--split", split]
    rc = score_main([*argv, "--features", str(tmp_path / "f.npz"), "--out", str(out), "--submission"])
    assert rc == 2
    error = capsys.readouterr().err
    ids = [bench.gallery[4].image_id, bench.gallery[9].image_id]
    assert f"2 of {len(bench.gallery)} circo gallery feature rows hold NaN/inf (ids {ids})" in error
    assert "fp16/bf16 overflow" in error
    assert "broken weights" in error
    assert results_in(out) == []
    # the Python API refuses too, naming row positions
    with pytest.raises(NonFiniteFeatures, match=r"2 of 11 gallery feature rows .* \(rows \[4, 9\]\)"):
        (bench.submission if split == "test" else bench.score)(q, g)


def test_score_refuses_a_nan_genecis_candidate_and_writes_no_metrics(data, tmp_path):
    bench = build_benchmark("genecis", data / "GeneCIS", "val", task="focus_object")
    arrays = bench.feature_arrays(*random_features(bench))
    arrays["candidate_feats"][1, 2, 0] = NAN
    np.savez(tmp_path / "f.npz", **arrays)
    with pytest.raises(NonFiniteFeatures) as err:
        score("genecis", data / "GeneCIS", "val", tmp_path / "f.npz", tmp_path / "out", task="focus_object")
    candidate = bench.queries[1].candidate_ids[2]
    assert f"1 of 12 genecis_focus_object candidate feature rows hold NaN/inf (ids ['1/{candidate}'])" in str(
        err.value
    )
    assert "likely cause" in str(err.value)
    assert results_in(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("kind", "root", "split", "options"),
    [
        ("fashioniq", "FashionIQ", "val", {"category": "all"}),
        ("cirr", "CIRR", "val", {}),
        ("cirr", "CIRR", "test1", {}),
        ("circo", "CIRCO", "val", {}),
        ("genecis", "GeneCIS", "val", {"task": "change_attribute"}),
    ],
)
@pytest.mark.parametrize("where", ["query", "gallery"])
def test_every_benchmark_refuses_to_score_or_submit_nan_features(data, kind, root, split, options, where):
    """The ranking primitives (similarity_chunks, genecis_recall) refuse for every direct caller."""
    bench = build_benchmark(kind, data / root, split, **options)
    q, g = random_features(bench)
    (q if where == "query" else g)[1, 3] = float("-inf")
    calls = [bench.score] if bench.labelled else []
    calls += [bench.submission] if split in bench.submission_splits else []
    rows = [1]  # by position in what the primitive ranks (FashionIQ: within a category; query 1 is a dress)
    if kind == "genecis" and where == "gallery":  # GeneCIS ranks per query: the queries with that candidate
        rows = [i for i, x in enumerate(bench.queries) if bench.gallery[1].image_id in x.candidate_ids]
    for call in calls:
        with pytest.raises(NonFiniteFeatures) as err:
            call(q, g)
        assert f"{len(rows)} of " in str(err.value)
        assert f"rows hold NaN/inf (rows {rows})" in str(err.value)


# ---- gallery cache ----------------------------------------------------------------------------------------
def test_gallery_cache_never_saves_or_loads_nan_features(tmp_path, caplog):
    cache, ids = GalleryCache(tmp_path / "cache"), ["a", "b", "c", "d"]
    feats = torch.randn(4, 8)
    feats[2, 1] = NAN
    with pytest.raises(NonFiniteFeatures, match=r"1 of 4 gallery feature rows hold NaN/inf \(ids \['c'\]\)"):
        cache.save("k", ids, feats)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
    # an entry written with NaN (by an older version, or by hand) is discarded, and the gallery re-encoded
    (tmp_path / "cache").mkdir(exist_ok=True)
    torch.save({"feats": feats, "ids": ids}, cache.path("k"))
    with caplog.at_level(logging.WARNING, logger="zscir.retrieval.cache"):
        assert cache.load("k", ids) is None
    assert not cache.path("k").exists()
    assert "['c']" in caplog.text
    assert "re-encoding" in caplog.text
    feats[2, 1] = 0.5  # control: finite features round-trip
    cache.save("k", ids, feats)
    assert torch.equal(cache.load("k", ids), feats)


# ---- retrieval grids ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["query", "gallery"])
def test_retrieval_grids_refuse_nan_features(data, where):
    bench = build_benchmark("cirr", data / "CIRR", "val")
    q, g = random_features(bench)
    (q if where == "query" else g)[3] = NAN
    name = bench.queries[3].query_id if where == "query" else bench.gallery[3].image_id
    with pytest.raises(NonFiniteFeatures, match=rf"1 of \d+ cirr {where} feature rows .*\['{name}'\]"):
        retrieve(bench, q, g, [0, 1], k=3)
    assert len(retrieve(bench, q.nan_to_num(), g.nan_to_num(), [0, 1], k=3)) == 2  # control


# ---- the search primitives and the cause ---------------------------------------------------------------------
def test_search_primitives_refuse_nan_and_inf():
    q, g = torch.randn(3, 4), torch.randn(7, 4)
    g[5, 0] = float("inf")
    calls = [
        lambda: topk_search(q, g, 3),
        lambda: topk_search(q, g, 3, normalized=True),
        lambda: target_ranks(q, g, torch.tensor([0, 1, 2])),
        lambda: rank_candidates(q, g, torch.tensor([[0, 1], [2, 3], [4, 6]]), 2),
    ]
    for call in calls:
        with pytest.raises(
            NonFiniteFeatures, match=r"1 of 7 gallery feature rows hold NaN/inf \(rows \[5\]\)"
        ):
            call()
    g[5, 0] = 0.0
    assert topk_search(q, g, 3)[0].shape == (3, 3)  # control


def test_the_cause_tells_broken_weights_from_reduced_precision():
    module = nn.Linear(2, 2)
    module.register_buffer("mask", torch.tensor([0.0, float("-inf")]))  # -inf by design: not broken
    assert "fp16/bf16 overflow under trainer.precision=16-mixed" in nonfinite_cause(module, "16-mixed")
    assert "trainer.precision=32-true" in nonfinite_cause(module, "bf16-mixed")  # the fix
    assert "the weights are finite" in nonfinite_cause(module, "32-true")
    unknown = nonfinite_cause(module, None)  # no trainer: both usual causes are named
    assert "fp16/bf16 overflow" in unknown
    assert "broken weights" in unknown
    with torch.no_grad():
        module.weight[0, 1] = NAN
    for precision in ("16-mixed", "32-true"):
        assert "broken weights: 1 weight tensor(s) hold NaN/inf, e.g. ['weight']" in nonfinite_cause(
            module, precision
        )
