"""CIRR (Liu et al., ICCV 2021), dataset version rc2.

Two on-disk layouts are read:

* the one SEARLE, LinCIR and CLIP4Cir read: ``ROOT/cirr/{captions,image_splits}`` with images at
  ``ROOT/<relpath>`` (``ROOT/dev/...``, ``ROOT/test1/...``, ``ROOT/train/<n>/...``);
* the CIRR README's tree: ``ROOT/{captions,image_splits}`` with images under ``ROOT/img_raw/<relpath>``
  (``ROOT`` may also be its parent, holding ``cirr/{captions,image_splits,img_raw}``).

Rules (``docs/benchmarks.md``, CIRR): gallery = every image of ``split.rc2.<split>.json`` minus
the query's reference; the positive is ``target_hard``; the subset is ``img_set.members`` minus the
reference, ranked in the order of the reference-free global ranking. ``test1`` has no targets: it
writes the two server files instead.

``protocol="pli"`` (PLI's ``data/cirr.py`` and ``cirr_test_submission.py``): the same gallery, reference
removal and ranking rules, but each caption is rewritten by :func:`~zscir.benchmarks.base.pli_caption`
(``.`` -> ``dotmark``, ...) before the method sees it. Metric keys start with ``pli/`` and the server
files are named ``cirr_<split>_pli_recall.json`` / ``cirr_<split>_pli_recall_subset.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from zscir.benchmarks.base import (
    AnnotationError,
    Benchmark,
    DatasetLayoutError,
    ImageRef,
    Query,
    pli_caption,
    read_json,
    require_keys,
)
from zscir.benchmarks.submissions import validate_cirr
from zscir.metrics.functional import cirr_metrics
from zscir.retrieval.search import prepare_gallery, rank_candidates, topk_search

OBTAIN = (
    "CIRR annotations: https://github.com/Cuberick-Orion/CIRR (branch cirr_dataset: captions/, "
    "image_splits/); images: the NLVR2 raw images (CIRR README, 'Download CIRR dataset'), unpacked so "
    "that the relative paths of split.rc2.<split>.json (./dev/..., ./test1/..., ./train/<n>/...) resolve."
)
SPLITS = ("val", "test1")


class CIRR(Benchmark):
    kind = "cirr"
    metric_names = (
        "recall@1",
        "recall@5",
        "recall@10",
        "recall@50",
        "recall_subset@1",
        "recall_subset@2",
        "recall_subset@3",
    )
    submission_splits = ("test1",)
    protocols = ("official", "pli")

    def __init__(
        self, root: str | Path, split: str = "val", name: str | None = None, protocol: str = "official"
    ):
        super().__init__(root, split, name, protocol)
        if split not in SPLITS:
            hint = " (CIRR's test split is called 'test1')" if split == "test" else ""
            raise ValueError(f"CIRR split must be one of {SPLITS}, got {split!r}{hint}")
        ann_dir, image_dir = self._layout()
        cap_name, split_name = f"cap.rc2.{split}.json", f"split.rc2.{split}.json"
        captions = read_json(ann_dir / "captions" / cap_name, "CIRR captions file", OBTAIN)
        paths = read_json(ann_dir / "image_splits" / split_name, "CIRR image split file", OBTAIN)
        if not isinstance(paths, dict) or not isinstance(captions, list):
            raise AnnotationError(f"{ann_dir}: expected a dict in {split_name} and a list in {cap_name}")
        self.gallery = [ImageRef(name, image_dir / rel) for name, rel in paths.items()]
        index = self.gallery_index()
        seen: set[str] = set()
        for rec in captions:
            self.queries.append(self._query(rec, index, cap_name, split_name))
            if self.queries[-1].query_id in seen:
                raise AnnotationError(f"{cap_name}: pairid {rec['pairid']} appears twice")
            seen.add(self.queries[-1].query_id)
        labelled = {bool(q.target_ids) for q in self.queries}
        if len(labelled) > 1:
            raise AnnotationError(f"{cap_name}: some pairs have a target_hard and some do not")

    def _query(self, rec: dict, index: dict[str, int], where: str, split_name: str) -> Query:
        require_keys(rec, ("pairid", "reference", "caption", "img_set"), where)
        require_keys(rec["img_set"], ("members",), f"{where} img_set")
        pair, ref = rec["pairid"], rec["reference"]
        members = list(dict.fromkeys(rec["img_set"]["members"]))  # de-duplicated, order kept
        unknown = [
            n
            for n in [ref, *members, *([rec["target_hard"]] if "target_hard" in rec else [])]
            if n not in index
        ]
        if unknown:
            raise AnnotationError(f"{where}: pair {pair} names images not in {split_name}: {unknown}")
        subset = tuple(m for m in members if m != ref)
        targets: tuple[str, ...] = ()
        if "target_hard" in rec:
            target = rec["target_hard"]
            if target == ref:
                raise AnnotationError(f"{where}: pair {pair}: target_hard is the reference image")
            if target not in subset:
                raise AnnotationError(
                    f"{where}: pair {pair}: target_hard {target!r} is not in img_set.members"
                )
            targets = (target,)
        return Query(
            query_id=str(pair),
            reference=self.gallery[index[ref]],
            texts=(pli_caption(rec["caption"]) if self.protocol == "pli" else rec["caption"],),
            target_ids=targets,
            subset_ids=subset,
        )

    def _layout(self) -> tuple[Path, Path]:
        """(annotation folder, image root) for whichever of the two layouts ``root`` holds."""
        for ann_dir in (self.root / "cirr", self.root):
            if (ann_dir / "captions").is_dir() or (ann_dir / "image_splits").is_dir():
                if (ann_dir / "img_raw").is_dir() or (
                    ann_dir == self.root and not (self.root / "dev").is_dir()
                ):
                    return ann_dir, ann_dir / "img_raw"
                return ann_dir, self.root
        expected = "\n  ".join(
            str(self.root / p)
            for p in (
                f"cirr/captions/cap.rc2.{self.split}.json",
                f"cirr/image_splits/split.rc2.{self.split}.json",
                "dev/  test1/  train/<n>/   (images)",
            )
        )
        readme = "\n  ".join(
            str(self.root / p)
            for p in (
                f"captions/cap.rc2.{self.split}.json",
                f"image_splits/split.rc2.{self.split}.json",
                "img_raw/{dev,test1,train/<n>}/   (images)",
            )
        )
        raise DatasetLayoutError(
            f"{self.root} is not a CIRR root. Expected either (SEARLE layout)\n  {expected}\n"
            f"or (CIRR README layout)\n  {readme}\n{OBTAIN}"
        )

    def _indices(self) -> tuple[Tensor, Tensor]:
        """(reference index [Q], subset indices [Q, S] padded with -1)."""
        index = self.gallery_index()
        reference = torch.tensor([index[q.reference.image_id] for q in self.queries], dtype=torch.long)
        width = max((len(q.subset_ids) for q in self.queries), default=0)
        subset = torch.full((len(self.queries), width), -1, dtype=torch.long)
        for i, q in enumerate(self.queries):
            subset[i, : len(q.subset_ids)] = torch.tensor([index[m] for m in q.subset_ids], dtype=torch.long)
        return reference, subset

    def score(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, float]:
        if not self.labelled:
            raise ValueError(f"CIRR {self.split} has no targets; use submission() for the evaluation server")
        index = self.gallery_index()
        target = torch.tensor([index[q.target_ids[0]] for q in self.queries], dtype=torch.long)
        reference, subset = self._indices()
        return self.keyed(cirr_metrics(query_feats, gallery_feats, target, reference, subset))

    def submission(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, object]:
        """``cirr_<split>_recall.json`` (top-50 names, reference excluded) and
        ``cirr_<split>_recall_subset.json`` (top-3 of the subset), validated; ``cirr_<split>_pli_...``
        under ``protocol="pli"``."""
        reference, subset = self._indices()
        gallery_feats = prepare_gallery(gallery_feats)  # normalised and indexed once for both rankings
        top, _ = topk_search(query_feats, gallery_feats, 50, exclude=reference)
        names = [r.image_id for r in self.gallery]
        recall: dict[str, object] = {"version": "rc2", "metric": "recall"}
        recall_subset: dict[str, object] = {"version": "rc2", "metric": "recall_subset"}
        top_subset = rank_candidates(query_feats, gallery_feats, subset, 3)
        for i, query in enumerate(self.queries):
            recall[query.query_id] = [names[j] for j in top[i].tolist()]
            recall_subset[query.query_id] = [names[j] for j in top_subset[i].tolist() if j >= 0]
        validate_cirr(recall, recall_subset, self.queries, names)
        stem = f"cirr_{self.split}" + ("" if self.protocol == "official" else f"_{self.protocol}")
        return {f"{stem}_recall.json": recall, f"{stem}_recall_subset.json": recall_subset}
