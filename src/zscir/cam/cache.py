"""On-disk cache of CAMs keyed by (image id, noun, backbone): a second epoch does no Grad-CAM work.

Layout: ``<root>/<namespace>/<h[:2]>/<h>.cam`` with ``h = sha1(image id, noun)`` and ``namespace`` a hash
of everything else that decides a map (backbone weights fingerprint, image transform, the
:class:`~zscir.cam.gradcam.CamSpec`, the file format version). One small file per entry: the patch-grid
map in float32 (256 B for the tiny CLIP's 8×8 grid, 1 KiB for ViT-L/14's 16×16; CC3M's 3.3 M images
≈ 3.4 GB), so reading an entry is one ``open``/``read``.

Entries are written atomically (temp file + rename, no fsync: a lost entry is only recomputed) and
checked on read: magic, version, size, the stored key, and a fingerprint of the image's pixels (:func:`pixel_stats`). An entry
that fails any check — truncated, foreign, or computed from different pixels (a changed image file, a
different transform, a random augmentation) — counts as a miss, is recomputed and overwritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import struct
from pathlib import Path

import torch
from torch import Tensor

from zscir.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

MAGIC = b"ZCAM"
VERSION = 1
_HEADER = struct.Struct("<4sBHHH2d")  # magic, version, grid h, grid w, key length, 2 pixel statistics
#: pixel statistics may differ by float summation order only
STATS_TOLERANCE = 1e-5


def pixel_stats(pixels: Tensor) -> Tensor:
    """Per-image fingerprint [B, 2] (float64) of the transformed pixels: their mean, and their mean after
    multiplying by a fixed pseudo-random ±1 pattern (which a flip, crop or shift changes)."""
    flat = pixels.detach().flatten(1).to("cpu", torch.float64)
    return torch.stack([flat.mean(1), flat @ _signs(flat.shape[1]) / flat.shape[1]], dim=1)


@functools.lru_cache(maxsize=8)
def _signs(n: int) -> Tensor:
    bits = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(n))
    return 2.0 * bits.double() - 1.0


def cache_namespace(**parts: object) -> str:
    """A short hash of everything besides (image id, noun) that determines a map."""
    blob = json.dumps({"format": VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


class CamCache:
    """Patch-grid CAMs on disk, one file per (image id, noun), under ``root/namespace``."""

    def __init__(self, root: str | Path, namespace: str):
        self.root = Path(root).expanduser() / namespace
        self.hits = self.misses = 0

    @staticmethod
    def _key(image_id: str, noun: str) -> str:
        return f"{image_id}\0{noun}"

    def path(self, image_id: str, noun: str) -> Path:
        digest = hashlib.sha1(self._key(image_id, noun).encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.cam"

    def get(self, image_id: str, noun: str, stats: Tensor) -> Tensor | None:
        """The map [h, w] stored for this pair, or None (absent, unreadable, or other pixels)."""
        path = self.path(image_id, noun)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as err:
            log.warning("CAM cache entry %s unreadable (%s); recomputing", path, err)
            self.misses += 1
            return None
        grid = self._decode(data, self._key(image_id, noun), stats)
        if grid is None:
            log.debug("CAM cache entry %s does not match; recomputing", path)
            self.misses += 1
        else:
            self.hits += 1
        return grid

    @staticmethod
    def _decode(data: bytes, key: str, stats: Tensor) -> Tensor | None:
        if len(data) < _HEADER.size:
            return None
        magic, version, h, w, klen, *stored = _HEADER.unpack_from(data)
        key_bytes = key.encode()
        if magic != MAGIC or version != VERSION or len(data) != _HEADER.size + klen + 4 * h * w:
            return None
        if data[_HEADER.size : _HEADER.size + klen] != key_bytes:
            return None
        expected = stats.tolist()
        if any(abs(a - b) > STATS_TOLERANCE * max(1.0, abs(b)) for a, b in zip(stored, expected)):
            return None
        grid = torch.frombuffer(bytearray(data[_HEADER.size + klen :]), dtype=torch.float32)
        return grid.view(h, w)

    def put(self, image_id: str, noun: str, grid: Tensor, stats: Tensor) -> None:
        """Store ``grid`` [h, w] atomically; a failed write is logged and otherwise ignored."""
        key = self._key(image_id, noun).encode()
        if len(key) > 0xFFFF:
            return
        h, w = grid.shape
        s0, s1 = stats.tolist()
        payload = grid.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        data = _HEADER.pack(MAGIC, VERSION, h, w, len(key), s0, s1) + key + payload
        path = self.path(image_id, noun)
        try:  # one small file per entry: atomic, not fsynced (a lost entry is recomputed)
            atomic_write_bytes(path, data, durable=False)
        except OSError as err:
            log.warning("could not write CAM cache entry %s: %s", path, err)
