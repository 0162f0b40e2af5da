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


def test_length_buckets_group_similar_lengths_and_visit_every_sample_once():
    from zscir.data.samplers import ResumableSampler, bucket_by_length

    lengths = torch.tensor([(7 * i) % 23 for i in range(50)])  # a deterministic mix of lengths
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    out = bucket_by_length(order, lengths, batch=4, window_batches=3, seed=1)
    assert sorted(out.tolist()) == list(range(50))  # a permutation
    assert out[48:].tolist() == order[48:].tolist()  # the partial last batch stays last
    for w in range(0, 48, 12):  # inside a window: batches are consecutive runs of the sorted lengths
        window = out[w : min(w + 12, 48)]
        expected = sorted(lengths[order[w : min(w + 12, 48)]].tolist())
        runs = [sorted(lengths[b].tolist()) for b in window.view(-1, 4)]
        assert sorted(x for r in runs for x in r) == expected
        assert all(r == expected[expected.index(r[0]) : expected.index(r[0]) + 4] for r in runs)
    assert torch.equal(out, bucket_by_length(order, lengths, 4, 3, 1))  # deterministic
    # the sampler: every sample once per epoch, and a resume continues exactly
    sampler = ResumableSampler(50, seed=3, lengths=lengths.tolist(), batch_size=4, bucket_batches=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(full) == list(range(50))
    assert full != ResumableSampler(50, seed=3).indices(2)  # buckets reorder the epoch
    sampler.resume_at = (2, 8)
    assert list(sampler) == full[8:]


def test_length_buckets_narrow_lincir_batches(tmp_path):
    """With length buckets, the text tower's width (the longest caption of each batch, in tokens) drops
    on a corpus mixing short captions and long prompts; the same captions are visited."""
    from zscir.methods import build_method

    short = ["a red circle", "two blue squares on the left", "a small green triangle"]
    long_ = ["a very long prompt " + " ".join(f"word{i}" for i in range(40))]
    (tmp_path / "c.txt").write_text("\n".join((short * 20 + long_ * 4)[i] for i in range(64)) + "\n")
    method = build_method(
        {"kind": "open_clip", "model": "tiny"},
        {"kind": "lincir", "keywords": {"cache_dir": str(tmp_path / "kw"), "n_process": 1}},
    )
    widths, seen = {}, {}
    for buckets in (0, 4):
        cfg = DataConfig(
            kind="text", path=str(tmp_path / "c.txt"), batch_size=8, num_workers=0, length_buckets=buckets
        )
        loader = build_train_loader(cfg, None, seed=0, samples=method.text_samples)
        batches = list(loader)
        widths[buckets] = sum(int((b["ids"] != 0).sum(1).max()) for b in batches)
        seen[buckets] = sorted(i for b in batches for i in b["index"].tolist())
    assert seen[0] == seen[4] == list(range(64))
    assert widths[4] < widths[0]
    with pytest.raises(ValueError, match="length_buckets"):
        build_train_loader(DataConfig(kind="text", path=str(tmp_path / "c.txt"), length_buckets=2), None)
