"""What every composed-retrieval benchmark looks like to the rest of zscir.

A :class:`Benchmark` reads one official on-disk layout and exposes a gallery (:class:`ImageRef` list)
and queries (:class:`Query` list). Every benchmark rule — which gallery, whether the reference is
removed, which ground truths count, how captions are joined — lives in the benchmark class and in
``zscir.metrics``; methods only turn queries into features.

Protocols. ``protocol="official"`` (the default) applies the benchmark's official evaluator, the one every
side-by-side table uses. ``protocol="pli"`` reproduces the evaluation scripts of the PLI paper (Chen & Lai),
whose published numbers differ from the official protocol on each benchmark (CIRR caption rewriting,
CIRCO reference removal, FashionIQ query set / gallery / reference removal, GeneCIS query composition;
each class's docstring says how). ``protocol="pic2word"`` (FashionIQ only) uses the Pic2Word code's query
text. Every metric key of a non-official protocol starts with
``"<protocol>/"`` (``pli/recall@10``), so such a number can never enter a table of official numbers under
the same column.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from zscir.retrieval.search import check_finite
from zscir.utils.images import (  # noqa: F401  (re-exported: what every loader uses)
    AnnotationError,
    DatasetLayoutError,
    ImageLoadError,
    ImageRef,
    load_rgb,
    to_rgb,
)
from zscir.utils.io import file_stamp


@dataclass(frozen=True)
class Query:
    """One composed query.

    Attributes:
        query_id: the official id (CIRR ``pairid``, CIRCO ``id``, FashionIQ triplet index), as a string.
        reference: the reference image (``None`` for text-only queries).
        texts: caption variants; their query features are L2-normalised, averaged and renormalised
            (FashionIQ's two caption orders). Most benchmarks have exactly one.
        target_ids: ground-truth gallery ids, the main target first; empty on unlabelled test splits.
        subset_ids: CIRR ``img_set`` members minus the reference (for recall_subset).
        candidate_ids: GeneCIS per-query candidates, target first; empty for gallery benchmarks.
    """

    query_id: str
    reference: ImageRef | None
    texts: tuple[str, ...]
    target_ids: tuple[str, ...] = ()
    subset_ids: tuple[str, ...] = ()
    candidate_ids: tuple[str, ...] = ()


#: evaluation protocols: the official evaluators' (the default), the PLI paper's own scripts, and Pic2Word's
#: (FashionIQ query text only)
PROTOCOLS = ("official", "pli", "pic2word")


class Benchmark(ABC):
    """A benchmark split: queries, gallery, scoring and (for test splits) submission files.

    Subclasses fill :attr:`queries` and :attr:`gallery` in ``__init__`` and implement :meth:`score`,
    passing its result through :meth:`keyed`.

    Raises:
        ValueError: ``protocol`` is not one of :attr:`protocols`.
    """

    #: loader family, e.g. ``"cirr"``
    kind: str = ""
    #: metric names :meth:`score` returns, in display order
    metric_names: tuple[str, ...] = ()
    #: splits whose predictions go to an evaluation server (:meth:`submission` files are written)
    submission_splits: tuple[str, ...] = ()
    #: bumped when the loader's image rules change (crops, ids), so cached gallery features are not reused
    version: int = 1
    #: the protocols this benchmark implements (:data:`PROTOCOLS`)
    protocols: tuple[str, ...] = ("official",)
    #: whether the query features themselves depend on the protocol (captions, query set, composition):
    #: then a features file is only re-scored under the protocol it was computed with
    queries_depend_on_protocol: bool = True
    #: a protocol rule that builds every query itself, ``rule(image [B, D], text [B, D]) -> [B, D]`` from
    #: the method's *unnormalised* image and text tower features, instead of the method's ``compose``
    #: (``RetrievalMethod.encode_towers``); None: the method composes its queries
    query_rule: Callable[[Tensor, Tensor], Tensor] | None = None

    def __init__(self, root: str | Path, split: str, name: str | None = None, protocol: str = "official"):
        if protocol not in self.protocols:
            raise ValueError(
                f"{type(self).__name__} implements the protocol(s) {self.protocols}, got {protocol!r}"
                + ("" if protocol in PROTOCOLS else f" (known protocols: {PROTOCOLS})")
            )
        self.root = Path(root).expanduser()
        self.split = split
        self.name = name or self.kind
        self.protocol = protocol
        self.metric_names = tuple(self.metric_key(m) for m in self.metric_names)
        self.queries: list[Query] = []
        self.gallery: list[ImageRef] = []

    def __repr__(self) -> str:
        protocol = "" if self.protocol == "official" else f", protocol={self.protocol!r}"
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}{protocol}, queries={len(self.queries)}, gallery={len(self.gallery)})"

    def metric_key(self, name: str) -> str:
        """A metric's key under this benchmark's protocol: ``name`` (official) or ``"<protocol>/name"``."""
        return name if self.protocol == "official" else f"{self.protocol}/{name}"

    def keyed(self, metrics: dict[str, float]) -> dict[str, float]:
        """``metrics`` with every key passed through :meth:`metric_key`."""
        return {self.metric_key(k): v for k, v in metrics.items()}

    @property
    def labelled(self) -> bool:
        return any(q.target_ids or q.candidate_ids for q in self.queries)

    def gallery_index(self) -> dict[str, int]:
        if not hasattr(self, "_gallery_index"):
            self._gallery_index = {ref.image_id: i for i, ref in enumerate(self.gallery)}
        return self._gallery_index

    def load_image(self, ref: ImageRef) -> Image.Image:
        return load_rgb(ref.path, ref.box, ref.span)

    @abstractmethod
    def score(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, float]:
        """Metrics in percent from features aligned with :attr:`queries` and :attr:`gallery`."""

    def submission(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, object]:
        """Server submission files for unlabelled splits: ``{file name: JSON object}``."""
        return {}

    def identity(self) -> dict:
        """What determines this benchmark's gallery features (the gallery feature cache's key): loader,
        split, gallery ids, and what the encoder reads — each image's file (for an image inside a tar
        shard: the shard and the member's span), crop box, and the file's :func:`file_stamp`, so images
        repaired or replaced in place are re-encoded. One ``stat`` per distinct file."""
        return {
            "kind": self.kind,
            "version": self.version,
            "root": str(self.root.resolve()),
            "split": self.split,
            "gallery": [r.image_id for r in self.gallery],
            "files": gallery_files_digest(self.gallery),
        }

    # ---- features.npz ------------------------------------------------------------------------
    def feature_arrays(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, np.ndarray]:
        """The content of ``features.npz``: ``query_ids`` [Q] str, ``query_feats`` [Q, D],
        ``gallery_ids`` [N] str, ``gallery_feats`` [N, D] (features as given, not normalised), and
        under a non-official protocol ``protocol`` (a 0-d str array)."""
        return {
            "query_ids": np.array([q.query_id for q in self.queries], dtype=str),
            "query_feats": query_feats.detach().float().cpu().numpy(),
            "gallery_ids": np.array([g.image_id for g in self.gallery], dtype=str),
            "gallery_feats": gallery_feats.detach().float().cpu().numpy(),
            **self.protocol_array(),
        }

    def protocol_array(self) -> dict[str, np.ndarray]:
        """``{"protocol": 0-d str array}`` for a non-official protocol; nothing for the official one
        (files without the entry are official, as every file written before protocols existed)."""
        return {} if self.protocol == "official" else {"protocol": np.array(self.protocol)}

    def check_protocol(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Refuse query features computed under another protocol when the queries depend on it.

        Raises:
            ValueError: the file's ``protocol`` differs from :attr:`protocol` and
                :attr:`queries_depend_on_protocol`.
        """
        saved = str(np.asarray(arrays["protocol"])) if "protocol" in arrays else "official"
        if saved != self.protocol and self.queries_depend_on_protocol:
            raise ValueError(
                f"{self.name}: the query features were computed under protocol {saved!r}, but this benchmark "
                f"scores protocol {self.protocol!r}, whose queries differ; score them under {saved!r}, or "
                f"evaluate the model again with benchmark.protocol={self.protocol}"
            )

    def features_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> tuple[Tensor, Tensor]:
        """(query, gallery) features from ``features.npz`` arrays, re-ordered to :attr:`queries` and
        :attr:`gallery` by id. Every id must be present exactly once; none may be foreign; the file's
        protocol must fit (:meth:`check_protocol`)."""
        self.check_protocol(arrays)
        queries = align_by_ids(
            arrays, "query", [q.query_id for q in self.queries], self.name, self.canonical_id
        )
        gallery = align_by_ids(
            arrays, "gallery", [g.image_id for g in self.gallery], self.name, self.canonical_id
        )
        if queries.shape[1] != gallery.shape[1]:
            raise ValueError(
                f"{self.name}: query features have dimension {queries.shape[1]}, gallery features {gallery.shape[1]}"
            )
        return queries, gallery

    @staticmethod
    def canonical_id(value: str) -> str:
        """An id as this benchmark writes it (CIRCO: ``"000000243611"`` -> ``"243611"``)."""
        return value

    def score_arrays(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """:meth:`score` on a saved ``features.npz`` (no model needed)."""
        return self.score(*self.features_from_arrays(arrays))

    def submission_arrays(self, arrays: Mapping[str, np.ndarray]) -> dict[str, object]:
        """:meth:`submission` on a saved ``features.npz``."""
        return self.submission(*self.features_from_arrays(arrays))


# ---- helpers shared by the loaders -------------------------------------------------------------------
def gallery_files_digest(refs: Sequence[ImageRef]) -> str:
    """A SHA-1 over every image's (path, span, box, :func:`file_stamp`), in gallery order; a missing
    file counts as ``None`` (encoding it then fails with :class:`ImageLoadError`)."""
    stamps: dict[Path, tuple[int, int, int] | None] = {}  # tar shards hold many images: one stat each
    digest = hashlib.sha1()
    for ref in refs:
        if ref.path not in stamps:
            try:
                stamps[ref.path] = file_stamp(ref.path)
            except OSError:
                stamps[ref.path] = None
        digest.update(repr((str(ref.path), ref.span, ref.box, stamps[ref.path])).encode())
    return digest.hexdigest()


def pli_caption(text: str) -> str:
    """A caption as PLI's evaluation feeds it to the text encoder (PLI ``data/cirr.py:12-13`` and
    ``data/fashionIQ.py:53-54``): whitespace stripped at both ends, then every ``.`` replaced by
    ``dotmark``, ``?`` by ``questionmark``, ``&`` by ``andmark`` and ``*`` by ``starmark``, with no
    spaces added (``"is red. & blue?"`` -> ``"is reddotmark andmark bluequestionmark"``)."""
    return (
        text.strip()
        .replace(".", "dotmark")
        .replace("?", "questionmark")
        .replace("&", "andmark")
        .replace("*", "starmark")
    )


def ids_from_array(values: np.ndarray | Sequence) -> list[str]:
    """Ids as strings, whatever the array holds (str, bytes or integers)."""
    out = []
    for v in np.asarray(values).reshape(-1).tolist():
        out.append(v.decode() if isinstance(v, bytes) else str(v))
    return out


def align_by_ids(
    arrays: Mapping[str, np.ndarray],
    kind: str,
    expected: list[str],
    name: str,
    canonical: Callable[[str], str] = str,
) -> Tensor:
    """``arrays[f"{kind}_feats"]`` re-ordered to ``expected`` ids using ``arrays[f"{kind}_ids"]``
    (each passed through ``canonical`` first)."""
    id_key, feat_key = f"{kind}_ids", f"{kind}_feats"
    missing_keys = [k for k in (id_key, feat_key) if k not in arrays]
    if missing_keys:
        raise ValueError(f"{name}: the features file has no {missing_keys} (it has {sorted(arrays)})")
    ids = [canonical(x) for x in ids_from_array(arrays[id_key])]
    feats = np.asarray(arrays[feat_key])
    if feats.ndim != 2 or feats.shape[0] != len(ids):
        raise ValueError(
            f"{name}: {feat_key} has shape {feats.shape}, expected [{len(ids)}, D] to match {id_key}"
        )
    check_finite(feats, f"{name} {kind}", ids)
    position: dict[str, int] = {}
    duplicates = []
    for i, x in enumerate(ids):
        if x in position:
            duplicates.append(x)
        position[x] = i
    if duplicates:
        raise ValueError(f"{name}: {id_key} repeats {len(duplicates)} id(s), e.g. {duplicates[:5]}")
    missing = [x for x in expected if x not in position]
    foreign = sorted(set(position) - set(expected))
    if missing or foreign:
        raise ValueError(
            f"{name}: {id_key} do not match the benchmark's {len(expected)} {kind} ids: "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(foreign)} unknown (e.g. {foreign[:5]}); "
            "were the features made for another split, category or task?"
        )
    return torch.from_numpy(feats[[position[x] for x in expected]]).float()


def read_json(path: Path, what: str, obtain: str) -> object:
    """Read an annotation file, naming the file and where the dataset comes from when it is missing."""
    if not path.is_file():
        raise DatasetLayoutError(f"missing {what}: {path}\n{obtain}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path} is not valid JSON: {err}") from err


def require_keys(record: dict, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(record, dict):
        raise AnnotationError(
            f"{where}: expected an object with keys {list(keys)}, got {json.dumps(record)[:200]}"
        )
    missing = [k for k in keys if k not in record]
    if missing:
        raise AnnotationError(f"{where}: missing key(s) {missing} in record {json.dumps(record)[:200]}")


def check_root(
    root: Path, expected: Sequence[str], obtain: str, what: str = "dataset", optional: Sequence[str] = ()
) -> None:
    """Fail early when ``root`` lacks any of the ``expected`` entries, listing every file the layout
    prescribes (``optional`` ones, e.g. image folders not needed to re-score features, are listed too)."""
    missing = [e for e in expected if not (root / e).exists()]
    if not missing:
        return
    lines = [f"  {'MISSING' if e in missing else 'found  '}  {root / e}" for e in expected]
    lines += [
        f"  {'found  ' if (root / e).exists() else 'missing'}  {root / e}  (images; needed only to encode)"
        for e in optional
    ]
    listing = "\n".join(lines)
    raise DatasetLayoutError(f"{root} is not a {what} root; the official layout has:\n{listing}\n{obtain}")
