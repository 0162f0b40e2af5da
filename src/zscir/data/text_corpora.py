"""Caption-only training corpora: plain text, jsonl, parquet, and the captions of webdataset shards.

A corpus is a list of :class:`CaptionSource` files (``expand_text_sources``: a file, a folder, a glob or
a brace range). It is either loaded into a :class:`StringArray` (captions packed into one UTF-8 buffer,
so DataLoader workers forked from the main process share it instead of copying millions of Python
strings page by page) or streamed file by file by :class:`StreamingSamples`, an ``IterableDataset`` that
splits the files (or, with fewer files than readers, the captions) over ranks and workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from zscir.utils.images import DatasetLayoutError
from zscir.utils.io import file_stamp

#: file suffix -> format
TEXT_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet", ".tar": "wds"}
#: jsonl keys / parquet columns tried, in order, when no field is configured
DEFAULT_FIELDS = ("caption", "text")


# ---- sources --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionSource:
    """One file of captions.

    ``format``: ``txt`` (one caption per line), ``jsonl`` (one object per line, or one string),
    ``parquet`` (a string column) or ``wds`` (the ``.txt`` captions of a webdataset tar shard).
    ``field``: the jsonl key / parquet column (None: ``caption``, else ``text``). ``limit``: read only the
    first ``limit`` captions (None: all). Blank and null captions are skipped.
    """

    path: Path
    format: str
    field: str | None = None
    limit: int | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def identity(self) -> dict:
        """What the file's captions depend on: location, :func:`~zscir.utils.io.file_stamp` (size,
        modification and change time), format and field (not ``limit``: the first n captions are the
        same whatever is read after them)."""
        return {
            "path": str(self.path.resolve()),
            "stamp": list(file_stamp(self.path)),
            "format": self.format,
            "field": self.field,
        }

    def read(self) -> Iterator[str]:
        captions = _READERS[self.format](self.path, self.field)
        for i, caption in enumerate(captions):
            if self.limit is not None and i >= self.limit:
                return
            yield caption


@dataclass(frozen=True)
class MemorySource:
    """Captions already in memory (tests, benchmarks); identified by a hash of their text."""

    captions: Sequence[str]
    name: str = "captions"
    limit: None = None

    def identity(self) -> dict:
        h = hashlib.sha1()
        for c in self.captions:
            h.update(c.encode("utf-8") + b"\0")
        return {"sha1": h.hexdigest(), "count": len(self.captions)}

    def read(self) -> Iterator[str]:
        yield from (c for c in self.captions if c and c.strip())


def _expand(spec: str) -> list[Path]:
    match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if match:
        lo, hi = match.group(1), match.group(2)
        return [
            Path(spec[: match.start()] + f"{i:0{len(lo)}d}" + spec[match.end() :]).expanduser()
            for i in range(int(lo), int(hi) + 1)
        ]
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in TEXT_FORMATS and p.is_file())
    if any(c in spec for c in "*?["):
        root = Path(path.anchor) if path.is_absolute() else Path()
        pattern = str(path.relative_to(path.anchor)) if path.is_absolute() else spec
        return sorted(p for p in root.glob(pattern) if p.is_file())
    return [path]


def expand_text_sources(
    spec: str | Path, field: str | None = None, limit: int | None = None
) -> list[CaptionSource]:
    """The caption files of a corpus spec: a file, a folder (its ``.txt/.jsonl/.parquet/.tar`` files), a
    glob, or a brace range (``part-{000..127}.parquet``).

    ``limit``: keep only the first ``limit`` captions of the corpus (later files are dropped, the last
    file kept is read up to the remainder). Counting needs a pass over the files it keeps.
    """
    paths = _expand(str(spec))
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise DatasetLayoutError(
            f"no caption files found for {str(spec)!r}"
            + (f" (missing: {[str(m) for m in missing[:3]]})" if missing else "")
            + f"\nExpected {', '.join(TEXT_FORMATS)} files (one caption per line / a "
            f"{'|'.join(DEFAULT_FIELDS)} field or column / webdataset shards with .txt members)."
        )
    unknown = [p for p in paths if p.suffix not in TEXT_FORMATS]
    if unknown:
        raise DatasetLayoutError(
            f"unsupported caption file type {unknown[0]}; expected one of {list(TEXT_FORMATS)}"
        )
    sources = [CaptionSource(p, TEXT_FORMATS[p.suffix], field) for p in paths]
    if limit is None:
        return sources
    kept, left = [], limit
    for source in sources:
        if left <= 0:
            break
        count = sum(1 for _ in CaptionSource(source.path, source.format, field, left).read())
        kept.append(CaptionSource(source.path, source.format, field, left if count == left else None))
        left -= count
    return kept


# ---- readers --------------------------------------------------------------------------------------
def _read_txt(path: Path, _field: str | None) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.strip()


def _pick_field(available: Iterable[str], field: str | None, path: Path) -> str:
    available = list(available)
    for name in [field] if field else DEFAULT_FIELDS:
        if name in available:
            return name
    raise DatasetLayoutError(
        f"{path}: no caption field {field or ' / '.join(DEFAULT_FIELDS)!r}; it has {available[:10]} "
        "(set data.text_field)"
    )


def _read_jsonl(path: Path, field: str | None) -> Iterator[str]:
    key = None
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetLayoutError(f"{path}:{n}: not a JSON line ({err})") from err
            if isinstance(record, dict):
                key = key or _pick_field(record, field, path)
                record = record.get(key)
            if isinstance(record, str) and record.strip():
                yield record.strip()


def _read_parquet(path: Path, field: str | None) -> Iterator[str]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    column = _pick_field(file.schema_arrow.names, field, path)
    for batch in file.iter_batches(batch_size=65536, columns=[column]):
        for caption in batch.column(0).to_pylist():
            if isinstance(caption, str) and caption.strip():
                yield caption.strip()


def _read_wds(path: Path, _field: str | None) -> Iterator[str]:
    from zscir.data.corpora import index_shard

    for sample in index_shard(path):
        if sample.caption.strip():
            yield sample.caption.strip()


_READERS: dict[str, Callable[[Path, str | None], Iterator[str]]] = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "wds": _read_wds,
}


# ---- packed strings -------------------------------------------------------------------------------
class StringArray:
    """An immutable sequence of strings stored as one UTF-8 byte buffer plus offsets."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or len(offsets) < 1 or int(offsets[-1]) != len(data):
            raise ValueError("offsets must be 1-D, start the buffer and end at its length")
        self.data, self.offsets = data, offsets

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> StringArray:
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)

    @classmethod
    def concat(cls, arrays: Sequence[StringArray]) -> StringArray:
        if not arrays:
            return cls.from_strings([])
        shifts = np.cumsum([0] + [len(a.data) for a in arrays[:-1]])
        offsets = np.concatenate(
            [arrays[0].offsets[:1]] + [a.offsets[1:] + s for a, s in zip(arrays, shifts)]
        )
        return cls(np.concatenate([a.data for a in arrays]), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """[N] byte length of every string (no decoding)."""
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def head(self, n: int) -> StringArray:
        """The first ``n`` strings."""
        n = min(n, len(self))
        return StringArray(self.data[: self.offsets[n]], self.offsets[: n + 1])


class StringLists:
    """A sequence of lists of strings (e.g. each caption's keywords): a flat :class:`StringArray` plus
    where each list starts in it."""

    def __init__(self, flat: StringArray, starts: np.ndarray):
        if starts.ndim != 1 or len(starts) < 1 or int(starts[-1]) != len(flat):
            raise ValueError("starts must be 1-D and end at the number of strings")
        self.flat, self.starts = flat, starts

    @classmethod
    def from_lists(cls, lists: Iterable[Sequence[str]]) -> StringLists:
        lists = list(lists)
        starts = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=starts[1:])
        return cls(StringArray.from_strings(s for x in lists for s in x), starts)

    @classmethod
    def concat(cls, parts: Sequence[StringLists]) -> StringLists:
        shifts = np.cumsum([0] + [len(p.flat) for p in parts[:-1]])
        starts = np.concatenate([np.zeros(1, np.int64)] + [p.starts[1:] + s for p, s in zip(parts, shifts)])
        return cls(StringArray.concat([p.flat for p in parts]), starts)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> list[str]:
        return [self.flat[j] for j in range(int(self.starts[i]), int(self.starts[i + 1]))]

    def head(self, n: int) -> StringLists:
        n = min(n, len(self))
        return StringLists(self.flat.head(int(self.starts[n])), self.starts[: n + 1])


def caption_samples(position: int, source: CaptionSource) -> Iterator[dict]:
    """``{"index", "caption"}`` samples of one file, for :class:`StreamingSamples` of plain captions."""
    for i, caption in enumerate(source.read()):
        yield {"index": (position << 32) + i, "caption": caption}


def load_captions(sources: Sequence[CaptionSource | MemorySource]) -> StringArray:
    """Every caption of ``sources``, in order, packed."""
    return StringArray.concat([StringArray.from_strings(s.read()) for s in sources])


# ---- streaming ------------------------------------------------------------------------------------
def reader_shard() -> tuple[int, int]:
    """(this reader's index, number of readers) over all ranks × DataLoader workers."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:  # workers started by spawn do not inherit the process group; torchrun/Lightning set these
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


class StreamingSamples(IterableDataset):
    """An endless stream of samples read file by file, for corpora larger than memory.

    Every pass ("epoch") shuffles the file order with ``seed + epoch`` (the same order on every reader).
    With at least as many files as readers, reader ``r`` of ``R`` reads files ``r, r + R, ...`` of that
    order; with fewer, every reader reads every file and keeps samples ``r, r + R, ...``. Samples then go
    through a shuffle buffer of ``shuffle_buffer`` (0: none). The stream never ends (LinCIR trains by
    steps, like the official infinite loop), so set ``trainer.max_steps``; no rank can run out of
    samples before another, which would hang DDP.

    Args:
        sources: the files.
        open_source: ``open_source(i, sources[i])`` yields the samples (dicts) of one source, in order;
            sample indices are conventionally ``(i << 32) + position in the file``.
    """

    def __init__(
        self,
        sources: Sequence[CaptionSource],
        open_source: Callable[[int, CaptionSource], Iterator[dict]],
        shuffle_buffer: int = 10_000,
        seed: int = 0,
    ):
        self.sources, self.open_source = list(sources), open_source
        self.shuffle_buffer, self.seed = shuffle_buffer, seed

    def _one_pass(self, epoch: int, reader: int, readers: int) -> Iterator[dict]:
        order = list(range(len(self.sources)))
        random.Random(self.seed + epoch).shuffle(order)
        if len(order) >= readers:
            for i in order[reader::readers]:
                yield from self.open_source(i, self.sources[i])
            return
        n = 0
        for i in order:
            for sample in self.open_source(i, self.sources[i]):
                if n % readers == reader:
                    yield sample
                n += 1

    def __iter__(self) -> Iterator[dict]:
        reader, readers = reader_shard()
        epoch = 0
        while True:
            rng = random.Random(f"{self.seed}-{epoch}-{reader}")
            emitted = 0
            for sample in _shuffled(self._one_pass(epoch, reader, readers), self.shuffle_buffer, rng):
                emitted += 1
                yield sample
            if emitted == 0:
                raise DatasetLayoutError(
                    f"reader {reader} of {readers} got no captions from {len(self.sources)} file(s)"
                )
            epoch += 1


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer: keep ``size`` samples, emit a random one as each new one arrives."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = rng.randrange(size)
        buffer[j], sample = sample, buffer[j]
        yield sample
    rng.shuffle(buffer)
    yield from buffer
