"""CIRCO (Baldrati et al., ICCV 2023): multiple ground truths per query over the COCO unlabeled set.

Layout (CIRCO README): ``ROOT/annotations/{val,test}.json``,
``ROOT/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`` and
``ROOT/COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg`` (the ``file_name`` of the image info).

Rules (``docs/benchmarks.md``, CIRCO; the official ``src/evaluation.py`` of
https://github.com/miccunifi/CIRCO): the gallery is the
whole index in file order, the reference is NOT removed, every ``gt_img_ids`` entry is a positive;
mAP@k normalises by min(k, len(gt_img_ids)); recall@k counts only ``target_img_id``. Query ids must equal
their position in the annotation file (the official evaluator looks queries up by position).

``protocol="pli"`` (PLI's ``circo_test_submission.py``, which produced its published CIRCO numbers): the
query's reference image is removed from the ranking (its similarity set to −inf before the top 50), in
scores and in the submission file (``circo_<split>_pli.json``); metric keys start with ``pli/``. The
query features are the same under both protocols, so one features file is scored under either. (PLI's
``circo_val_submission.py`` keeps the reference; the val numbers here follow the test script, the one
behind the published numbers.)
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from zscir.benchmarks.base import (
    AnnotationError,
    Benchmark,
    ImageRef,
    Query,
    check_root,
    read_json,
    require_keys,
)
from zscir.benchmarks.submissions import validate_circo
from zscir.metrics.functional import average_precision_at_k, circo_metrics_from_ranking
from zscir.retrieval.search import topk_search

log = logging.getLogger(__name__)

OBTAIN = (
    "CIRCO annotations: https://github.com/miccunifi/CIRCO (annotations/); images and image info: COCO 2017 "
    "unlabeled (http://images.cocodataset.org/zips/unlabeled2017.zip and "
    "http://images.cocodataset.org/annotations/image_info_unlabeled2017.zip), unpacked into COCO2017_unlabeled/."
)
SPLITS = ("val", "test")
IMAGE_INFO = "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"


def coco_id(value: object, where: str) -> str:
    """A COCO image id as the canonical decimal string (ints and zero-padded strings alike)."""
    try:
        return str(int(value))
    except (TypeError, ValueError) as err:
        raise AnnotationError(f"{where}: {value!r} is not a COCO image id") from err


class CIRCO(Benchmark):
    kind = "circo"
    metric_names = ("map@5", "map@10", "map@25", "map@50", "recall@5", "recall@10", "recall@25", "recall@50")
    submission_splits = ("test",)
    protocols = ("official", "pli")
    queries_depend_on_protocol = False  # only the ranking rule differs

    def __init__(
        self, root: str | Path, split: str = "val", name: str | None = None, protocol: str = "official"
    ):
        super().__init__(root, split, name, protocol)
        self.excludes_reference = protocol == "pli"  # PLI removes the reference (scores and retrieval grids)
        if split not in SPLITS:
            raise ValueError(f"CIRCO split must be one of {SPLITS}, got {split!r}")
        ann = f"annotations/{split}.json"
        check_root(
            self.root, [ann, IMAGE_INFO], OBTAIN, "CIRCO", optional=["COCO2017_unlabeled/unlabeled2017/"]
        )
        self._read_index()
        annotations = read_json(self.root / ann, f"CIRCO {split} annotations", OBTAIN)
        if not isinstance(annotations, list):
            raise AnnotationError(f"{ann}: expected a list of queries")
        #: semantic aspects per query (val only), for the official per-aspect mAP@10
        self.aspects: list[tuple[str, ...]] = []
        for position, rec in enumerate(annotations):
            self.queries.append(self._query(rec, position, ann))
            self.aspects.append(tuple(rec.get("semantic_aspects", ())))
        if len({bool(q.target_ids) for q in self.queries}) > 1:
            raise AnnotationError(f"{ann}: some queries have ground truths and some do not")

    def _read_index(self) -> None:
        info = read_json(self.root / IMAGE_INFO, "COCO unlabeled image info", OBTAIN)
        if not isinstance(info, dict) or not isinstance(info.get("images"), list):
            raise AnnotationError(f"{IMAGE_INFO}: expected an object with an 'images' list")
        image_dir = self.root / "COCO2017_unlabeled" / "unlabeled2017"
        seen: set[str] = set()
        for im in info["images"]:
            require_keys(im, ("id", "file_name"), IMAGE_INFO)
            image_id = coco_id(im["id"], IMAGE_INFO)
            if image_id in seen:  # a duplicate would appear twice in a top-50 list: the server refuses those
                raise AnnotationError(f"{IMAGE_INFO}: image id {image_id} is listed twice")
            seen.add(image_id)
            self.gallery.append(ImageRef(image_id, image_dir / im["file_name"]))

    def _query(self, rec: dict, position: int, where: str) -> Query:
        require_keys(rec, ("id", "reference_img_id", "relative_caption"), where)
        index = self.gallery_index()
        if str(rec["id"]) != str(position):
            raise AnnotationError(
                f"{where}: the query at position {position} has id {rec['id']!r}; CIRCO query ids must equal "
                "their position (the official evaluator and server look queries up by position)"
            )
        ref = coco_id(rec["reference_img_id"], where)
        if ref not in index:
            raise AnnotationError(f"{where}: reference {ref} of query {position} is not in {IMAGE_INFO}")
        gts: tuple[str, ...] = ()
        if "gt_img_ids" in rec or "target_img_id" in rec:
            require_keys(rec, ("gt_img_ids", "target_img_id"), where)
            gts = tuple(coco_id(g, where) for g in rec["gt_img_ids"])
            if not gts or gts[0] != coco_id(rec["target_img_id"], where):
                raise AnnotationError(f"{where}: query {position}: gt_img_ids must start with target_img_id")
            missing = [g for g in gts if g not in index]
            if missing:
                raise AnnotationError(
                    f"{where}: ground truths {missing} of query {position} are not in {IMAGE_INFO}"
                )
            if len(set(gts)) != len(gts):
                # kept as given: the official evaluator divides by len(gt_img_ids), duplicates included
                log.warning("%s: query %d lists a ground truth twice: %s", where, position, list(gts))
        return Query(str(position), self.gallery[index[ref]], (rec["relative_caption"],), gts)

    @staticmethod
    def canonical_id(value: str) -> str:
        return str(int(value)) if value.strip().isdigit() else value

    def _top50(self, query_feats: Tensor, gallery_feats: Tensor) -> Tensor:
        """[Q, 50] gallery indices, best first; the reference left out under ``protocol="pli"``."""
        exclude = None
        if self.excludes_reference:
            index = self.gallery_index()
            exclude = torch.tensor([index[q.reference.image_id] for q in self.queries], dtype=torch.long)
        return topk_search(query_feats, gallery_feats, 50, exclude=exclude)[0]

    def score(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, float]:
        if not self.labelled:
            raise ValueError(
                f"CIRCO {self.split} has no ground truths; use submission() for the evaluation server"
            )
        index = self.gallery_index()
        positives = [[index[g] for g in q.target_ids] for q in self.queries]
        ranked = self._top50(query_feats, gallery_feats)
        out = circo_metrics_from_ranking(ranked, positives)
        # the official evaluator's semantic mAP@10: mean AP@10 over the queries tagged with each aspect
        ap10 = average_precision_at_k(ranked.cpu(), positives, 10)
        by_aspect: dict[str, list[float]] = defaultdict(list)
        for ap, aspects in zip(ap10.tolist(), self.aspects):
            for aspect in aspects:
                by_aspect[aspect].append(ap)
        for aspect in sorted(by_aspect):
            out[f"semantic_map@10/{aspect}"] = 100.0 * sum(by_aspect[aspect]) / len(by_aspect[aspect])
        return self.keyed(out)

    def submission(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, object]:
        """``circo_<split>.json`` (``circo_<split>_pli.json`` under ``protocol="pli"``):
        ``{"<query id>": [50 image ids (int)]}``, validated."""
        top = self._top50(query_feats, gallery_feats)
        ids = [int(r.image_id) for r in self.gallery]
        sub = {q.query_id: [ids[j] for j in top[i].tolist()] for i, q in enumerate(self.queries)}
        pli = self.protocol == "pli"
        validate_circo(sub, self.queries, [r.image_id for r in self.gallery], exclude_reference=pli)
        return {f"circo_{self.split}{'_pli' if pli else ''}.json": sub}
