"""``gallery_cache``: obtaining the gallery features of an unchanged gallery a second time — from the
on-disk cache — vs re-encoding every image, as every evaluation of the official code does. Measured on
the gallery stage of the shared evaluation (``RetrievalMethod._prepare_galleries``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from experiments.bench.common import interleaved, row
from zscir.benchmarks import build_benchmark
from zscir.data.synthetic import SynthConfig, generate_world
from zscir.methods import build_method
from zscir.retrieval.cache import GalleryCache


def run(pool: int = 2000, reps: int = 5, batch_size: int = 128) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_world(
            Path(tmp) / "w",
            SynthConfig(
                corpus_train=0,
                corpus_val=0,
                text_captions=0,
                cirr_val_sets=1,
                cirr_test_sets=1,
                circo_val=10,
                circo_test=1,
                circo_pool=pool,
            ),
        )
        bench = build_benchmark("circo", root / "circo", "val")
        cached = build_method({"kind": "open_clip", "model": "tiny"}, {"name": "image_only"})
        cached.attach_benchmarks([bench], batch_size=batch_size, cache=GalleryCache(Path(tmp) / "cache"))
        fresh = build_method({"kind": "open_clip", "model": "tiny"}, {"name": "image_only"})
        fresh.attach_benchmarks([bench], batch_size=batch_size, cache=None)
        cached._prepare_galleries()  # the first evaluation fills the cache
        t_ours, t_base = interleaved(cached._prepare_galleries, fresh._prepare_galleries, reps=reps, warmup=0)
        return {
            "gallery_cache": row(
                t_ours, t_base, "s", False, size=f"{len(bench.gallery)} images, tiny CLIP 64x64"
            )
        }
