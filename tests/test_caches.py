"""Every on-disk cache notices that its input changed: gallery features (image files rewritten in place,
even with the same size and modification time), the backbone weights fingerprint (a same-second,
same-size rewrite), the shard index of image–caption corpora, and the synthetic-world backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from benchmark_fixtures import CIRR_VAL_IMAGES, make_cirr
from zscir.cli.common import compose_config
from zscir.cli.evaluate import evaluate


def _rewrite_keeping_stamp(path: Path, data: bytes) -> None:
    """Overwrite ``path`` with ``data`` (same length) and put its modification time back, as
    ``cp -p``/``rsync -t``/``tar x`` of a repaired download do."""
    before = path.stat()
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


# ---- gallery features --------------------------------------------------------------------------------
@pytest.fixture
def cirr_root(tmp_path: Path) -> Path:
    """The miniature CIRR with every val image re-saved as an uncompressed 20x16 RGB PNG: all files have
    the same size, so swapping two images' content keeps every file's size."""
    root = make_cirr(tmp_path / "data" / "CIRR", layout="readme")
    for name in CIRR_VAL_IMAGES:
        path = root / "img_raw" / "dev" / f"{name}.png"
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        rgb.save(path, format="PNG", compress_level=0)
    return root


def _eval_cirr(tmp_path: Path, run: str, *overrides: str) -> dict[str, float]:
    cfg = compose_config(
        "eval",
        [
            "method=image_only",
            "backbone=tiny",
            "benchmark=cirr",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'outputs'}",
            f"paths.run_dir={tmp_path / run}",
            "eval.num_workers=0",
            "eval.batch_size=4",
            "trainer.enable_progress_bar=false",
            *overrides,
        ],
    )
    return evaluate(cfg)


def test_gallery_images_replaced_in_place_are_re_encoded(cirr_root, tmp_path):
    first = _eval_cirr(tmp_path, "a")
    cache = tmp_path / "outputs" / "cache" / "gallery"
    assert len(list(cache.glob("*.pt"))) == 1
    # the targets of queries 305 and 17 become copies of their reference images: with image-only queries
    # (query = the reference's features) each target then ties the reference, which CIRR leaves out, so
    # both queries are hits at rank 1
    images = cirr_root / "img_raw" / "dev"
    for target, reference in (("dev-2-0-img1", "dev-2-0-img0"), ("dev-11-0-img0", "dev-3-0-img0")):
        _rewrite_keeping_stamp(images / f"{target}.png", (images / f"{reference}.png").read_bytes())
    second = _eval_cirr(tmp_path, "b")
    uncached = _eval_cirr(tmp_path, "c", "eval.cache_gallery=false")
    assert second == pytest.approx(uncached, abs=1e-9)
    assert len(list(cache.glob("*.pt"))) == 2  # re-encoded under a new key
    assert second["recall@1"] >= 40.0  # 2 of 5 queries at least, by construction
    assert second["recall@1"] > first["recall@1"]
    # unchanged files: the entry is reused again (no third entry)
    assert _eval_cirr(tmp_path, "d") == pytest.approx(second, abs=1e-9)
    assert len(list(cache.glob("*.pt"))) == 2
