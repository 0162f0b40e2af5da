"""``protocol="pli"``: PLI's own evaluation rules, next to the official ones on the same miniature data.

For each benchmark a small case where the two protocols give different numbers, both computed by hand;
the official files PLI's rules come from (Chen-Junyang-cn/PLI) are cited where a rule is transcribed.
"""

import json
from fractions import Fraction

import numpy as np
import pytest
import torch

from benchmark_fixtures import (
    make_circo,
    make_cirr,
    make_fashioniq,
    make_fashioniq_pli_lists,
    make_genecis,
)
from zscir.benchmarks import build_benchmark
from zscir.benchmarks.base import AnnotationError, DatasetLayoutError, pli_caption
from zscir.cli.config import compose_config
from zscir.cli.evaluate import evaluate
from zscir.cli.score import main as score_main
from zscir.cli.score import score
from zscir.evaluation.visualize import retrieve
from zscir.methods import build_method
from zscir.retrieval.search import normalize

TINY = {"name": "tiny", "kind": "open_clip", "model": "tiny"}
CIRR_CAPTIONS = {  # pairid -> a caption; three of them change under PLI's rewrite
    12060: "Is it red? Yes.",
    12061: " add a dog & a cat ",
    305: "change pair 305",
    17: "make it *bigger*",
    18: "change pair 18",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The benchmarks under the names conf/benchmark/*.yaml expect below paths.data_dir, with PLI's
    FashionIQ lists and punctuated CIRR captions."""
    root = tmp_path_factory.mktemp("data")
    make_fashioniq_pli_lists(make_fashioniq(root / "FashionIQ"))
    make_cirr(root / "CIRR", layout="readme")
    for split in ("val", "test1"):
        path = root / "CIRR" / "captions" / f"cap.rc2.{split}.json"
        records = json.loads(path.read_text())
        for rec in records:
            rec["caption"] = CIRR_CAPTIONS[rec["pairid"] - (split == "test1")]
        path.write_text(json.dumps(records))
    make_circo(root / "CIRCO")
    make_genecis(root / "GeneCIS")
    return root


def ranked_query(bench, first: list[str]) -> torch.Tensor:
    """A query over one-hot gallery features ranking ``first`` in that order, then every other image
    tied at 0 (in gallery order)."""
    index = bench.gallery_index()
    q = torch.zeros(len(bench.gallery))
    for i, name in enumerate(first):
        q[index[name]] = 1.0 - 0.01 * i
    return q


def one_hot(bench) -> torch.Tensor:
    return torch.eye(len(bench.gallery))


def run_queries(method, bench, gallery_feats: torch.Tensor) -> dict[str, float]:
    """The evaluation loop's query side (``_query_step`` over the benchmark's query loader) with the
    gallery features given: what ``trainer.test`` computes, without a Trainer."""
    method.attach_benchmarks([bench], batch_size=2)
    metric = method.evaluation.metrics[0]
    metric.set_gallery(gallery_feats)
    for batch in method.evaluation.query_loaders()[0]:
        method._query_step(batch, 0)
    return metric.compute()


# ---- the caption rewrite ----------------------------------------------------------------------------------
def test_pli_caption_is_the_official_string_rewrite():
    # PLI data/cirr.py:12-13 and data/fashionIQ.py:53-54: strip, then four replacements, no spaces added
    assert pli_caption("  is red. & blue?  ") == "is reddotmark andmark bluequestionmark"
    assert pli_caption("a *b* ..") == "a starmarkbstarmark dotmarkdotmark"
    assert pli_caption("\tno change \n") == "no change"


# ---- CIRR: only the captions differ -----------------------------------------------------------------------
CIRR_FIRST = {  # caption text the method sees -> images ranked first (the rest tie at 0, in gallery order)
    "Is it red? Yes.": ["dev-1-0-img0", "dev-2-0-img0", "dev-1-0-img1", "dev-1-1-img0"],
    " add a dog & a cat ": ["dev-1-10-img0"],
    "change pair 305": [
        "dev-11-0-img0",
        "dev-3-0-img0",
        "dev-10-1-img0",
        "dev-1-0-img0",
        "dev-1-1-img0",
        "dev-2-0-img1",
    ],
    "make it *bigger*": [],
    "change pair 18": ["dev-10-1-img0", "dev-1-0-img0"],
    # the same model reads PLI's rewritten captions differently
    "Is it redquestionmark Yesdotmark": ["dev-1-1-img0"],
    "add a dog andmark a cat": [],
    "make it starmarkbiggerstarmark": ["dev-11-0-img0"],
}


def test_cirr_pli_rewrites_the_captions_the_method_sees(data):
    official = build_benchmark("cirr", data / "CIRR", "val")
    pli = build_benchmark("cirr", data / "CIRR", "val", protocol="pli")
    assert [q.texts for q in official.queries] == [
        (CIRR_CAPTIONS[int(q.query_id)],) for q in official.queries
    ]
    assert [q.texts[0] for q in pli.queries] == [
        "Is it redquestionmark Yesdotmark",
        "add a dog andmark a cat",
        "change pair 305",
        "make it starmarkbiggerstarmark",
        "change pair 18",
    ]
    assert [g.image_id for g in pli.gallery] == [g.image_id for g in official.gallery]
    method = build_method(TINY, {"kind": "pli"})
    method.compose = lambda batch: torch.stack(
        [ranked_query(official, CIRR_FIRST[t]) for t in batch["texts"]]
    )
    # official: global ranks without the reference 2, 0, 5, 3, 0; subset ranks 1, 0, 4, 1, 0
    assert run_queries(method, official, one_hot(official)) == pytest.approx(
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
    # PLI: 12060 ranks its target first; 12061 ties everywhere: dev-1-10-img0 (index 4) after indices
    # 1, 2, 3 (0 is the removed reference) -> rank 3, in the subset also 3; 17 ranks its target first.
    # Global ranks 0, 3, 5, 0, 0; subset ranks 0, 3, 4, 0, 0
    assert run_queries(method, pli, one_hot(pli)) == pytest.approx(
        {
            "pli/recall@1": 60.0,
            "pli/recall@5": 80.0,
            "pli/recall@10": 100.0,
            "pli/recall@50": 100.0,
            "pli/recall_subset@1": 60.0,
            "pli/recall_subset@2": 60.0,
            "pli/recall_subset@3": 60.0,
        }
    )
    assert pli.metric_names == tuple(f"pli/{m}" for m in official.metric_names)


def test_cirr_pli_submission_files_carry_the_protocol(data):
    bench = build_benchmark("cirr", data / "CIRR", "test1", protocol="pli")
    files = bench.submission(torch.eye(len(bench.gallery))[: len(bench.queries)], one_hot(bench))
    assert set(files) == {"cirr_test1_pli_recall.json", "cirr_test1_pli_recall_subset.json"}
    assert [q.texts[0] for q in bench.queries][:2] == [
        "Is it redquestionmark Yesdotmark",
        "add a dog andmark a cat",
    ]


# ---- CIRCO: the reference is removed ---------------------------------------------------------------------
def test_circo_pli_removes_the_reference(data):
    official = build_benchmark("circo", data / "CIRCO", "val")
    pli = build_benchmark("circo", data / "CIRCO", "val", protocol="pli")
    first = {
        "0": ["85932", "489535", "9761", "7", "57541"],  # the reference first
        "1": ["7"],  # the reference, then gallery order: the one GT 243611 (index 0) next
        "2": [],  # gallery order 243611, 7, 9761, 489535, 57541, 375057, 119881, 85932, 100, 1234567, 42
    }
    q = torch.stack([ranked_query(official, first[x.query_id]) for x in official.queries])
    m, p = official.score(q, one_hot(official)), pli.score(q, one_hot(pli))
    F = Fraction
    # official (reference kept): query 0 hits at 2, 3, 5, 7, 8 of 5 GTs; query 1 at 2; query 2 at 2, 10, 11
    ap = {
        5: [(F(1, 2) + F(2, 3) + F(3, 5)) / 5, F(1, 2), F(1, 2) / 3],
        10: [(F(1, 2) + F(2, 3) + F(3, 5) + F(4, 7) + F(5, 8)) / 5, F(1, 2), (F(1, 2) + F(2, 10)) / 3],
    }
    # PLI (reference removed): query 0 hits at 1, 2, 4, 6, 7; query 1 at 1; query 2 (100 removed) at 2, 9, 10
    ap_pli = {
        5: [(F(1) + F(1) + F(3, 4)) / 5, F(1), F(1, 2) / 3],
        10: [(F(1) + F(1) + F(3, 4) + F(4, 6) + F(5, 7)) / 5, F(1), (F(1, 2) + F(2, 9) + F(3, 10)) / 3],
    }
    for k in (5, 10):
        assert m[f"map@{k}"] == pytest.approx(float(100 * sum(ap[k]) / 3)), k
        assert p[f"pli/map@{k}"] == pytest.approx(float(100 * sum(ap_pli[k]) / 3)), k
    # recall counts target_img_id (9761, 243611, 42): official at 3, 2, 11; PLI at 2, 1, 10
    assert (m["recall@5"], m["recall@10"]) == pytest.approx((200 / 3, 200 / 3))
    assert (p["pli/recall@5"], p["pli/recall@10"]) == pytest.approx((200 / 3, 100.0))
    assert m["semantic_map@10/negation"] == pytest.approx(50.0)
    assert p["pli/semantic_map@10/negation"] == pytest.approx(100.0)
    assert set(p) == {f"pli/{k}" for k in m}
    # the retrieval grids rank as the protocol does: query 1's reference 7 first (official) or absent (PLI)
    assert retrieve(official, q, one_hot(official), [1], k=2)[0].ranked == (1, 0)
    assert retrieve(pli, q, one_hot(pli), [1], k=2)[0].ranked == (0, 2)


def test_circo_pli_submission_leaves_the_reference_out(data):
    bench = build_benchmark("circo", data / "CIRCO", "test", protocol="pli")
    first = {"0": ["7", "42"], "1": [], "2": ["7"]}  # queries 0 and 2 rank their reference (7) first
    q = torch.stack([ranked_query(bench, first[x.query_id]) for x in bench.queries])
    files = bench.submission(q, one_hot(bench))
    sub = files["circo_test_pli.json"]
    assert sub["0"] == [42, 243611, 9761, 489535, 57541, 375057, 119881, 85932, 100, 1234567]
    assert sub["2"][0] == 243611
    assert all(len(v) == 10 for v in sub.values())  # all 11 images but the reference


# ---- FashionIQ: PLI's lists, gallery, per-order queries and reference removal ------------------------------
def test_fashioniq_pli_reads_plis_lists(data):
    bench = build_benchmark("fashioniq", data / "FashionIQ", "val", category="dress", protocol="pli")
    assert len(bench.queries) == 14  # one per caption line
    # PLI data/fashionIQ.py:41-54: caps[i] + " and " + caps[i ± 1] from lines ending in a space, then
    # strip + the punctuation rewrite (the double space inside stays)
    assert [q.texts for q in bench.queries[:8]] == [
        ("is shiny and silverdotmark  and fit and flare",),
        ("fit and flare  and is shiny and silverdotmark",),
        ("is white,  and has sleevesquestionmark",),
        ("has sleevesquestionmark  and is white,",),
        ("is floraldotmarkdotmarkdotmark  and is floraldotmarkdotmarkdotmark",),
        ("is floraldotmarkdotmarkdotmark  and is floraldotmarkdotmarkdotmark",),
        ("is red andmark short  and has a starmarkstarstarmark",),
        ("has a starmarkstarstarmark  and is red andmark short",),
    ]
    assert [(q.query_id, q.reference.image_id, q.target_ids) for q in bench.queries[2:4]] == [
        ("2", "B00DRESS01", ("B00DRESS04",)),
        ("3", "B00DRESS01", ("B00DRESS04",)),
    ]
    # the gallery: the images the list names, in order of first appearance
    assert [g.image_id for g in bench.gallery] == [
        f"B00DRESS{i:02d}" for i in (1, 2, 4, 3, 5, 6, 7, 8, 9, 10, 11, 12)
    ]
    shirt = build_benchmark("fashioniq", data / "FashionIQ", "val", category="shirt", protocol="pli")
    assert [g.image_id for g in shirt.gallery] == ["B00SHIRT01", "B00SHARED1", "B00SHIRT03", "B00SHIRT02"]
    assert shirt.queries[3].texts == ("dotmark  and longer, and red",)


def test_fashioniq_pli_hand_computed_next_to_the_official_protocol(data):
    official = build_benchmark("fashioniq", data / "FashionIQ", "val", category="dress")
    pli = build_benchmark("fashioniq", data / "FashionIQ", "val", category="dress", protocol="pli")
    # the same model ranks B00DRESS01 -> 04 this way in both protocols: reference first, target 11th
    ref_first = [f"B00DRESS{i:02d}" for i in (1, 6, 7, 8, 9, 10, 11, 12, 3, 2, 4)]
    # and the second caption order of 06 -> 07 (PLI's line 7): ten images ahead of the target, not the reference
    line7 = [f"B00DRESS{i:02d}" for i in (1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 7)]

    def first(query) -> list[str]:
        if query.target_ids == ("B00DRESS04",):
            return ref_first
        return line7 if query.query_id in ("7", "dress/7") else [query.target_ids[0]]

    q = torch.stack([ranked_query(official, first(x)) for x in official.queries])
    # official: 3 triplets, the reference stays: ranks 0, 10, 0
    assert official.score(q, one_hot(official)) == pytest.approx({"recall@10": 200 / 3, "recall@50": 100.0})
    q = torch.stack([ranked_query(pli, first(x)) for x in pli.queries])
    # PLI: 14 lines; 01 -> 04 (lines 2, 3) at rank 9 once its reference is removed; line 7 at rank 10
    assert pli.score(q, one_hot(pli)) == pytest.approx({"pli/recall@10": 1300 / 14, "pli/recall@50": 100.0})
    # category "all": the unweighted mean over categories (shirt and toptee: every target first)
    both = build_benchmark("fashioniq", data / "FashionIQ", "val", category="all", protocol="pli")
    q = torch.stack([ranked_query(both, first(x)) for x in both.queries])
    m = both.score(q, one_hot(both))
    assert m["pli/dress/recall@10"] == pytest.approx(1300 / 14)
    assert m["pli/shirt/recall@10"] == m["pli/toptee/recall@10"] == 100.0
    assert m["pli/recall@10"] == pytest.approx((1300 / 14 + 200) / 3)
    assert set(m) == set(both.metric_names)


def test_fashioniq_pli_refuses_a_missing_or_broken_list(data, tmp_path):
    root = make_fashioniq(tmp_path / "FashionIQ")
    with pytest.raises(DatasetLayoutError, match=r"captions_pairs/fashion_iq-val-cap-dress\.txt"):
        build_benchmark("fashioniq", root, "val", category="dress", protocol="pli")
    (root / "captions_pairs").mkdir()
    (root / "captions_pairs" / "fashion_iq-val-cap-dress.txt").write_text(
        "dress/B00DRESS01.jpg;dress/B00DRESS02.jpg;is red \n"
    )
    with pytest.raises(AnnotationError, match="must be even"):
        build_benchmark("fashioniq", root, "val", category="dress", protocol="pli")
    with pytest.raises(ValueError, match="implements the protocol"):
        build_benchmark("fashioniq", root, "val", category="dress", protocol="searle")


# ---- GeneCIS: the protocol composes the query from raw tower features ------------------------------------
def test_genecis_pli_composes_half_and_half_of_the_raw_features(data):
    official = build_benchmark("genecis", data / "GeneCIS", "val", task="focus_object")
    pli = build_benchmark("genecis", data / "GeneCIS", "val", task="focus_object", protocol="pli")
    names = [g.image_id for g in official.gallery]
    assert names == ["153527", "121506", "536947", "42", "77", "189213"]  # one-hot gallery dimensions
    e = torch.eye(6)
    # raw (unnormalised) tower features per template (keyed by its condition): (image, text)
    towers = {
        "cardboard": (8 * e[1], e[0]),  # target 153527 = dim 0; a large image feature at distractor 121506
        "dog": (3 * e[5], e[4]),  # target 77 (also in its gallery: a tie for the target); image at 189213
        "table": (10 * e[1], e[2]),  # target 121506 = dim 1; the text points at distractor 536947
    }
    method = build_method(TINY, {"kind": "pli", "mask_ratio": 0.75})  # inference weight 0.25

    def encode_towers(batch):
        rows = [towers[text] for text in batch["texts"]]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    method.encode_towers = encode_towers
    # the official protocol scores the method's own composition: PLI's normalize(n(t) + 0.25 n(a))
    method.compose = lambda batch: normalize(
        normalize(encode_towers(batch)[1]) + 0.25 * normalize(encode_towers(batch)[0])
    )
    # official queries ∝ e0 + 0.25 e1, e4 + 0.25 e5, e2 + 0.25 e1: the target first, first, second
    assert run_queries(method, official, e) == pytest.approx(
        {"recall@1": 200 / 3, "recall@2": 100.0, "recall@3": 100.0}
    )
    # PLI genecis_eval.py:114-116: normalize(0.5 a + 0.5 t) ∝ e0 + 8 e1, e4 + 3 e5, e2 + 10 e1:
    # the target second, second, first
    assert run_queries(method, pli, e) == pytest.approx(
        {"pli/recall@1": 100 / 3, "pli/recall@2": 100.0, "pli/recall@3": 100.0}
    )


def test_encode_towers_gives_the_raw_features_pli_composes(data):
    method = build_method(TINY, {"kind": "pli", "mask_ratio": 0.75}).eval()
    batch = {
        "pixels": torch.randn(2, 3, method.encoder.image_size, method.encoder.image_size),
        "texts": ["a", "b c"],
    }
    with torch.no_grad():
        image, text = method.encode_towers(batch)
        assert torch.equal(image, method.encoder.encode_image(batch["pixels"]))
        assert torch.equal(text, method.encoder.encode_text(method.encoder.tokenize(batch["texts"])))
        assert not torch.allclose(image.norm(dim=-1), torch.ones(2))  # not normalised
        expected = normalize(normalize(text) + 0.25 * normalize(image))
        assert torch.allclose(method.compose(batch), expected, atol=1e-6)


def test_methods_not_composing_from_their_towers_are_refused(data):
    pli = build_benchmark("genecis", data / "GeneCIS", "val", task="focus_object", protocol="pli")
    with pytest.raises(ValueError, match=r"benchmark\.protocol=official"):
        build_method(TINY, {"kind": "image_only"}).attach_benchmarks([pli])
    build_method(TINY, {"kind": "image_only"}).attach_benchmarks(
        [build_benchmark("genecis", data / "GeneCIS", "val", task="focus_object")]
    )


# ---- zscir-score and zscir-eval ----------------------------------------------------------------------------
def random_features(bench, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(bench.queries), 6, generator=g), torch.randn(len(bench.gallery), 6, generator=g)


SCORE_CASES = [
    ("fashioniq", "FashionIQ", [], {"category": "all"}),
    ("fashioniq", "FashionIQ", [], {"category": "shirt"}),  # inferred from the gallery under PLI's rules
    ("cirr", "CIRR", [], {}),
    ("circo", "CIRCO", [], {}),
    ("genecis", "GeneCIS", ["--task", "change_object"], {"task": "change_object"}),
]


@pytest.mark.parametrize(("kind", "root", "args", "options"), SCORE_CASES)
def test_score_cli_scores_under_the_pli_protocol(data, tmp_path, kind, root, args, options):
    bench = build_benchmark(kind, data / root, "val", protocol="pli", **options)
    q, g = random_features(bench)
    np.savez(tmp_path / "f.npz", **bench.feature_arrays(q, g))
    base = [
        "--benchmark",
        kind,
        "--root",
        str(data / root),
        "--split",
        "val",
        "--features",
        str(tmp_path / "f.npz"),
    ]
    assert score_main([*base, "--out", str(tmp_path / "o"), "--protocol", "pli", *args]) == 0
    written = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert written == pytest.approx(bench.score(q, g), abs=1e-12)
    assert written
    assert all(k.startswith("pli/") for k in written)
    if kind == "circo":  # the queries are the same under both protocols: either scores the file
        official = build_benchmark(kind, data / root, "val")
        assert score(kind, data / root, "val", tmp_path / "f.npz", tmp_path / "p")[
            "metrics"
        ] == pytest.approx(official.score(q, g))
    else:  # features of PLI's queries never enter an official score, nor the other way round
        with pytest.raises(ValueError, match="computed under protocol 'pli'"):
            score(kind, data / root, "val", tmp_path / "f.npz", tmp_path / "p", **options)


def test_score_refuses_official_cirr_features_under_pli(data, tmp_path):
    bench = build_benchmark("cirr", data / "CIRR", "val")
    np.savez(tmp_path / "f.npz", **bench.feature_arrays(*random_features(bench)))
    with pytest.raises(ValueError, match=r"computed under protocol 'official'.*benchmark\.protocol=pli"):
        score("cirr", data / "CIRR", "val", tmp_path / "f.npz", tmp_path / "o", protocol="pli")


@pytest.mark.parametrize(
    "overrides",
    [
        ["benchmark=genecis", "benchmark.task=focus_object"],
        ["benchmark=fashioniq", "benchmark.category=toptee"],
    ],
)
def test_eval_under_the_pli_protocol_writes_pli_keys_that_score_reproduces(data, tmp_path, overrides):
    run = tmp_path / "run"
    cfg = compose_config(
        "eval",
        [
            "method=sum",
            "backbone=tiny",
            f"paths.data_dir={data}",
            f"paths.output_dir={tmp_path / 'outputs'}",
            f"paths.run_dir={run}",
            "eval.num_workers=0",
            "eval.batch_size=2",
            "trainer.enable_progress_bar=false",
            *overrides,
            "benchmark.protocol=pli",
        ],
    )
    metrics = evaluate(cfg)
    kind = overrides[0].split("=")[1]
    expected = {"genecis": {"pli/recall@1", "pli/recall@2", "pli/recall@3"}}.get(
        kind, {"pli/recall@10", "pli/recall@50"}
    )
    assert set(metrics) == expected
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(metrics)
    with np.load(run / "features.npz") as f:
        assert str(f["protocol"]) == "pli"
    root = {"genecis": "GeneCIS", "fashioniq": "FashionIQ"}[kind]
    options = {"task": "focus_object"} if kind == "genecis" else {"category": "toptee"}
    again = score(kind, data / root, "val", run / "features.npz", tmp_path / "s", protocol="pli", **options)
    assert again["metrics"] == pytest.approx(metrics, abs=1e-9)
