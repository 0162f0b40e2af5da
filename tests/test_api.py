"""The Python API (zscir.api, exported from ``zscir``): the README example runs as written; queries and
gallery features equal the encoder's own computation; the gallery cache follows the files; runs load
without Hydra; a template without its ``$`` slot is refused before any encoding."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import zscir
from custom_set import make_set, write_image
from zscir.retrieval.search import normalize

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The python code block of the README's "Python API" section."""
    section = (REPO / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_set(tmp_path / "my_set")
    namespace: dict = {}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[:5]] == ["1", "2", "3", "4", "5"]
    assert namespace["indices"].shape == (1, 5)
    assert set(namespace["metrics"]) >= {"map@10", "recall@1", "recall@50"}
    assert len(list((tmp_path / "outputs/cache/gallery").glob("*.pt"))) == 1


def test_import_is_light_and_exports_the_api():
    code = (
        "import sys, zscir; assert 'torch' not in sys.modules, 'torch imported'; print(sorted(zscir.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("load_method", "load_run", "compose_queries", "encode_gallery", "retrieve", "evaluate"):
        assert name in out
    with pytest.raises(AttributeError):
        _ = zscir.no_such_name


def test_features_are_the_encoders_own(tmp_path):
    """sum: normalize(normalize(text) + w * normalize(image)) of the raw towers; gallery: the image tower."""
    method = zscir.load_method("sum", backbone="tiny", device="cpu", img_weight=0.75)
    enc = method.encoder
    files = [write_image(tmp_path / f"{i}.png", i) for i in range(3)]
    images = [Image.open(f).convert("RGB") for f in files]
    texts = ["is red", "has no sleeves", "at night"]
    with torch.no_grad():
        pixels = torch.stack([enc.image_transform(im) for im in images])
        expected_q = normalize(
            normalize(enc.encode_text(enc.tokenize(texts))) + 0.75 * normalize(enc.encode_image(pixels))
        )
        expected_g = normalize(enc.encode_image(pixels))
    got_q = zscir.compose_queries(method, images, texts, batch_size=2)  # two batches
    got_g = zscir.encode_gallery(method, files, batch_size=2, progress=False)
    torch.testing.assert_close(got_q, expected_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_g, expected_g, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        zscir.encode_gallery(method, images, progress=False), expected_g, atol=1e-5, rtol=0
    )
    # a text-only query: a blank reference, as the benchmarks give one
    blank = zscir.compose_queries(method, [None], ["is red"])
    with torch.no_grad():
        zero = torch.zeros(1, 3, enc.image_size, enc.image_size)
        ref = normalize(
            normalize(enc.encode_text(enc.tokenize(["is red"]))) + 0.75 * normalize(enc.encode_image(zero))
        )
    torch.testing.assert_close(blank, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one text per image"):
        zscir.compose_queries(method, images, texts[:2])


def test_gallery_cache_follows_the_files(tmp_path):
    method = zscir.load_method("image_only", backbone="tiny", device="cpu")
    files = [write_image(tmp_path / "g" / f"{i}.png", i) for i in range(4)]
    calls = []
    encode = method.encode_gallery

    def counting(pixels):
        calls.append(len(pixels))
        return encode(pixels)

    method.encode_gallery = counting
    cache = tmp_path / "cache"
    first = zscir.encode_gallery(method, files, cache_dir=cache, progress=False)
    again = zscir.encode_gallery(method, files, cache_dir=cache, progress=False)
    assert calls == [4]  # the second call read the cache
    torch.testing.assert_close(first, again)
    write_image(files[2], 99)  # the same file name, other pixels
    changed = zscir.encode_gallery(method, files, cache_dir=cache, progress=False)
    assert calls == [4, 4]
    assert not torch.allclose(changed[2], first[2])
    torch.testing.assert_close(changed[[0, 1, 3]], first[[0, 1, 3]])
    zscir.encode_gallery(method, files[:3], cache_dir=cache, progress=False)  # an image removed
    assert calls == [4, 4, 3]


def test_gallery_cache_keeps_autocast_features_apart(tmp_path):
    """Features encoded inside the caller's bf16 autocast differ from fp32 ones: each has its own entry."""
    method = zscir.load_method("image_only", backbone="tiny", device="cpu")
    files = [write_image(tmp_path / "g" / f"{i}.png", i) for i in range(3)]
    cache = tmp_path / "cache"
    fp32 = zscir.encode_gallery(method, files, cache_dir=cache, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = zscir.encode_gallery(method, files, cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.pt"))) == 2  # a miss, stored apart
    assert not torch.equal(bf16, fp32)
    torch.testing.assert_close(zscir.encode_gallery(method, files, cache_dir=cache, progress=False), fp32)
    assert len(list(cache.glob("*.pt"))) == 2  # the fp32 entry again: a hit


def test_retrieve_is_best_first_with_ties_to_the_lower_index():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    indices, scores = zscir.retrieve(torch.tensor([[1.0, 0.0]]), gallery, k=3)
    assert indices.tolist() == [[0, 2, 3]]
    torch.testing.assert_close(scores, torch.tensor([[1.0, 1.0, 0.6]]))


def test_load_run_without_hydra(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    backbone = OmegaConf.load(REPO / "src/zscir/conf/backbone/tiny.yaml")
    OmegaConf.save(
        {"method": {"kind": "sum", "img_weight": 0.5}, "backbone": backbone}, run / "resolved_config.yaml"
    )
    method = zscir.load_run(run, device="cpu")
    assert type(method).__name__ == "Sum"
    assert method.cfg.img_weight == 0.5
    assert not method.training
    OmegaConf.save({"method": {"kind": "lincir"}, "backbone": backbone}, run / "resolved_config.yaml")
    with pytest.raises(FileNotFoundError, match="trained lincir but has no checkpoint"):
        zscir.load_run(run, device="cpu")
    with pytest.raises(FileNotFoundError, match="not a zscir run directory"):
        zscir.load_run(tmp_path, device="cpu")


def test_template_without_its_slot_is_refused():
    with pytest.raises(ValueError, match=r"template 'a photo of \{caption\}' has no '\$' slot"):
        zscir.load_method("lincir", backbone="tiny", device="cpu", template="a photo of {caption}")
    with pytest.raises(ValueError, match=r"no '\{caption\}' slot"):
        zscir.load_method("lincir", backbone="tiny", device="cpu", template="a photo of $")
    with pytest.raises(ValueError, match="no backbone config 'nope'"):
        zscir.load_method("sum", backbone="nope")
