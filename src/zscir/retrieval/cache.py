"""On-disk gallery feature cache.

Keyed by everything that determines the features: the backbone's weights fingerprint, the method's
gallery encoder, the benchmark (kind, root, split, gallery ids, and each image file's size, modification
and change time: ``Benchmark.identity``), the image transform and the numeric precision (the Trainer's
``precision``, the weights' dtype). A second evaluation of an unchanged
gallery loads its features instead of re-encoding; images repaired or replaced since are re-encoded.
Entries are written atomically; an entry that fails to load, does not match its key or holds NaN/inf is
deleted and recomputed. Non-finite features are never saved (:func:`~zscir.retrieval.search.check_finite`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from zscir.retrieval.search import check_finite
from zscir.utils.io import atomic_write

log = logging.getLogger(__name__)


def cache_key(**parts: object) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class GalleryCache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str, gallery_ids: list[str]) -> Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            feats, ids = entry["feats"], entry["ids"]
            if list(ids) != list(gallery_ids) or feats.shape[0] != len(gallery_ids):
                raise ValueError("gallery ids differ from the benchmark's")
            check_finite(feats, "cached gallery", list(ids))
        except Exception as err:  # a truncated or foreign file is never trusted
            log.warning(
                "gallery cache entry %s is unusable (%s: %s); re-encoding", path, type(err).__name__, err
            )
            path.unlink(missing_ok=True)
            return None
        return feats

    def save(self, key: str, gallery_ids: list[str], feats: Tensor) -> Path:
        """Write the entry ``key``: ``feats`` [N, D] of ``gallery_ids`` (N).

        Raises:
            NonFiniteFeatures: a row holds NaN/inf; nothing is written.
        """
        check_finite(feats, "gallery", gallery_ids)
        entry = {"feats": feats.detach().float().cpu().contiguous(), "ids": list(gallery_ids)}
        return atomic_write(self.path(key), lambda f: torch.save(entry, f))
