"""Outputs are never half-written: every writer in the library goes through zscir.utils.io (temp file +
fsync + rename), and a cache entry that cannot be read back is recomputed, never trusted."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from zscir.retrieval.cache import GalleryCache
from zscir.utils.io import atomic_write_bytes

SRC = Path(__file__).resolve().parents[1] / "src" / "zscir"

#: calls that write a file; on a line of their own they bypass the atomic writers
WRITERS = re.compile(
    r"\.write_text\(|\.write_bytes\(|\b(?:fd)?open\([^)]*['\"][wax]b?\+?['\"]|torch\.save\(|np\.savez?(_compressed)?\(|"
    r"\.savefig\(|json\.dump\(|pickle\.dump\(|\.to_csv\(|\.to_parquet\(|shutil\.copy|tarfile\.open\([^)]*['\"]w|"
    r"\b\w*(image|img|im)\.save\("  # PIL
)
#: a line is fine when the write happens inside an atomic writer or goes to an in-memory buffer
ALLOWED = re.compile(r"atomic_write|\bbuf\b|BytesIO|fileobj=buf|# atomic: ")


def test_every_file_writer_in_the_library_is_atomic():
    offenders = []
    for file in sorted(SRC.rglob("*.py")):
        if file == SRC / "utils" / "io.py":
            continue
        for number, line in enumerate(file.read_text().splitlines(), 1):
            code = line.split("#", 1)[0] if "# atomic: " not in line else line
            if WRITERS.search(code) and not ALLOWED.search(line) and not code.lstrip().startswith(('"', "'")):
                offenders.append(f"{file.relative_to(SRC.parent)}:{number}: {line.strip()}")
    assert not offenders, (
        "write these through zscir.utils.io.atomic_write* (or mark a deliberate exception with "
        "'# atomic: <why>'):\n" + "\n".join(offenders)
    )


def test_the_audit_catches_a_plain_write():
    assert WRITERS.search('(run_dir / "metrics.json").write_text(json.dumps(m))')
    assert WRITERS.search('with open(path, "w") as f:')
    assert WRITERS.search('with os.fdopen(fd, "wb") as f:')
    assert WRITERS.search("torch.save(state, path)")
    assert WRITERS.search("image.save(path)")
    assert not WRITERS.search('with open(path, "rb") as f:')
    assert ALLOWED.search("atomic_write(path, lambda f: torch.save(state, f))")


def test_a_truncated_or_foreign_cache_entry_is_recomputed_not_trusted(tmp_path):
    cache, ids = GalleryCache(tmp_path), ["a", "b", "c"]
    feats = torch.randn(3, 8)
    path = cache.save("key", ids, feats)
    assert torch.equal(cache.load("key", ids), feats)
    atomic_write_bytes(path, path.read_bytes()[: path.stat().st_size // 2])  # e.g. copied while written
    assert cache.load("key", ids) is None
    assert not path.exists()  # removed, so the next evaluation writes a good one
    cache.save("key", ids, feats)
    assert cache.load("key", ["a", "b", "d"]) is None  # same key, another gallery: not trusted either
