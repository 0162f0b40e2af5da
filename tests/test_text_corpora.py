"""Caption-only corpora: every file format, corpus specs, packed strings, and the streaming dataset's
split over ranks and workers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from zscir.benchmarks.base import DatasetLayoutError
from zscir.data.loaders import DataConfig, build_train_loader
from zscir.data.text_corpora import (
    CaptionSource,
    StreamingSamples,
    StringArray,
    StringLists,
    caption_samples,
    expand_text_sources,
    load_captions,
)

CAPTIONS = ["a red cube", "two blue discs", "ünïcode café ☕", "a green cross on the left"]


def write_txt(path: Path, captions: list[str]) -> Path:
    path.write_text("\n".join(captions[:2]) + "\n\n  \n" + "\n".join(captions[2:]) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, captions: list[str], key: str = "caption") -> Path:
    lines = [json.dumps({key: c, "other": 1}) for c in captions[:2]] + [json.dumps({key: None})]
    lines += [json.dumps({key: c}) for c in captions[2:]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, captions: list[str], column: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(captions) + 1)), column: [*captions, None]}), path)
    return path


def write_shard(path: Path, captions: list[str]) -> Path:
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            png = io.BytesIO()
            Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(png, format="PNG")
            for name, data in ((f"{i:04d}.png", png.getvalue()), (f"{i:04d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    ("writer", "suffix", "field"),
    [
        (write_txt, ".txt", None),
        (write_jsonl, ".jsonl", None),
        (write_parquet, ".parquet", None),
        (write_shard, ".tar", None),
    ],
)
def test_every_format_reads_its_captions_in_order(tmp_path, writer, suffix, field):
    path = writer(tmp_path / f"corpus{suffix}", CAPTIONS)
    (source,) = expand_text_sources(path, field)
    assert list(source.read()) == CAPTIONS  # blank and null captions skipped


def test_field_is_configurable_and_a_missing_one_is_named(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", CAPTIONS, key="prompt")
    assert list(expand_text_sources(path, "prompt")[0].read()) == CAPTIONS
    with pytest.raises(DatasetLayoutError, match="prompt"):
        list(expand_text_sources(path)[0].read())
    parquet = write_parquet(tmp_path / "c.parquet", CAPTIONS, column="caption")
    assert list(expand_text_sources(parquet)[0].read()) == CAPTIONS  # "caption" tried before "text"


def test_folder_glob_brace_range_and_limit(tmp_path):
    for i in range(3):
        write_txt(tmp_path / f"part-{i}.txt", [f"caption {i}.{j}" for j in range(4)])
    (tmp_path / "notes.md").write_text("not a corpus")
    by_folder = expand_text_sources(tmp_path)
    assert [s.name for s in by_folder] == ["part-0.txt", "part-1.txt", "part-2.txt"]
    assert [s.name for s in expand_text_sources(tmp_path / "part-*.txt")] == [s.name for s in by_folder]
    assert [s.name for s in expand_text_sources(str(tmp_path / "part-{0..1}.txt"))] == [
        "part-0.txt",
        "part-1.txt",
    ]
    limited = expand_text_sources(tmp_path, limit=6)
    assert list(load_captions(limited)) == [f"caption 0.{j}" for j in range(4)] + [
        "caption 1.0",
        "caption 1.1",
    ]
    with pytest.raises(DatasetLayoutError, match="part-7"):
        expand_text_sources(str(tmp_path / "part-{6..7}.txt"))


def test_string_array_round_trip_and_concat():
    a = StringArray.from_strings(CAPTIONS)
    assert list(a) == CAPTIONS
    assert len(a) == 4
    assert a[-1] == CAPTIONS[-1]
    both = StringArray.concat([a, StringArray.from_strings(["", "x"])])
    assert list(both) == [*CAPTIONS, "", "x"]
    assert list(both.head(2)) == CAPTIONS[:2]
    with pytest.raises(IndexError):
        a[4]
    lists = StringLists.concat([StringLists.from_lists([["a", "b"], []]), StringLists.from_lists([["ç"]])])
    assert [lists[i] for i in range(len(lists))] == [["a", "b"], [], ["ç"]]
    assert [lists.head(1)[0]] == [["a", "b"]]


def _sources(tmp_path: Path, files: int, per_file: int) -> list[CaptionSource]:
    for f in range(files):
        write_txt(tmp_path / f"s{f}.txt", [f"{f}-{j}" for j in range(per_file)])
    return expand_text_sources(tmp_path)


@pytest.mark.parametrize(("files", "readers"), [(4, 2), (5, 4), (2, 3), (1, 2)])
def test_one_pass_splits_every_caption_over_readers_exactly_once(tmp_path, files, readers):
    sources = _sources(tmp_path, files, 5)
    stream = StreamingSamples(sources, caption_samples, shuffle_buffer=0, seed=3)
    parts = [[s["caption"] for s in stream._one_pass(0, r, readers)] for r in range(readers)]
    flat = [c for p in parts for c in p]
    assert sorted(flat) == sorted(load_captions(sources))
    assert len(set(flat)) == len(flat)
    if files < readers:  # caption striding: shares differ by at most one
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_stream_is_endless_reshuffled_and_split_over_workers_and_ranks(tmp_path, monkeypatch):
    sources = _sources(tmp_path, 4, 6)
    stream = StreamingSamples(sources, caption_samples, shuffle_buffer=5, seed=0)
    it = iter(stream)
    first, second = [next(it)["caption"] for _ in range(24)], [next(it)["caption"] for _ in range(24)]
    assert sorted(first) == sorted(second) == sorted(load_captions(sources))
    assert first != second  # each pass has its own order
    # 2 ranks x 2 workers: four disjoint quarters of the corpus
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = DataLoader(
            stream, batch_size=3, num_workers=2, collate_fn=lambda b: [s["caption"] for s in b]
        )
        batches = iter(loader)
        seen += [c for _ in range(4) for c in next(batches)]  # workers alternate: 2 batches of 3 each
        del batches
    assert sorted(seen) == sorted(load_captions(sources))


def test_loader_for_a_plain_streaming_text_corpus(tmp_path):
    _sources(tmp_path, 2, 8)
    cfg = DataConfig(kind="text", path=str(tmp_path), batch_size=4, num_workers=0, streaming=True)
    batch = next(iter(build_train_loader(cfg, image_transform=None)))
    assert len(batch["caption"]) == 4
    assert isinstance(batch["index"], torch.Tensor)
    with pytest.raises(ValueError, match="max_samples"):
        build_train_loader(DataConfig(kind="text", path=str(tmp_path), streaming=True, max_samples=3), None)
