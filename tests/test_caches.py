"""Every on-disk cache notices that its input changed: gallery features (image files rewritten in place,
even with the same size and modification time), the backbone weights fingerprint (a same-second,
same-size rewrite), the shard index of image–caption corpora, and the synthetic-world backbone."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmark_fixtures import CIRR_VAL_IMAGES, make_cirr
from zscir.backbones import backbone_fingerprint
from zscir.cli.config import compose_config
from zscir.cli.evaluate import evaluate, load_checkpoint
from zscir.cli.provision import ensure_backbone, ensure_synthetic_world
from zscir.data.corpora import load_image_caption_corpus
from zscir.data.keyword_cache import KeywordCache, KeywordSettings
from zscir.data.synthetic import SynthConfig, generate_world
from zscir.data.text_corpora import expand_text_sources
from zscir.methods import build_method

TINY = {"kind": "open_clip", "model": "tiny"}


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


def test_gallery_cache_misses_on_another_precision_transform_or_weights_and_hits_unchanged(
    cirr_root, tmp_path
):
    """bf16 and fp32 features differ, and so do those of another preprocessing or other weights: each is a
    new entry; the same config again reuses its entry."""
    cache = tmp_path / "outputs" / "cache" / "gallery"
    weights = tmp_path / "other_tiny.pt"  # other weights of the same architecture
    torch.save(build_method({**TINY, "init_seed": 1}, {"kind": "sum"}).encoder.model.state_dict(), weights)
    runs = {
        "fp32": ["trainer.precision=32-true"],
        "bf16": ["trainer.precision=bf16-mixed"],
        "targetpad": ["backbone.transform=targetpad"],
        "weights": [f"backbone.checkpoint={weights}"],
    }
    entries: dict[str, Path] = {}
    for run, overrides in runs.items():
        before = set(cache.glob("*.pt"))
        _eval_cirr(tmp_path, run, *overrides)
        (new,) = set(cache.glob("*.pt")) - before  # a miss: encoded and stored under a key of its own
        entries[run] = new
    _eval_cirr(tmp_path, "fp32_again", "trainer.precision=32-true")
    _eval_cirr(tmp_path, "bf16_again", "trainer.precision=bf16-mixed")
    assert set(cache.glob("*.pt")) == set(entries.values())  # unchanged configs hit
    fp32, bf16 = (torch.load(entries[r], weights_only=True)["feats"] for r in ("fp32", "bf16"))
    assert not torch.equal(fp32, bf16)  # what a shared entry would have mixed up
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0)


# ---- backbone weights ----------------------------------------------------------------------------------
def test_backbone_fingerprint_notices_a_same_second_same_size_rewrite(tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"a" * 64)
    second = 1_700_000_000 * 10**9
    os.utime(weights, ns=(second, second + 100))
    config = {"kind": "open_clip", "model": "tiny", "checkpoint": str(weights)}
    before = backbone_fingerprint(config)
    weights.write_bytes(b"b" * 64)  # retrained weights: same size, written within the same second
    os.utime(weights, ns=(second, second + 200))
    assert backbone_fingerprint(config) != before


def test_checkpoint_weights_tag_notices_a_rewrite_that_keeps_size_and_mtime(tmp_path):
    method = build_method({"kind": "open_clip", "model": "tiny"}, {"kind": "sum"})
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": method.state_dict()}, path)
    load_checkpoint(method, path)
    before = method.weights_tag
    _rewrite_keeping_stamp(path, path.read_bytes())  # e.g. restored from a backup with cp -p
    load_checkpoint(method, path)
    assert method.weights_tag != before


def test_a_checkpoint_with_the_whole_second_fingerprint_of_earlier_versions_still_loads(tmp_path):
    weights = tmp_path / "tiny.pt"
    method = build_method({"kind": "open_clip", "model": "tiny"}, {"kind": "sum"})
    torch.save(method.encoder.model.state_dict(), weights)
    backbone = {"kind": "open_clip", "model": "tiny", "checkpoint": str(weights)}
    method = build_method(backbone, {"kind": "sum"})
    old = {"state_dict": {}, "zscir": {"backbone_fingerprint": backbone_fingerprint(backbone, True)}}
    method.on_load_checkpoint(old)  # accepted
    other = {"state_dict": {}, "zscir": {"backbone_fingerprint": "0123456789abcdef", "backbone": "x"}}
    with pytest.raises(ValueError, match="fingerprint"):
        method.on_load_checkpoint(other)


# ---- shard index ---------------------------------------------------------------------------------------
def _shard(path: Path, captions: dict[str, str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, caption in captions.items():
            for name, data in ((f"{key}.png", _png_bytes(key)), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return path


def _png_bytes(key: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (len(key) * 40 % 256, 0, 0)).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def test_shard_index_notices_a_shard_rewritten_with_the_same_size_and_mtime(tmp_path):
    shard = _shard(tmp_path / "shard-00000.tar", {"a": "a red circle", "b": "a blue cross"})
    first = {s.key: s.caption for s in load_image_caption_corpus(shard)}
    assert first == {"a": "a red circle", "b": "a blue cross"}
    assert (tmp_path / "shard-00000.tar.zscir-index.json").is_file()
    rewritten = _shard(tmp_path / "new.tar", {"a": "a blue cross", "b": "a red circle"}).read_bytes()
    _rewrite_keeping_stamp(shard, rewritten)
    again = {s.key: s.caption for s in load_image_caption_corpus(shard)}
    assert again == {"a": "a blue cross", "b": "a red circle"}


# ---- synthetic world and its backbone ------------------------------------------------------------------
TINY_WORLD = dict(
    corpus_train=16,
    corpus_val=4,
    text_captions=8,
    shard_size=16,
    cirr_val_sets=1,
    cirr_test_sets=1,
    circo_val=2,
    circo_test=1,
    circo_pool=4,
)


def _synthetic_config(tmp_path: Path, **synth: object) -> object:
    return compose_config(
        "eval",
        [
            "backbone=tiny_synthetic",
            "benchmark=synthetic_cirr",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'outputs'}",
            *(f"synth.{k}={v}" for k, v in {**TINY_WORLD, **synth}.items()),
        ],
    )


def test_a_world_generated_with_other_settings_is_regenerated(tmp_path):
    root = generate_world(tmp_path / "data" / "synthetic", SynthConfig(**TINY_WORLD))
    ensure_synthetic_world(_synthetic_config(tmp_path, corpus_train=8))
    assert json.loads((root / "world.json").read_text())["corpus_train"] == 8
    assert len(load_image_caption_corpus(root / "corpus" / "train")) == 8


def test_the_synthetic_backbone_is_retrained_when_the_world_it_was_trained_on_changed(tmp_path):
    trained: list[tuple[str, int]] = []

    def fake_train(recipe_cfg):  # stands in for training the recipe: records what it was asked to do
        trained.append((recipe_cfg.paths.run_dir, recipe_cfg.synth.seed))
        Path(recipe_cfg.method.export_backbone).parent.mkdir(parents=True, exist_ok=True)
        Path(recipe_cfg.method.export_backbone).write_text(f"weights for seed {recipe_cfg.synth.seed}")
        return {}

    ensure_backbone(_synthetic_config(tmp_path), fake_train)  # first use
    ensure_backbone(_synthetic_config(tmp_path), fake_train)  # reused
    assert [seed for _, seed in trained] == [0]
    ensure_backbone(
        _synthetic_config(tmp_path, seed=1), fake_train
    )  # another world: retrained, in another run dir
    assert [seed for _, seed in trained] == [0, 1]
    assert trained[1][0] != trained[0][0]
    ensure_backbone(_synthetic_config(tmp_path, seed=1), fake_train)
    assert len(trained) == 2
    # weights from elsewhere (no record of how they were made) are used as they are
    checkpoint = Path(_synthetic_config(tmp_path).backbone.checkpoint)
    Path(f"{checkpoint}.zscir-recipe.json").unlink()
    ensure_backbone(_synthetic_config(tmp_path, seed=2), fake_train)
    assert len(trained) == 2


# ---- LinCIR keyword cache ------------------------------------------------------------------------------
def test_keyword_cache_notices_a_caption_file_rewritten_with_the_same_size_and_mtime(tmp_path):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a red dog runs\na big cat\n")
    settings = KeywordSettings(context_length=32)
    first = KeywordCache(settings).get(expand_text_sources(corpus)[0])
    assert list(first.captions) == ["a red dog runs", "a big cat"]
    _rewrite_keeping_stamp(corpus, b"a big cat\na red dog runs\n")
    cache = KeywordCache(settings)
    again = cache.get(expand_text_sources(corpus)[0])
    assert [event for _, event in cache.events] == ["built"]
    assert list(again.captions) == ["a big cat", "a red dog runs"]
