"""Scores and submission files on the miniature benchmarks: hand-computed cases, and random features
(with exact duplicates) against a naive numpy implementation of each official evaluator."""

import doctest
from fractions import Fraction

import numpy as np
import pytest
import torch

import zscir.metrics.functional
from benchmark_fixtures import make_circo, make_cirr, make_fashioniq, make_genecis
from zscir.benchmarks import build_benchmark
from zscir.benchmarks.submissions import SubmissionError, validate_circo, validate_cirr
from zscir.evaluation.metric import BenchmarkMetric


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    make_fashioniq(root / "FashionIQ")
    make_cirr(root / "CIRR")
    make_circo(root / "CIRCO")
    make_genecis(root / "GeneCIS")
    return root


def ranked_query(bench, first: list[str]) -> torch.Tensor:
    """A query over one-hot gallery features that ranks ``first`` in that order, then every other
    image tied at 0 (so in gallery order)."""
    index = bench.gallery_index()
    q = torch.zeros(len(bench.gallery))
    for i, name in enumerate(first):
        q[index[name]] = 1.0 - 0.01 * i
    return q


def one_hot(bench) -> torch.Tensor:
    return torch.eye(len(bench.gallery))


# ---- naive numpy versions of the official evaluators (full stable sort, names compared) ----------------------
def np_scores(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    return (q[:, None, :].astype(np.float64) * g[None].astype(np.float64)).sum(-1)


def np_ranking(q, g, names) -> np.ndarray:
    return np.array(names)[np.argsort(-np_scores(q, g), axis=1, kind="stable")]


def naive_fiq(bench, q, g) -> dict:
    names = [x.image_id for x in bench.gallery]
    ranked = np_ranking(q, g, names)
    hits = np.array([[x.target_ids[0] in row[:k] for k in (10, 50)] for x, row in zip(bench.queries, ranked)])
    return {"recall@10": 100 * hits[:, 0].mean(), "recall@50": 100 * hits[:, 1].mean()}


def naive_cirr(bench, q, g) -> dict:
    names = [x.image_id for x in bench.gallery]
    out = {f"recall@{k}": 0.0 for k in (1, 5, 10, 50)} | {f"recall_subset@{k}": 0.0 for k in (1, 2, 3)}
    for x, row in zip(bench.queries, np_ranking(q, g, names)):
        row = [n for n in row if n != x.reference.image_id]  # SEARLE deletes the reference by name
        members = [n for n in row if n in x.subset_ids]
        for k in (1, 5, 10, 50):
            out[f"recall@{k}"] += x.target_ids[0] in row[:k]
        for k in (1, 2, 3):
            out[f"recall_subset@{k}"] += x.target_ids[0] in members[:k]
    return {k: 100 * v / len(bench.queries) for k, v in out.items()}


def naive_circo(bench, q, g) -> dict:
    names = [x.image_id for x in bench.gallery]
    out = {f"{m}@{k}": 0.0 for m in ("map", "recall") for k in (5, 10, 25, 50)}
    for x, row in zip(bench.queries, np_ranking(q, g, names)[:, :50]):
        rel = np.isin(row, x.target_ids)
        precision = np.cumsum(rel) * rel / np.arange(1, len(row) + 1)
        for k in (5, 10, 25, 50):
            out[f"map@{k}"] += precision[:k].sum() / min(k, len(x.target_ids))
            out[f"recall@{k}"] += float(x.target_ids[0] in row[:k])
    return {k: 100 * v / len(bench.queries) for k, v in out.items()}


def naive_genecis(bench, q, g) -> dict:
    index = bench.gallery_index()
    hits = np.zeros(3)
    for i, x in enumerate(bench.queries):
        cand = g[[index[c] for c in x.candidate_ids]]
        scores = np_scores(q[i : i + 1], cand)[0]
        order = np.argsort(-scores, kind="stable")  # index 0 (the target) first among equals
        hits += [0 in order[:k] for k in (1, 2, 3)]
    return {f"recall@{k}": 100 * h / len(bench.queries) for k, h in zip((1, 2, 3), hits)}


@pytest.mark.parametrize(
    ("kind", "root", "options", "naive"),
    [
        ("fashioniq", "FashionIQ", {"category": "dress"}, naive_fiq),
        ("fashioniq", "FashionIQ", {"category": "shirt"}, naive_fiq),
        ("cirr", "CIRR", {}, naive_cirr),
        ("circo", "CIRCO", {}, naive_circo),
        ("genecis", "GeneCIS", {"task": "focus_attribute"}, naive_genecis),
        ("genecis", "GeneCIS", {"task": "change_object"}, naive_genecis),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_a_naive_official_implementation(data, kind, root, options, naive, seed):
    bench = build_benchmark(kind, data / root, "val", **options)
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(len(bench.gallery), 3)).astype(np.float32)
    g[2] = g[1]  # exact duplicates: ties resolved towards the lower gallery index
    g[5] = g[1]
    q = rng.normal(size=(len(bench.queries), 3)).astype(np.float32)
    q[0] = g[1]
    ours = bench.score(torch.from_numpy(q), torch.from_numpy(g))
    expected = naive(bench, q, g)
    assert set(expected) <= set(ours)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


# ---- hand-computed cases ------------------------------------------------------------------------------------
def test_fashioniq_average_is_the_mean_over_categories_and_the_reference_stays(data):
    bench = build_benchmark("fashioniq", data / "FashionIQ", "val", category="all")
    others = [f"B00DRESS{i:02d}" for i in (6, 7, 8, 9, 10, 11, 12, 1, 3, 2)]
    first = {
        "dress/0": ["B00DRESS01", "B00DRESS02"],  # rank 1
        "dress/1": [*others, "B00DRESS04"],  # rank 10: a miss at 10
        "dress/2": ["B00DRESS05"],  # rank 0
        "shirt/0": ["B00SHIRT01", "B00SHARED1"],  # rank 1
        # all 10 other images ahead, the reference B00SHARED2 among them: rank 10 (9 if it were removed)
        "shirt/1": [
            *(f"B00SHIRT{i:02d}" for i in (4, 5, 6, 7, 8, 9, 1, 2)),
            "B00SHARED1",
            "B00SHARED2",
            "B00SHIRT03",
        ],
        "shirt/2": ["B00SHIRT02"],  # rank 0
        "toptee/0": ["B00TOPTE01", "B00TOPTE02", "B00SHARED2", "B00SHARED1"],  # rank 3 of 4
    }
    q = torch.stack([ranked_query(bench, first[x.query_id]) for x in bench.queries])
    m = bench.score(q, one_hot(bench))
    assert m["dress/recall@10"] == pytest.approx(200 / 3)
    assert m["shirt/recall@10"] == pytest.approx(200 / 3)
    assert m["toptee/recall@10"] == 100.0
    assert m["recall@10"] == pytest.approx((200 / 3 + 200 / 3 + 100) / 3)  # 77.78, not the pooled 5/7
    assert m["recall@10"] != pytest.approx(100 * 5 / 7)
    assert m["recall@50"] == m["dress/recall@50"] == 100.0
    # a single category gives the plain keys with the same value
    dress = build_benchmark("fashioniq", data / "FashionIQ", "val", category="dress")
    qd = torch.stack([ranked_query(dress, first[f"dress/{x.query_id}"]) for x in dress.queries])
    assert dress.score(qd, one_hot(dress)) == {"recall@10": pytest.approx(200 / 3), "recall@50": 100.0}


CIRR_FIRST = {  # per pairid: the images ranked first, in order (the rest tie at 0, in gallery order)
    "12060": ["dev-1-0-img0", "dev-2-0-img0", "dev-1-0-img1", "dev-1-1-img0"],  # ref first: target rank 2
    "12061": ["dev-1-10-img0"],  # rank 0
    "305": ["dev-11-0-img0", "dev-3-0-img0", "dev-10-1-img0", "dev-1-0-img0", "dev-1-1-img0", "dev-2-0-img1"],
    "17": [],  # all tied: target dev-11-0-img0 has gallery index 3 -> rank 3; in the subset, rank 1
    "18": ["dev-10-1-img0", "dev-1-0-img0"],  # the reference first, then the target: rank 0
}


def test_cirr_hand_computed(data):
    bench = build_benchmark("cirr", data / "CIRR", "val")
    q = torch.stack([ranked_query(bench, CIRR_FIRST[x.query_id]) for x in bench.queries])
    m = bench.score(q, one_hot(bench))
    # global ranks without the reference: 2, 0, 5, 3, 0; subset ranks: 1, 0, 4, 1, 0
    assert m == pytest.approx(
        {
            "recall@1": 40.0,
            "recall@5": 80.0,
            "recall@10": 100.0,
            "recall@50": 100.0,
            "recall_subset@1": 40.0,
            "recall_subset@2": 80.0,
            "recall_subset@3": 80.0,
        }
    )


def test_circo_hand_computed(data):
    bench = build_benchmark("circo", data / "CIRCO", "val")
    first = {
        "0": ["85932", "489535", "9761", "7", "57541"],  # the reference stays, first
        "1": ["7"],  # the reference, then gallery order: the one GT (243611, index 0) at position 2
        "2": [],  # gallery order: GTs 7, 1234567, 42 at positions 2, 10, 11
    }
    q = torch.stack([ranked_query(bench, first[x.query_id]) for x in bench.queries])
    m = bench.score(q, one_hot(bench))
    F = Fraction
    # query 0: ranking 85932, 489535, 9761, 7, 57541, 243611, 375057, 119881, ...: hits at 2, 3, 5, 7, 8 of 5 GTs
    ap0 = {5: (F(1, 2) + F(2, 3) + F(3, 5)) / 5}
    ap0[10] = ap0[25] = ap0[50] = (F(1, 2) + F(2, 3) + F(3, 5) + F(4, 7) + F(5, 8)) / 5
    ap1 = dict.fromkeys((5, 10, 25, 50), F(1, 2))
    ap2 = {5: F(1, 2) / 3, 10: (F(1, 2) + F(2, 10)) / 3}
    ap2[25] = ap2[50] = (F(1, 2) + F(2, 10) + F(3, 11)) / 3
    for k in (5, 10, 25, 50):
        assert m[f"map@{k}"] == pytest.approx(float(100 * (ap0[k] + ap1[k] + ap2[k]) / 3)), k
    # recall counts target_img_id only: 9761 at 3, 243611 at 2, 42 at 11
    assert (m["recall@5"], m["recall@10"], m["recall@25"]) == pytest.approx((200 / 3, 200 / 3, 100.0))
    assert m["semantic_map@10/cardinality"] == pytest.approx(float(100 * (ap0[10] + ap2[10]) / 2))
    assert m["semantic_map@10/negation"] == pytest.approx(50.0)


def test_genecis_hand_computed_target_wins_exact_ties(data):
    bench = build_benchmark("genecis", data / "GeneCIS", "val", task="focus_attribute")
    q0, q1, q2 = bench.queries
    first = {
        "0": [q0.target_ids[0]],  # the target and its copy in the gallery tie: counts for the target
        "1": [q1.candidate_ids[1], q1.target_ids[0]],  # rank 1
        "2": [q2.candidate_ids[3], q2.candidate_ids[1], q2.candidate_ids[2], q2.target_ids[0]],  # rank 3
    }
    q = torch.stack([ranked_query(bench, first[x.query_id]) for x in bench.queries])
    assert bench.score(q, one_hot(bench)) == pytest.approx(
        {"recall@1": 100 / 3, "recall@2": 200 / 3, "recall@3": 200 / 3}
    )


# ---- submission files -------------------------------------------------------------------------------------
def test_cirr_submission_files_field_by_field(data):
    bench = build_benchmark("cirr", data / "CIRR", "test1")
    first = {x.query_id: [] for x in bench.queries}
    first["12061"] = ["test1-1-0-img0", "test1-2-0-img0", "test1-1-0-img1"]  # the reference first
    q = torch.stack([ranked_query(bench, first[x.query_id]) for x in bench.queries])
    files = bench.submission(q, one_hot(bench))
    assert set(files) == {"cirr_test1_recall.json", "cirr_test1_recall_subset.json"}
    recall, subset = files["cirr_test1_recall.json"], files["cirr_test1_recall_subset.json"]
    assert list(recall)[:2] == ["version", "metric"]
    assert (recall["version"], recall["metric"]) == ("rc2", "recall")
    assert (subset["version"], subset["metric"]) == ("rc2", "recall_subset")
    assert set(recall) - {"version", "metric"} == {"12061", "12062", "306", "18", "19"}
    assert recall["12061"] == [
        "test1-2-0-img0",
        "test1-1-0-img1",
        "test1-1-1-img0",
        "test1-11-0-img0",
        "test1-1-10-img0",
        "test1-10-1-img0",
        "test1-2-0-img1",
        "test1-3-0-img0",
    ]  # all 9 images but the reference (fewer than 50), names without .png
    assert subset["12061"] == ["test1-1-0-img1", "test1-1-1-img0", "test1-11-0-img0"]
    # pair 12062 shares the reference; ties everywhere: gallery order, reference skipped
    assert recall["12062"][:2] == ["test1-1-0-img1", "test1-1-1-img0"]
    for x in bench.queries:
        assert x.reference.image_id not in recall[x.query_id]
        assert len(recall[x.query_id]) == len(set(recall[x.query_id])) == 8
        assert set(subset[x.query_id]) <= set(x.subset_ids)
        assert len(subset[x.query_id]) == 3


def test_circo_submission_file_field_by_field(data):
    bench = build_benchmark("circo", data / "CIRCO", "test")
    first = {"0": ["42", "7", "100"], "1": [], "2": ["7"]}
    q = torch.stack([ranked_query(bench, first[x.query_id]) for x in bench.queries])
    files = bench.submission(q, one_hot(bench))
    (name,) = files
    assert name == "circo_test.json"
    sub = files[name]
    assert list(sub) == ["0", "1", "2"]
    assert sub["0"] == [42, 7, 100, 243611, 9761, 489535, 57541, 375057, 119881, 85932, 1234567]
    assert sub["2"][0] == 7  # the reference is NOT removed
    assert all(isinstance(v, int) for v in sub["1"])
    assert all(len(v) == len(set(v)) == 11 for v in sub.values())  # every image (fewer than 50)


def test_submission_validation_names_the_broken_rule(data):
    bench = build_benchmark("cirr", data / "CIRR", "test1")
    q = torch.eye(len(bench.gallery))[: len(bench.queries)]
    files = bench.submission(q, one_hot(bench))
    names = [g.image_id for g in bench.gallery]

    def broken(edit, which="cirr_test1_recall.json"):
        copy = {k: (list(v) if isinstance(v, list) else v) for k, v in files[which].items()}
        edit(copy)
        other = files[
            "cirr_test1_recall_subset.json" if which.endswith("recall.json") else "cirr_test1_recall.json"
        ]
        pair = (copy, other) if which.endswith("recall.json") else (other, copy)
        return lambda: validate_cirr(*pair, bench.queries, names)

    validate_cirr(
        files["cirr_test1_recall.json"], files["cirr_test1_recall_subset.json"], bench.queries, names
    )
    cases = [
        (broken(lambda d: d.pop("306")), "missing"),
        (broken(lambda d: d.__setitem__("12061", d["12061"][:-1] + d["12061"][:1])), "repeated"),
        (broken(lambda d: d.__setitem__("12061", [*d["12061"][:-1], "test1-1-0-img0"])), "reference"),
        (broken(lambda d: d.__setitem__("18", d["18"][:5])), "5 entries, expected 8"),
        (broken(lambda d: d.__setitem__("metric", "recall_subset")), "version/metric"),
        (
            broken(lambda d: d["306"].__setitem__(0, "test1-99-0-img0"), "cirr_test1_recall_subset.json"),
            "not allowed",
        ),
    ]
    for check, match in cases:
        with pytest.raises(SubmissionError, match=match):
            check()
    circo = build_benchmark("circo", data / "CIRCO", "test")
    sub = circo.submission(torch.eye(11)[:3], torch.eye(11))["circo_test.json"]
    with pytest.raises(SubmissionError, match="must be a int"):
        validate_circo(
            {k: [str(i) for i in v] for k, v in sub.items()},
            circo.queries,
            [g.image_id for g in circo.gallery],
        )
    with pytest.raises(SubmissionError, match="unexpected"):
        validate_circo({**sub, "3": sub["0"]}, circo.queries, [g.image_id for g in circo.gallery])


# ---- the torchmetrics wrapper and the functional examples --------------------------------------------------
def test_benchmark_metric_drops_the_sampler_padding(data):
    bench = build_benchmark("cirr", data / "CIRR", "val")
    q = torch.stack([ranked_query(bench, CIRR_FIRST[x.query_id]) for x in bench.queries])
    metric = BenchmarkMetric(bench)
    metric.set_gallery(one_hot(bench))
    # two "ranks" as DistributedSampler splits 5 queries: [0, 2, 4] and [1, 3, 0] (0 repeated as padding)
    metric.update("query", torch.tensor([0, 2, 4]), q[[0, 2, 4]])
    metric.update("query", torch.tensor([1, 3, 0]), q[[1, 3, 0]] * 2)
    assert metric.compute() == bench.score(q, one_hot(bench))
    metric.reset()
    metric.set_gallery(one_hot(bench))
    metric.update("query", torch.tensor([0, 1, 2]), q[:3])
    with pytest.warns(UserWarning, match="only part of the queries"):
        assert metric.compute() == {}


def test_functional_examples_hold():
    failures, tried = doctest.testmod(zscir.metrics.functional, verbose=False)
    assert tried >= 10
    assert failures == 0
