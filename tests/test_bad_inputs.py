"""Every bad input gets an error that names the problem and the fix, or — where users want it — a logged and
counted skip. One test (or parametrized case) per input of the reliability issue; see RELIABILITY.md."""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import math
import shutil
import tarfile
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from reliability_helpers import checkpoint, loss_trajectory
from zscir.backbones import build_encoder
from zscir.benchmarks import build_benchmark
from zscir.benchmarks.base import AnnotationError, DatasetLayoutError, ImageLoadError, load_rgb
from zscir.cli.callbacks import AtomicCheckpointIO, NonFiniteLossError
from zscir.cli.evaluate import load_checkpoint
from zscir.cli.outputs import write_run_info
from zscir.cli.run import build_loggers
from zscir.cli.train import train
from zscir.data.corpora import load_image_caption_corpus, load_text_corpus
from zscir.methods import build_method
from zscir.methods.clip_pretrain import CLIPPretrain
from zscir.utils.io import atomic_write, atomic_write_json

TINY = {"name": "tiny", "kind": "open_clip", "model": "tiny", "init_seed": 0}


@pytest.fixture(autouse=True)
def _restore_determinism_flag():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


# ---- dataset layout -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cirr", "circo"])
def test_wrong_benchmark_root_names_the_root_and_what_belongs_there(tmp_path, kind):
    root = tmp_path / "not_the_dataset"
    root.mkdir()
    with pytest.raises(DatasetLayoutError) as err:
        build_benchmark(kind, root, "val")
    message = str(err.value)
    assert str(root) in message
    assert "annotations" in message or "captions" in message  # the files the layout needs
    assert "http" in message  # where to get the dataset


def test_wrong_training_corpus_path_names_the_path_and_the_format(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"no tar shards found for .*nowhere(.|\n)*webdataset"):
        load_image_caption_corpus(tmp_path / "nowhere")
    with pytest.raises(DatasetLayoutError, match=r"captions\.txt does not exist"):
        load_text_corpus(tmp_path / "captions.txt")


@pytest.fixture
def cirr_copy(small_world: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_world / "synthetic" / "cirr", tmp_path / "cirr"))


def test_missing_annotation_file_is_named(cirr_copy):
    captions = cirr_copy / "cirr" / "captions" / "cap.rc2.val.json"
    captions.unlink()
    with pytest.raises(DatasetLayoutError, match=r"cap\.rc2\.val\.json"):
        build_benchmark("cirr", cirr_copy, "val")


@pytest.mark.parametrize("key", ["caption", "reference"])
def test_annotation_with_a_missing_key_names_the_key_and_the_file(cirr_copy, key):
    captions = cirr_copy / "cirr" / "captions" / "cap.rc2.val.json"
    records = json.loads(captions.read_text())
    del records[3][key]
    captions.write_text(json.dumps(records))
    with pytest.raises(AnnotationError) as err:
        build_benchmark("cirr", cirr_copy, "val")
    assert repr(key) in str(err.value)
    assert "cap.rc2.val.json" in str(err.value)


# ---- images ---------------------------------------------------------------------------------------------
def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


NOISE_PNG = _png_bytes(
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
)


@pytest.mark.parametrize(
    ("problem", "content", "match"),
    [
        ("missing", None, "missing"),
        ("truncated", NOISE_PNG[: len(NOISE_PNG) // 2], "cannot decode"),
        ("not an image", b"<html>404 Not Found</html>", "cannot decode"),
        ("empty file", b"", "cannot decode"),
    ],
)
def test_unreadable_benchmark_image_is_an_error_naming_the_file(tmp_path, problem, content, match):
    path = tmp_path / "img 1.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=match) as err:
        load_rgb(path)
    assert str(path) in str(err.value)


def _mode_images(tmp_path: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """An image per awkward mode, each a flat colour, and the RGB colour it must load as."""
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    cases = {
        "RGBA": (red.convert("RGBA"), "PNG", (255, 0, 0)),
        "P": (red.convert("P"), "PNG", (255, 0, 0)),
        "L": (Image.new("L", (16, 16), 100), "PNG", (100, 100, 100)),
        "LA": (Image.new("LA", (16, 16), (100, 255)), "PNG", (100, 100, 100)),
        "1": (Image.new("1", (16, 16), 1), "PNG", (255, 255, 255)),
        "CMYK": (Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        # 16-bit greyscale at half range must be mid grey, not clipped to white by PIL's convert
        "I;16": (Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)), "PNG", (128, 128, 128)),
    }
    out = {}
    for mode, (image, fmt, rgb) in cases.items():
        path = tmp_path / f"{mode.replace(';', '_')}.{fmt.lower()}"
        image.save(path, format=fmt)
        assert Image.open(path).mode == mode  # the file really is in that mode
        out[mode] = (path, rgb)
    return out


def test_images_of_every_mode_load_as_the_right_rgb(tmp_path):
    for mode, (path, rgb) in _mode_images(tmp_path).items():
        image = load_rgb(path)
        assert image.mode == "RGB", mode
        pixel = np.asarray(image)[8, 8].astype(int)
        assert np.abs(pixel - np.array(rgb)).max() <= 3, (mode, pixel, rgb)  # JPEG rounding


def _shard(path: Path, samples: list[tuple[str, bytes, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for name, data in ((f"{key}.png", image), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.slow
def test_corrupt_training_images_are_skipped_counted_and_logged(compose, tmp_path, caplog):
    rng = np.random.default_rng(0)
    good = [
        (
            f"{i:04d}",
            _png_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))),
            f"shape {i}",
        )
        for i in range(29)
    ]
    bad = [
        ("bad_truncated", good[0][1][: len(good[0][1]) // 2], "a truncated png"),
        ("bad_html", b"<html>error</html>", "not an image"),
        ("bad_empty", b"", "an empty file"),
    ]
    empty_caption = [("no_caption", good[1][1], "   ")]
    shard = _shard(tmp_path / "corpus" / "shard-00000.tar", good + bad + empty_caption)
    with caplog.at_level(logging.WARNING):
        train(
            compose(
                "train",
                [
                    "experiment=tiny_synthetic_clip",
                    "trainer.precision=32-true",
                    "trainer.max_epochs=1",
                    "trainer.log_every_n_steps=1",
                    f"data.path={shard.parent}",
                    "data.batch_size=8",  # 32 samples with a caption: 4 full batches, every sample seen
                    "eval_benchmarks=[]",
                ],
            )
        )
    with open(tmp_path / "run" / "csv" / "version_0" / "metrics.csv", newline="") as f:
        skipped = [float(r["train/skipped_samples"]) for r in csv.DictReader(f) if r["train/skipped_samples"]]
    assert skipped[-1] == len(bad)  # cumulative count, logged as train/skipped_samples
    assert len(loss_trajectory(tmp_path / "run")) == 4  # training went on
    text = caplog.text
    assert all(f"skipping sample {key}" in text for key, _, _ in bad)  # each one named
    assert "dropped 1 of 33 samples with an empty caption" in text


def test_a_batch_with_no_readable_image_is_an_error(tmp_path):
    from zscir.data.corpora import collate_skip_none

    with pytest.raises(ImageLoadError, match="none of the 4 images"):
        collate_skip_none([None] * 4)


# ---- captions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["tiny", "tiny_hf"])
def test_empty_and_overlong_captions_encode_with_the_end_token_kept(backbone):
    kind = "open_clip" if backbone == "tiny" else "hf_clip"
    encoder = build_encoder(kind=kind, model="tiny")
    long = "a small red cube that sits to the left of a large blue sphere " * 20
    ids = encoder.tokenize(["", long])
    eot = int(encoder.tokenize(["x"])[0].max())  # the end-of-text id is the largest CLIP BPE id
    assert ids.shape == (2, encoder.context_length)
    assert ids[0, 1] == eot  # empty caption: start, end, padding
    assert (ids[1] != 0).all()  # the long one fills the context ...
    assert ids[1, -1] == eot  # ... truncated with the end token kept (the text feature is taken there)
    with torch.no_grad():
        feats = encoder.encode_text(ids)
    assert torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])


# ---- configuration ------------------------------------------------------------------------------------------
def test_typo_in_a_trainer_option_suggests_the_right_name(compose):
    from zscir.cli.config import validate_config

    with pytest.raises(ValueError, match=r"'max_epoch' \(did you mean 'max_epochs'\?\)"):
        validate_config(compose("train", ["+trainer.max_epoch=3"]), "train")


def test_typo_in_a_checkpoint_option_or_group_name_is_named(compose):
    from zscir.cli.config import validate_config

    with pytest.raises(Exception, match="every_n_train_step"):
        validate_config(compose("train", ["+checkpoint.every_n_train_step=5"]), "train")
    with pytest.raises(Exception, match="methd"):
        compose("train", ["methd=sum"])


# ---- checkpoints of another method / backbone --------------------------------------------------------------
def _checkpoint_file(tmp_path: Path, method: str, backbone: dict) -> Path:
    model = build_method(backbone, {"kind": method})
    ckpt = {"state_dict": model.state_dict(), "pytorch-lightning_version": lightning.__version__}
    model.on_save_checkpoint(ckpt)
    path = tmp_path / f"{method}.ckpt"
    torch.save(ckpt, path)
    return path


def test_checkpoint_of_another_method_names_both_and_the_fix(tmp_path):
    path = _checkpoint_file(tmp_path, "clip_pretrain", TINY)
    with pytest.raises(ValueError, match=r"method 'clip_pretrain', not 'text_only'.*method=clip_pretrain"):
        load_checkpoint(build_method(TINY, {"kind": "text_only"}), path)


def test_checkpoint_of_another_backbone_names_both_and_the_fix(tmp_path):
    path = _checkpoint_file(tmp_path, "clip_pretrain", TINY)
    other = {**TINY, "init_seed": 1}
    with pytest.raises(ValueError, match=r"backbone 'tiny'.*fingerprint.*pass the backbone config"):
        load_checkpoint(build_method(other, {"kind": "clip_pretrain"}), path)
    load_checkpoint(build_method(TINY, {"kind": "clip_pretrain"}), path)  # the right one loads


def test_resuming_training_from_another_backbones_checkpoint_is_refused(compose, tmp_path):
    path = _checkpoint_file(tmp_path, "clip_pretrain", TINY)
    cfg = compose(
        "train",
        ["experiment=tiny_synthetic_clip", "backbone.init_seed=1", f"resume={path}", "eval_benchmarks=[]"],
    )
    with pytest.raises(ValueError, match=r"trained on backbone 'tiny'.*fingerprint"):
        train(cfg)


# ---- NaN / Inf ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("poison", ["nan_loss", "inf_gradient"])
def test_non_finite_loss_or_gradient_stops_with_step_and_batch_and_keeps_the_good_checkpoint(
    compose, tmp_path, monkeypatch, poison
):
    original = CLIPPretrain.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        if self.global_step == 2:
            if poison == "nan_loss":
                return loss * float("nan")
            self.logit_scale.register_hook(lambda g: g * float("inf"))
        return loss

    monkeypatch.setattr(CLIPPretrain, "training_step", poisoned)
    cfg = compose(
        "train",
        [
            "experiment=tiny_synthetic_clip",
            "trainer.precision=32-true",
            "trainer.max_epochs=1",
            "data.max_samples=64",
            "data.batch_size=16",
            "checkpoint.every_n_train_steps=2",  # the last one before the poisoned step 2 is at step 2
            "eval_benchmarks=[]",
        ],
    )
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    assert "global step 2 (epoch 0, batch 2 of the epoch)" in message
    assert "dataset indices of the batch: [" in message
    assert (
        "loss is nan"
        if poison == "nan_loss"
        else "non-finite gradients in 1 parameter(s), e.g. ['logit_scale']"
    ) in message
    assert "last.ckpt holds the last good weights" in message
    last = checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---- a full disk ------------------------------------------------------------------------------------------------
def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_old_file_removes_the_temp_file_and_names_the_path(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"recall@1": 1.0})

    def half_then_full(f: io.BufferedWriter) -> None:
        f.write(b'{"recall@1": 2.')
        _disk_full()

    with pytest.raises(OSError, match=r"could not write .*metrics\.json.*disk is full") as err:
        atomic_write(target, half_then_full)
    assert err.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"recall@1": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_full_disk_at_fsync_when_writing_results_and_checkpoints(compose, tmp_path, monkeypatch):
    # file systems with delayed allocation report ENOSPC only at fsync/close
    run = tmp_path / "run"
    cfg = compose("train", ["method=sum", "backbone=tiny"])
    write_run_info(run, cfg, "train", {"recall@1": 1.0})
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, run / "checkpoints" / "last.ckpt")
    monkeypatch.setattr("zscir.utils.io.os.fsync", _disk_full)
    with pytest.raises(OSError, match=r"could not write .*run_info\.json.*disk is full"):
        write_run_info(run, cfg, "train", {"recall@1": 2.0})
    with pytest.raises(OSError, match=r"could not write .*last\.ckpt.*disk is full"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, run / "checkpoints" / "last.ckpt")
    monkeypatch.undo()
    assert json.loads((run / "metrics.json").read_text()) == {"recall@1": 1.0}
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert not list(run.rglob("*.tmp"))


# ---- W&B unreachable ----------------------------------------------------------------------------------------
def test_wandb_unreachable_at_start_costs_a_warning_not_the_run(compose, tmp_path, monkeypatch, caplog):
    import wandb

    def unreachable(*args: object, **kwargs: object) -> None:
        raise wandb.errors.CommError("Network error (ConnectionError): api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", unreachable)
    cfg = compose(
        "train", ["method=sum", "backbone=tiny", "logger=wandb", "eval_benchmarks=[synthetic_circo]"]
    )
    with caplog.at_level(logging.WARNING):
        assert build_loggers(cfg) == []
        metrics = train(cfg)
    assert "logger wandb could not start (CommError" in caplog.text
    assert math.isfinite(metrics["synthetic_circo/map@10"])
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_a_logger_failing_mid_run_is_disabled_with_a_warning(compose, tmp_path, monkeypatch, caplog):
    calls = []

    def connection_lost(self: CSVLogger, *args: object, **kwargs: object) -> None:
        calls.append(1)
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(CSVLogger, "log_metrics", connection_lost)
    cfg = compose("train", ["method=sum", "backbone=tiny", "eval_benchmarks=[synthetic_circo]"])
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert "logger csv failed in log_metrics (ConnectionError" in caplog.text
    assert len(calls) == 1  # disabled after the first failure
    assert (tmp_path / "run" / "metrics.json").is_file()
