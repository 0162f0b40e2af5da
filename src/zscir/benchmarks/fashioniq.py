"""FashionIQ (Wu et al., CVPR 2021): dress, shirt and toptee, each scored on its own gallery.

Layout (``XiaoxiaoGuo/fashion-iq`` + the images every peer reads)::

    ROOT/captions/cap.<category>.<split>.json        [{"candidate", "target", "captions": [c0, c1]}, ...]
    ROOT/image_splits/split.<category>.<split>.json  ["<asin>", ...]
    ROOT/images/<asin>.png  (or .jpg: SEARLE/CLIP4Cir use .jpg, Pic2Word .png; both are found)

Rules (``docs/benchmarks.md``, FashionIQ; SEARLE ``validate.py``): gallery = the category's split
list in file order; every triplet is a query (no de-duplication); the reference is NOT removed; the query
text is both caption orders, each caption ``strip('.?, ')``-ed and joined with " and ", their features
normalised, averaged and renormalised; recall@10/50 per category. ``category="all"`` scores the three
categories separately (``dress/recall@10``, ...) and reports their unweighted mean as ``recall@10`` /
``recall@50`` — the "average" of papers, never a recall pooled over all queries. Query ids are the
triplet's index in ``cap.<category>.<split>.json`` (``<category>/<index>`` with ``category="all"``).

``protocol="pli"`` reproduces PLI's evaluation (its ``data/fashionIQ.py`` and
``evaluators/metric_calculators.py``, the CoSMo "VAL" protocol), which differs in every rule:

* queries come from PLI's own lists ``ROOT/captions_pairs/fashion_iq-<split>-cap-<category>.txt`` (shipped
  in the PLI repository; one ``<cat>/<ref>.jpg;<cat>/<target>.jpg;<caption>`` line per caption, two lines
  per triplet, a subset of the official triplets). Each line is its own query (id: the line's index);
  its text is ``caps[i] + " and " + caps[i ± 1]`` (the other line of its pair: ``i + 1`` for even ``i``)
  from the raw captions, then :func:`~zscir.benchmarks.base.pli_caption` (``.`` -> ``dotmark``, ...);
* the gallery of a category is only the images named in its list (references and targets);
* the reference image is removed from its query's ranking.

Recall@10/50 per category and their mean as above; keys start with ``pli/``.

``protocol="pic2word"`` is the official protocol with Pic2Word's query text (its ``src/data.py:227-228``):
one caption order only, ``"{captions[1]} and {captions[0]}"``, the captions as written (not stripped).
Gallery, queries and scoring are the official ones; keys start with ``pic2word/``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from zscir.benchmarks.base import (
    AnnotationError,
    Benchmark,
    DatasetLayoutError,
    ImageLoadError,
    ImageRef,
    Query,
    check_root,
    ids_from_array,
    load_rgb,
    pli_caption,
    read_json,
    require_keys,
)
from zscir.metrics.functional import fashioniq_recall, fashioniq_recall_without_reference

OBTAIN = (
    "FashionIQ annotations: https://github.com/XiaoxiaoGuo/fashion-iq (captions/, image_splits/); images: "
    "see its README (image URLs; a mirror is linked from hongwang600/fashion-iq-metadata), saved as "
    "images/<asin>.png or images/<asin>.jpg."
)
CATEGORIES = ("dress", "shirt", "toptee")
OBTAIN_PLI = (
    "PLI's FashionIQ query lists: the PLI repository (https://github.com/Chen-Junyang-cn/PLI) ships them in "
    "data/fashionIQ/captions_pairs/; copy them to ROOT/captions_pairs/."
)
SPLITS = ("train", "val", "test")
EXTENSIONS = (".png", ".jpg", ".jpeg")


def join_captions(first: str, second: str) -> str:
    """SEARLE's query text for one caption order: each caption stripped of '.', '?', ',' and spaces
    at both ends, joined with " and " (an empty caption leaves its side empty)."""
    return f"{first.strip('.?, ')} and {second.strip('.?, ')}"


def pli_pairs_file(split: str, category: str) -> str:
    """Where PLI's query list of a category lies below the FashionIQ root."""
    return f"captions_pairs/fashion_iq-{split}-cap-{category}.txt"


class FashionIQ(Benchmark):
    kind = "fashioniq"
    protocols = ("official", "pli", "pic2word")

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        name: str | None = None,
        category: str | None = "all",
        protocol: str = "official",
    ):
        super().__init__(root, split, name, protocol)
        pli = protocol == "pli"
        self.excludes_reference = pli  # PLI removes the reference (scores and retrieval grids)
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
                for f in (
                    (pli_pairs_file(split, c),)
                    if pli
                    else (f"captions/cap.{c}.{split}.json", f"image_splits/split.{c}.{split}.json")
                )
            ],
            OBTAIN_PLI if pli else OBTAIN,
            "FashionIQ",
            optional=["images/"],
        )
        self.image_dir = self.root / "images"
        self.extension = self._detect_extension()
        #: per category: (first query position, query count, gallery positions in split-list order)
        self.parts: dict[str, tuple[int, int, list[int]]] = {}
        index: dict[str, int] = {}
        for cat in self.categories:
            if pli:  # PLI's gallery: the images its query list names, in order of first appearance
                pairs = self.pli_pairs(self.root, split, cat)
                names = list(dict.fromkeys(a for ref, target, _ in pairs for a in (ref, target)))
            else:
                names = self.split_list(self.root, split, cat)
            for asin in names:  # shirt and toptee share asins: one gallery entry (and feature) each
                if asin not in index:
                    index[asin] = len(self.gallery)
                    self.gallery.append(ImageRef(asin, self.image_dir / f"{asin}{self.extension}"))
            first = len(self.queries)
            if pli:
                self._pli_queries(cat, pairs)
            else:
                self._read_triplets(cat, set(names))
            self.parts[cat] = (first, len(self.queries) - first, [index[a] for a in names])
        if len({bool(q.target_ids) for q in self.queries}) > 1:
            raise AnnotationError(f"FashionIQ {split}: some triplets have a target and some do not")
        self.metric_names = tuple(
            self.metric_key(m)
            for m in (
                ("recall@10", "recall@50")
                if category != "all"
                else (*(f"{c}/recall@{k}" for c in CATEGORIES for k in (10, 50)), "recall@10", "recall@50")
            )
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

    @staticmethod
    def pli_pairs(root: Path, split: str, category: str) -> list[tuple[str, str, str]]:
        """PLI's query list of one category: ``(reference asin, target asin, caption)`` per line of
        ``captions_pairs/fashion_iq-<split>-cap-<category>.txt``, read as PLI's ``data/fashionIQ.py:88-91``
        does: the asins are the file stems of the first two ``;`` fields, the caption is the last field
        with only the line break removed (PLI's files end every caption with a space, which is kept).

        Raises:
            DatasetLayoutError: the file is missing.
            AnnotationError: a line has fewer than three fields, a reference is its own target, or the
                line count is odd (PLI joins line ``2i`` with ``2i + 1``).
        """
        where = pli_pairs_file(split, category)
        path = Path(root) / where
        if not path.is_file():
            raise DatasetLayoutError(f"missing PLI FashionIQ query list: {path}\n{OBTAIN_PLI}")
        with open(path, encoding="utf-8") as f:  # readlines: the line breaks PLI's reader sees
            lines = f.readlines()
        pairs = []
        for n, line in enumerate(lines, 1):
            fields = line.strip().split(";")
            if len(fields) < 3:
                raise AnnotationError(
                    f"{where}:{n}: expected '<ref path>;<target path>;<caption>', got {line!r}"
                )
            ref, target = (field.split("/")[-1].split(".")[0] for field in fields[:2])
            if ref == target:
                raise AnnotationError(f"{where}:{n}: the reference {ref} is its own target")
            pairs.append((ref, target, line.strip("\n").split(";")[-1]))
        if len(pairs) % 2:
            raise AnnotationError(
                f"{where}: {len(pairs)} lines; PLI joins line 2i with line 2i + 1 (a triplet's two captions), "
                "so the count must be even"
            )
        return pairs

    def _pli_queries(self, cat: str, pairs: list[tuple[str, str, str]]) -> None:
        """One query per line: its caption joined with the other caption of its pair (PLI
        ``data/fashionIQ.py:41-54``), the other way round on the pair's second line."""
        captions = [c for _, _, c in pairs]
        for i, (ref, target, caption) in enumerate(pairs):
            other = captions[i + 1] if i % 2 == 0 else captions[i - 1]
            self.queries.append(
                Query(
                    query_id=str(i) if self.category != "all" else f"{cat}/{i}",
                    reference=ImageRef(ref, self.image_dir / f"{ref}{self.extension}"),
                    texts=(pli_caption(caption + " and " + other),),
                    target_ids=(target,),
                )
            )

    @classmethod
    def infer_category(
        cls, root: str | Path, split: str, gallery_ids: object, protocol: str = "official"
    ) -> str:
        """The category whose gallery (split list; under ``protocol="pli"`` the images of PLI's query
        list) holds exactly ``gallery_ids`` (for re-scoring a features file without ``--category``);
        ``"all"`` when none matches on its own."""
        ids = set(ids_from_array(gallery_ids))
        for cat in CATEGORIES:
            if protocol == "pli":
                if (Path(root) / pli_pairs_file(split, cat)).is_file() and ids == {
                    a for ref, target, _ in cls.pli_pairs(Path(root), split, cat) for a in (ref, target)
                }:
                    return cat
            elif (Path(root) / f"image_splits/split.{cat}.{split}.json").is_file() and ids == set(
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
                    texts=(f"{caps[1]} and {caps[0]}",)
                    if self.protocol == "pic2word"
                    else (join_captions(caps[0], caps[1]), join_captions(caps[1], caps[0])),
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
            queries = self.queries[first : first + count]
            target = torch.tensor([local[q.target_ids[0]] for q in queries])
            feats = query_feats[first : first + count], gallery_feats[torch.tensor(positions)]
            if self.excludes_reference:  # PLI: the reference removed from its own ranking
                reference = torch.tensor([local[q.reference.image_id] for q in queries])
                metrics = fashioniq_recall_without_reference(*feats, target, reference)
            else:
                metrics = fashioniq_recall(*feats, target)
            out.update(metrics if self.category != "all" else {f"{cat}/{k}": v for k, v in metrics.items()})
        if self.category == "all":
            for k in (10, 50):  # the papers' average: the unweighted mean over categories, never pooled
                out[f"recall@{k}"] = sum(out[f"{c}/recall@{k}"] for c in self.categories) / len(
                    self.categories
                )
        return self.keyed(out)
