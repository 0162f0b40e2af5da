"""benchmark=custom: the JSONL + image-folder layout, bad lines reported by number, CIRCO-style scores
checked against values worked out by hand, and the config wiring (registry, conf/benchmark/custom.yaml)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from custom_set import make_set, write_image
from zscir.benchmarks import AnnotationError, DatasetLayoutError, build_benchmark
from zscir.cli.config import benchmark_configs
from zscir.cli.run import build_benchmarks


def test_layout_gallery_is_every_image_and_queries_keep_their_lines(tmp_path):
    ids = make_set(tmp_path)
    (tmp_path / "images" / ".hidden.jpg").write_bytes(b"not listed")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    bench = build_benchmark("custom", str(tmp_path), "val")
    assert [r.image_id for r in bench.gallery] == ids
    assert [q.query_id for q in bench.queries] == ["1", "2", "3", "4"]  # line numbers
    assert bench.queries[0].reference.image_id == "shoes/0001.jpg"
    assert bench.queries[0].target_ids == ("shoes/0003.jpg", "shoes/0005.jpg")
    assert bench.queries[0].texts == ("is red with a lower heel",)


def test_scores_worked_out_by_hand(tmp_path):
    make_set(tmp_path)
    bench = build_benchmark("custom", str(tmp_path), "val")
    index = bench.gallery_index()
    gallery = torch.eye(len(bench.gallery))

    def e(image_id: str) -> torch.Tensor:
        return gallery[index[image_id]]

    q = bench.queries
    queries = torch.stack(
        [
            0.9 * e(q[0].target_ids[0]) + 0.8 * e(q[0].target_ids[1]),  # both targets at ranks 1, 2: AP 1
            0.9 * e("shoes/0001.jpg")
            + 0.8 * e("bags/0002.jpg")
            + 0.7 * e(q[1].target_ids[0]),  # rank 3: AP 1/3
            # second target at rank 1, first at rank 3: AP = (1/1 + 2/3) / 2; recall@1 misses
            0.9 * e(q[2].target_ids[1]) + 0.8 * e("shoes/0001.jpg") + 0.7 * e(q[2].target_ids[0]),
            0.9 * e(q[3].target_ids[0]),  # rank 1
        ]
    )
    m = bench.score(queries, gallery)
    assert m["map@5"] == pytest.approx(100 * (1 + 1 / 3 + (1 + 2 / 3) / 2 + 1) / 4)
    assert m["map@50"] == pytest.approx(m["map@5"])
    assert m["recall@1"] == pytest.approx(50.0)
    assert m["recall@5"] == pytest.approx(100.0)
    assert list(m) == list(bench.metric_names)


def test_exclude_reference_removes_it_from_its_own_ranking(tmp_path):
    make_set(tmp_path)
    kept = build_benchmark("custom", str(tmp_path), "val")
    removed = build_benchmark("custom", str(tmp_path), "val", exclude_reference=True)
    index = kept.gallery_index()
    gallery = torch.eye(len(kept.gallery))
    # every query: its reference first, then its first target
    queries = torch.stack(
        [gallery[index[q.reference.image_id]] + 0.5 * gallery[index[q.target_ids[0]]] for q in kept.queries]
    )
    assert kept.score(queries, gallery)["recall@1"] == 0.0
    assert removed.score(queries, gallery)["recall@1"] == 100.0


def test_every_bad_line_is_reported_with_its_number(tmp_path):
    ids = make_set(tmp_path)
    lines = [
        json.dumps({"reference": ids[0], "caption": "ok", "targets": [ids[1]]}),
        "{not json",
        json.dumps({"reference": ids[0], "caption": "no targets"}),
        json.dumps({"reference": "missing.jpg", "caption": "x", "targets": [ids[1]]}),
        "",
        "# a comment",
        json.dumps({"reference": ids[0], "caption": "x", "targets": ["elsewhere/1.jpg"]}),
        json.dumps({"reference": ids[0], "caption": 3, "targets": [ids[1]]}),
    ]
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError) as err:
        build_benchmark("custom", str(tmp_path), "val")
    message = str(err.value)
    assert "5 bad line(s)" in message
    for number in (2, 3, 4, 7, 8):
        assert f"val.jsonl:{number}:" in message
    assert "val.jsonl:1:" not in message
    assert "missing key(s) ['targets']" in message
    assert "missing.jpg" in message
    assert "elsewhere/1.jpg" in message


def test_gallery_list_restricts_the_gallery(tmp_path):
    ids = make_set(tmp_path)
    (tmp_path / "gallery.txt").write_text("\n".join(ids[:6]) + "\n")
    (tmp_path / "val.jsonl").write_text(
        json.dumps({"reference": ids[9], "caption": "x", "targets": [ids[1]]}) + "\n"
    )
    bench = build_benchmark("custom", str(tmp_path), "val", gallery="gallery.txt")
    assert [r.image_id for r in bench.gallery] == ids[:6]
    assert bench.queries[0].reference.image_id == ids[9]  # a reference need not be in the gallery
    (tmp_path / "val.jsonl").write_text(
        json.dumps({"reference": ids[0], "caption": "x", "targets": [ids[8]]}) + "\n"
    )
    with pytest.raises(
        AnnotationError, match=re.escape(f"val.jsonl:1: target(s) ['{ids[8]}'] are not in the gallery")
    ):
        build_benchmark("custom", str(tmp_path), "val", gallery="gallery.txt")
    (tmp_path / "gallery.txt").write_text(f"{ids[0]}\nnope.jpg\n")
    with pytest.raises(AnnotationError, match=r"gallery.txt:2: no image"):
        build_benchmark("custom", str(tmp_path), "val", gallery="gallery.txt")


def test_missing_files_and_empty_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "val.jsonl").write_text("")
    with pytest.raises(DatasetLayoutError, match="holds no image"):
        build_benchmark("custom", str(tmp_path), "val")
    write_image(tmp_path / "images" / "a.jpg", 0)
    with pytest.raises(AnnotationError, match="holds no query"):
        build_benchmark("custom", str(tmp_path), "val")
    with pytest.raises(DatasetLayoutError, match="no annotation file"):
        build_benchmark("custom", str(tmp_path), "test")


def test_benchmark_custom_config_builds_it(compose, tmp_path):
    make_set(tmp_path / "my_set")
    cfg = compose(
        "eval",
        ["benchmark=custom", f"benchmark.root={tmp_path / 'my_set'}", "benchmark.exclude_reference=true"],
    )
    (bench,) = build_benchmarks(benchmark_configs(cfg))
    assert bench.kind == "custom"
    assert bench.excludes_reference
    assert len(bench.queries) == 4
    cfg = compose("train", ["eval_benchmarks=[custom]", f"benchmarks.custom.root={tmp_path / 'my_set'}"])
    (bench,) = build_benchmarks(benchmark_configs(cfg))
    assert len(bench.gallery) == 10
