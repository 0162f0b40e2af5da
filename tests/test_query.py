"""zscir-query end to end on the tiny backbone and generated images: results as JSON/CSV/PNG grids, the
gallery cache reused until a file changes, and clear errors for bad inputs."""

from __future__ import annotations

import csv
import json
import logging

import pytest
from PIL import Image

from custom_set import make_set, write_image
from zscir.cli.query import main
from zscir.evaluation.visualize import grid_size


@pytest.fixture
def images(tmp_path):
    ids = make_set(tmp_path / "set")
    return tmp_path / "set" / "images", ids


def test_query_writes_results_and_grids(images, tmp_path):
    folder, ids = images
    out = tmp_path / "out"
    code = main(
        [
            "--query", str(folder / ids[3]), "same but red",
            "--query", str(folder / ids[7]), "smaller",
            "--gallery", str(folder),
            "--method", "image_only", "--backbone", "tiny", "--device", "cpu",
            "-k", "4", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["gallery_size"] == len(ids)
    assert result["k"] == 4
    # image_only: the query is the reference's own image feature, so the reference (in the gallery) is first
    for query, reference in zip(result["queries"], (ids[3], ids[7])):
        assert query["results"][0]["image"] == reference
        assert query["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        scores = [r["score"] for r in query["results"]]
        assert scores == sorted(scores, reverse=True)
        assert [r["rank"] for r in query["results"]] == [1, 2, 3, 4]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert rows[0]["image"] == ids[3]
    assert rows[0]["text"] == "same but red"
    grids = sorted((out / "grids").glob("*.png"))
    assert len(grids) == 2
    assert Image.open(grids[0]).size == grid_size(4, labelled=False)


def test_gallery_cache_reused_until_the_folder_changes(images, tmp_path, caplog):
    folder, ids = images
    args = [
        "--query",
        str(folder / ids[0]),
        "x",
        "--gallery",
        str(folder),
        "--method",
        "sum",
        "--backbone",
        "tiny",
    ]
    args += ["--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--no-grid"]
    with caplog.at_level(logging.INFO, logger="zscir"):
        assert main([*args, "--out", str(tmp_path / "a")]) == 0
        assert "loaded from" not in caplog.text
        caplog.clear()
        assert main([*args, "--out", str(tmp_path / "b")]) == 0
        assert "loaded from" in caplog.text
        caplog.clear()
        write_image(folder / "new" / "extra.jpg", 123)
        assert main([*args, "--out", str(tmp_path / "c")]) == 0
        assert "loaded from" not in caplog.text
    assert json.loads((tmp_path / "c/results.json").read_text())["gallery_size"] == len(ids) + 1
    before = json.loads((tmp_path / "a/results.json").read_text())["queries"]
    again = json.loads((tmp_path / "b/results.json").read_text())["queries"]
    assert before == again


def test_gallery_list_and_queries_file(images, tmp_path):
    _, ids = images
    (tmp_path / "gallery.txt").write_text("".join(f"set/images/{i}\n" for i in ids[:5]))
    (tmp_path / "queries.jsonl").write_text(
        json.dumps({"reference": f"set/images/{ids[1]}", "caption": "x"}) + "\n"
    )
    out = tmp_path / "out"
    args = ["--queries", str(tmp_path / "queries.jsonl"), "--gallery-list", str(tmp_path / "gallery.txt")]
    assert (
        main(
            [
                *args,
                "--method",
                "image_only",
                "--backbone",
                "tiny",
                "--device",
                "cpu",
                "--no-cache",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "results.json").read_text())
    assert result["gallery_size"] == 5
    assert result["queries"][0]["results"][0]["image"] == f"set/images/{ids[1]}"


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_clear_errors(images, tmp_path, capsys):
    folder, ids = images
    base = [
        "--method",
        "sum",
        "--backbone",
        "tiny",
        "--device",
        "cpu",
        "--no-cache",
        "--out",
        str(tmp_path / "o"),
    ]
    query = ["--query", str(folder / ids[0]), "x"]
    (tmp_path / "empty").mkdir()
    assert "holds no image" in _error(capsys, [*query, "--gallery", str(tmp_path / "empty"), *base])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    message = _error(capsys, ["--query", str(tmp_path / "broken.jpg"), "x", "--gallery", str(folder), *base])
    assert "cannot decode image" in message
    assert "broken.jpg" in message
    (folder / "zz_broken.png").write_bytes(b"not an image either")
    message = _error(capsys, [*query, "--gallery", str(folder), *base])
    assert "zz_broken.png" in message
    assert "--gallery-list" in message
    (folder / "zz_broken.png").unlink()
    lincir = ["--method", "lincir", "--backbone", "tiny", "--device", "cpu", "--no-cache"]
    message = _error(
        capsys, [*query, "--gallery", str(folder), *lincir, "--template", "a photo of {caption}"]
    )
    assert "has no '$' slot" in message
    assert "say what retrieves" in _error(capsys, [*query, "--gallery", str(folder)])
    assert "no query" in _error(capsys, ["--gallery", str(folder), *base])
    assert "unknown method" in _error(
        capsys, [*query, "--gallery", str(folder), "--method", "nope", "--backbone", "tiny"]
    )
