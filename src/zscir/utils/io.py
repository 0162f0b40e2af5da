"""Crash-safe file output: write to a temporary file in the same folder, then rename over the target.

A reader never sees a half-written metrics.json, features.npz, submission, cache entry or checkpoint:
either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"
# mkstemp creates 0600 files; outputs get the usual permissions (0666 minus the umask) instead
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], durable: bool = True) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync it, and rename it to ``path``.

    ``durable=False`` skips the two fsyncs (file and folder): the rename is still atomic, so a reader sees
    the old or the new content, but a power loss may lose the entry. For cache entries that are recomputed
    when missing, written one per image, where an fsync each would dominate.

    On any failure the temp file is removed and ``path`` keeps its previous content. An ``OSError``
    (disk full, quota, permissions) is re-raised with the same errno and a message naming ``path``.
    A process killed mid-write leaves only a ``.<name>.*.tmp`` file behind (see :func:`remove_stale_temp_files`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from err
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _naming(err, path) from err
        raise
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (power loss); best effort, some file systems refuse it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _naming(err: OSError, path: Path) -> OSError:
    """The same kind of error, with a message that says which output failed and what to do."""
    hint = {
        errno.ENOSPC: "the disk is full: free space or point paths.output_dir at a larger disk",
        errno.EDQUOT: "the disk quota is exceeded: free space or point paths.output_dir elsewhere",
        errno.EACCES: "no permission to write there: choose another paths.output_dir / hydra.run.dir",
        errno.EROFS: "the file system is read-only: choose another paths.output_dir / hydra.run.dir",
    }.get(err.errno, "")
    message = f"could not write {path}: {err.strerror or err}" + (f" ({hint})" if hint else "")
    return OSError(err.errno, message)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temp files that a killed :func:`atomic_write` left in ``folder``; returns what was removed.

    Call it only when no other process writes into ``folder`` (e.g. at the start of a resumed run).
    """
    folder = Path(folder)
    stale = sorted(folder.glob(f".*{TEMP_SUFFIX}")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), durable)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: object, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def file_stamp(path: str | Path) -> tuple[int, int, int]:
    """(size in bytes, modification time in ns, status-change time in ns) of a file: what a cache keyed
    on a file checks to notice that the file was rewritten, with one ``stat``.

    The change time catches rewrites that keep size and modification time (``cp -p``, ``rsync -t``,
    ``tar x`` restore the source's mtime; nothing can set ctime back); a ``chmod`` also changes it,
    which only costs a recomputation.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns
