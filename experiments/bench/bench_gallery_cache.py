"""``gallery_cache``: obtaining the gallery features of an unchanged gallery in a *new process* (a second
``zscir-eval``/training run on the same backbone) — from the on-disk cache — vs encoding every image
again. Within one training run the official trainers encode the CIRR val gallery once and reuse it, and
so does zscir; the gain is across runs, where every official script (``validate.py``,
``generate_test_submission.py``) encodes the gallery again. Both sides are zscir's own gallery stage
(``RetrievalMethod._prepare_galleries``), one warm-up call each, order-swapped rounds."""

from __future__ import annotations

import tempfile
from pathlib import Path

from experiments.bench.common import compare, timed_row
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
        cached = build_method({"kind": "open_clip", "model": "tiny"}, {"kind": "image_only"})
        cached.attach_benchmarks([bench], batch_size=batch_size, cache=GalleryCache(Path(tmp) / "cache"))
        fresh = build_method({"kind": "open_clip", "model": "tiny"}, {"kind": "image_only"})
        fresh.attach_benchmarks([bench], batch_size=batch_size, cache=None)
        cached._prepare_galleries()  # the first evaluation fills the cache
        timing = compare(cached._prepare_galleries, fresh._prepare_galleries, reps=reps, ours_repeat=20)
        return {
            "gallery_cache": timed_row(
                timing,
                "s",
                baseline_is="zscir's own gallery stage encoding every image again (a new run without the cache)",
                equal=None,
                size=f"{len(bench.gallery)} images, tiny CLIP 64x64",
            )
        }
