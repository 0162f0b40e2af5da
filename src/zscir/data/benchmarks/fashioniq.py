"""FashionIQ (Wu et al., CVPR 2021): dress, shirt and toptee, each scored on its own gallery.

Layout (``XiaoxiaoGuo/fashion-iq`` + the images every peer reads)::

    ROOT/captions/cap.<category>.<split>.json        [{"candidate", "target", "captions": [c0, c1]}, ...]
    ROOT/image_splits/split.<category>.<split>.json  ["<asin>", ...]
    ROOT/images/<asin>.png  (or .jpg: SEARLE/CLIP4Cir use .jpg, Pic2Word .png; both are found)

Rules (``shared/reference/benchmarks.md`` §1, SEARLE ``validate.py``): gallery = the category's split
list in file order; every triplet is a query (no de-duplication); the reference is NOT removed; the query
text is both caption orders, each caption ``strip('.?, ')``-ed and joined with " and ", their features
normalised, averaged and renormalised; recall@10/50 per category. ``category="all"`` scores the three
categories separately (``dress/recall@10``, ...) and reports their unweighted mean as ``recall@10`` /
``recall@50`` — the "average" of papers, never a recall pooled over all queries. Query ids are the
triplet's index in ``cap.<category>.<split>.json`` (``<category>/<index>`` with ``category="all"``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from zscir.data.benchmarks.base import (
    AnnotationError,
    Benchmark,
    ImageLoadError,
    ImageRef,
    Query,
    check_root,
    ids_from_array,
    load_rgb,
    read_json,
    require_keys,
)
from zscir.metrics.functional import fashioniq_recall

OBTAIN = (
    "FashionIQ annotations: https://github.com/XiaoxiaoGuo/fashion-iq (captions/, image_splits/); images: "
    "see its README (image URLs; a mirror is linked from hongwang600/fashion-iq-metadata), saved as "
    "images/<asin>.png or images/<asin>.jpg."
)
CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
EXTENSIONS = (".png", ".jpg", ".jpeg")


def join_captions(first: str, second: str) -> str:
    """SEARLE's query text for one caption order: each caption stripped of '.', '?', ',' and spaces
    at both ends, joined with " and " (an empty caption leaves its side empty)."""
    return f"{first.strip('.?, ')} and {second.strip('.?, ')}"


class FashionIQ(Benchmark):
    kind = "fashioniq"

    def __init__(
        self, root: str | Path, split: str = "val", name: str | None = None, category: str | None = "all"
    ):
        super().__init__(root, split, name)
        category = category or "all"
        if split not in SPLITS:
            raise ValueError(f"FashionIQ split must be one of {SPLITS}, got {split!r}")
        if category not in (*CATEGORIES, "all"):
            raise ValueError(f"FashionIQ category must be one of {(*CATEGORIES, 'all')}, got {category!r}")
        self.category = category
        self.categories = CATEGORIES if category == "all" else (category,)
        check_root(
            self.root,
            [
                f
                for c in self.categories
                for f in (f"captions/cap.{c}.{split}.json", f"image_splits/split.{c}.{split}.json")
            ],
            OBTAIN,
            "FashionIQ",
            optional=["images/"],
        )
        self.image_dir = self.root / "images"
        self.extension = self._detect_extension()
        #: per category: (first query position, query count, gallery positions in split-list order)
        self.parts: dict[str, tuple[int, int, list[int]]] = {}
        index: dict[str, int] = {}
        for cat in self.categories:
            names = self.split_list(self.root, split, cat)
            for asin in names:  # shirt and toptee share asins: one gallery entry (and feature) each
                if asin not in index:
                    index[asin] = len(self.gallery)
                    self.gallery.append(ImageRef(asin, self.image_dir / f"{asin}{self.extension}"))
            first = len(self.queries)
            self._read_triplets(cat, set(names))
            self.parts[cat] = (first, len(self.queries) - first, [index[a] for a in names])
        if len({bool(q.target_ids) for q in self.queries}) > 1:
            raise AnnotationError(f"FashionIQ {split}: some triplets have a target and some do not")
        self.metric_names = (
            ("recall@10", "recall@50")
            if category != "all"
            else (*(f"{c}/recall@{k}" for c in CATEGORIES for k in (10, 50)), "recall@10", "recall@50")
        )

    @staticmethod
    def split_list(root: Path, split: str, category: str) -> list[str]:
        where = f"image_splits/split.{category}.{split}.json"
        names = read_json(Path(root) / where, "FashionIQ image split file", OBTAIN)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise AnnotationError(f"{where}: expected a list of image names (asins)")
        if len(set(names)) != len(names):
            # SEARLE asserts that each target occurs exactly once in the gallery
            raise AnnotationError(f"{where}: an image is listed twice")
        return names

    @classmethod
    def infer_category(cls, root: str | Path, split: str, gallery_ids: object) -> str:
        """The category whose split list holds exactly ``gallery_ids`` (for re-scoring a features file
        without ``--category``); ``"all"`` when none matches on its own."""
        ids = set(ids_from_array(gallery_ids))
        for cat in CATEGORIES:
            if (Path(root) / f"image_splits/split.{cat}.{split}.json").is_file() and ids == set(
                cls.split_list(Path(root), split, cat)
            ):
                return cat
        return "all"

    def features_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> tuple[Tensor, Tensor]:
        """As the base class; a features file of ``category="all"`` (ids ``<category>/<index>``, the
        union gallery) is also accepted for a single category: its rows are selected."""
        ids = ids_from_array(arrays.get("query_ids", []))
        if self.category != "all" and ids and all("/" in x for x in ids):
            prefix = f"{self.category}/"
            keep = [i for i, x in enumerate(ids) if x.startswith(prefix)]
            own = {g.image_id for g in self.gallery}
            gallery_ids = ids_from_array(arrays.get("gallery_ids", []))
            in_gallery = [i for i, x in enumerate(gallery_ids) if x in own]
            arrays = {
                **arrays,
                "query_ids": np.array([ids[i][len(prefix) :] for i in keep], dtype=str),
                "query_feats": np.asarray(arrays["query_feats"])[keep],
                "gallery_ids": np.array([gallery_ids[i] for i in in_gallery], dtype=str),
                "gallery_feats": np.asarray(arrays["gallery_feats"])[in_gallery],
            }
        return super().features_from_arrays(arrays)

    def _read_triplets(self, cat: str, gallery: set[str]) -> None:
        where = f"captions/cap.{cat}.{self.split}.json"
        triplets = read_json(self.root / where, "FashionIQ captions file", OBTAIN)
        if not isinstance(triplets, list):
            raise AnnotationError(f"{where}: expected a list of triplets")
        for i, rec in enumerate(triplets):
            require_keys(rec, ("candidate", "captions"), where)
            caps = rec["captions"]
            if not isinstance(caps, list) or len(caps) != 2 or not all(isinstance(c, str) for c in caps):
                raise AnnotationError(f"{where}: triplet {i} must have exactly two captions, got {caps!r}")
            targets: tuple[str, ...] = ()
            if "target" in rec:
                if rec["target"] not in gallery:
                    raise AnnotationError(
                        f"{where}: target {rec['target']!r} of triplet {i} is not in split.{cat}.{self.split}.json"
                    )
                targets = (rec["target"],)
            ref = rec["candidate"]
            self.queries.append(
                Query(
                    query_id=str(i) if self.category != "all" else f"{cat}/{i}",
                    reference=ImageRef(ref, self.image_dir / f"{ref}{self.extension}"),
                    texts=(join_captions(caps[0], caps[1]), join_captions(caps[1], caps[0])),
                    target_ids=targets,
                )
            )

    def _detect_extension(self) -> str:
        """The extension of the first few images found (``.png`` when there are no images, e.g. when
        only re-scoring features); :meth:`load_image` still tries the others per file."""
        if self.image_dir.is_dir():
            for path in itertools.islice(self.image_dir.iterdir(), 20):
                if path.suffix.lower() in EXTENSIONS:
                    return path.suffix
        return ".png"

    def load_image(self, ref: ImageRef) -> Image.Image:
        if ref.path.is_file():
            return load_rgb(ref.path)
        for ext in EXTENSIONS:
            alt = ref.path.with_suffix(ext)
            if alt.is_file():
                return load_rgb(alt)
        tried = ", ".join(str(ref.path.with_suffix(e)) for e in EXTENSIONS)
        raise ImageLoadError(f"FashionIQ image {ref.image_id} is missing; looked for {tried}")

    def score(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, float]:
        if not self.labelled:
            raise ValueError(f"FashionIQ {self.split} has no targets (they were never released)")
        out: dict[str, float] = {}
        for cat, (first, count, positions) in self.parts.items():
            local = {self.gallery[p].image_id: j for j, p in enumerate(positions)}
            target = torch.tensor([local[q.target_ids[0]] for q in self.queries[first : first + count]])
            metrics = fashioniq_recall(
                query_feats[first : first + count], gallery_feats[torch.tensor(positions)], target
            )
            out.update(metrics if self.category != "all" else {f"{cat}/{k}": v for k, v in metrics.items()})
        if self.category == "all":
            for k in (10, 50):  # the papers' average: the unweighted mean over categories, never pooled
                out[f"recall@{k}"] = sum(out[f"{c}/recall@{k}"] for c in self.categories) / len(
                    self.categories
                )
        return out
