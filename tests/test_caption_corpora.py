"""Image–caption corpora as a folder of images with one caption file each (PLI's ImageNet layout) and as jsonl."""

import json

import pytest
import torch
from PIL import Image

from zscir.benchmarks.base import DatasetLayoutError
from zscir.data.corpora import load_caption_folder, load_caption_jsonl, load_captioned_images
from zscir.data.loaders import DataConfig, build_train_loader


def write_image(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


@pytest.fixture
def imagenet_layout(tmp_path):
    """<root>/test/<class>/<name>.JPEG + <root>/captions/<name>.txt, one image without a caption."""
    root = tmp_path / "ImageNet1K"
    for i, (cls, colour) in enumerate([("n01", "red"), ("n01", "blue"), ("n02", "green"), ("n02", "white")]):
        write_image(root / "test" / cls / f"{cls}_{i}.JPEG", colour)
        if i != 3:
            (root / "captions").mkdir(parents=True, exist_ok=True)
            (root / "captions" / f"{cls}_{i}.txt").write_text(f"a {colour} square\n")
    return root


def test_folder_with_a_separate_captions_folder(imagenet_layout):
    samples = load_caption_folder(imagenet_layout / "test", imagenet_layout / "captions")
    assert [s.caption for s in samples] == ["a red square", "a blue square", "a green square"]
    assert [s.key for s in samples] == ["n01/n01_0", "n01/n01_1", "n02/n02_2"]
    assert samples[2].image.path == imagenet_layout / "test" / "n02" / "n02_2.JPEG"


def test_folder_with_captions_beside_the_images(tmp_path):
    write_image(tmp_path / "a" / "x.png", "red")
    (tmp_path / "a" / "x.txt").write_text("  a red square ")
    write_image(tmp_path / "b" / "y.jpg", "blue")
    samples = load_caption_folder(tmp_path)
    assert [(s.key, s.caption) for s in samples] == [("a/x", "a red square")]


def test_folder_without_any_caption_names_the_expected_files(tmp_path):
    write_image(tmp_path / "x.jpg", "red")
    with pytest.raises(DatasetLayoutError, match=r"<stem>\.txt"):
        load_caption_folder(tmp_path)


def test_jsonl_with_relative_and_absolute_paths(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", "red")
    write_image(tmp_path / "elsewhere" / "b.jpg", "blue")
    lines = [
        {"image": "images/a.jpg", "caption": "a red square"},
        {"image": str(tmp_path / "elsewhere" / "b.jpg"), "caption": "blue"},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    samples = load_caption_jsonl(tmp_path / "train.jsonl")
    assert [s.image.path for s in samples] == [
        tmp_path / "images" / "a.jpg",
        tmp_path / "elsewhere" / "b.jpg",
    ]
    assert [s.caption for s in samples] == ["a red square", "blue"]
    moved = load_caption_jsonl(tmp_path / "train.jsonl", image_root=tmp_path / "root")
    assert moved[0].image.path == tmp_path / "root" / "images" / "a.jpg"


def test_jsonl_bad_line_is_located(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n{"img": "b.jpg"}\n')
    with pytest.raises(DatasetLayoutError, match=r"c\.jsonl:2"):
        load_caption_jsonl(tmp_path / "c.jsonl")


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="shards, folder, jsonl or images"):
        load_captioned_images("parquet", tmp_path)


def test_train_loader_reads_the_folder_layout(imagenet_layout):
    cfg = DataConfig(
        path=str(imagenet_layout / "test"),
        format="folder",
        captions_dir=str(imagenet_layout / "captions"),
        batch_size=3,
        num_workers=0,
        shuffle=False,
    )
    transform = lambda im: torch.tensor(im.getpixel((0, 0)), dtype=torch.float)  # noqa: E731
    batch = next(iter(build_train_loader(cfg, transform)))
    assert batch["caption"] == ["a red square", "a blue square", "a green square"]
    assert batch["pixels"].argmax(dim=1).tolist() == [0, 2, 1]  # red, blue, green (JPEG: not exact values)
    assert batch["skipped"] == 0
