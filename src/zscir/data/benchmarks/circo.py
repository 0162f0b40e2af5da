"""CIRCO (Baldrati et al., ICCV 2023): multiple ground truths per query over the COCO unlabeled set.

Layout (CIRCO README): ``ROOT/annotations/{val,test}.json``,
``ROOT/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`` and
``ROOT/COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg``.

Rules (``shared/reference/benchmarks.md`` §3): the gallery is the whole index, the reference is NOT
removed, every ``gt_img_ids`` entry is a positive; mAP@k normalises by min(k, #gt); recall@k counts
only ``target_img_id``.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from zscir.data.benchmarks.base import (
    AnnotationError,
    Benchmark,
    ImageRef,
    Query,
    check_root,
    read_json,
    require_keys,
)
from zscir.metrics.functional import circo_metrics
from zscir.retrieval.search import topk_search

OBTAIN = (
    "CIRCO annotations: https://github.com/miccunifi/CIRCO; images: COCO 2017 unlabeled "
    "(http://images.cocodataset.org/zips/unlabeled2017.zip and image_info_unlabeled2017.zip)."
)
SPLITS = ("val", "test")


class CIRCO(Benchmark):
    kind = "circo"
    metric_names = ("map@5", "map@10", "map@25", "map@50", "recall@5", "recall@10", "recall@25", "recall@50")

    def __init__(self, root: str | Path, split: str = "val", name: str | None = None):
        super().__init__(root, split, name)
        if split not in SPLITS:
            raise ValueError(f"CIRCO split must be one of {SPLITS}, got {split!r}")
        check_root(self.root, ["annotations/", "COCO2017_unlabeled/"], OBTAIN)
        info = read_json(
            self.root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json",
            "COCO unlabeled image info",
            OBTAIN,
        )
        if not isinstance(info, dict) or "images" not in info:
            raise AnnotationError("image_info_unlabeled2017.json: missing key 'images'")
        image_dir = self.root / "COCO2017_unlabeled" / "unlabeled2017"
        for im in info["images"]:
            require_keys(im, ("id", "file_name"), "image_info_unlabeled2017.json")
            self.gallery.append(ImageRef(str(im["id"]), image_dir / im["file_name"]))
        index = self.gallery_index()
        annotations = read_json(
            self.root / "annotations" / f"{split}.json", f"CIRCO {split} annotations", OBTAIN
        )
        for rec in annotations:
            require_keys(rec, ("id", "reference_img_id", "relative_caption"), f"annotations/{split}.json")
            ref = str(rec["reference_img_id"])
            if ref not in index:
                raise AnnotationError(
                    f"annotations/{split}.json: reference {ref} of query {rec['id']} is not in the image index"
                )
            gts = tuple(str(g) for g in rec.get("gt_img_ids", ()))
            if "target_img_id" in rec and (not gts or gts[0] != str(rec["target_img_id"])):
                raise AnnotationError(
                    f"annotations/{split}.json: query {rec['id']}: gt_img_ids must start with target_img_id"
                )
            missing = [g for g in gts if g not in index]
            if missing:
                raise AnnotationError(
                    f"annotations/{split}.json: ground truths {missing} of query {rec['id']} are not in the image index"
                )
            self.queries.append(
                Query(str(rec["id"]), self.gallery[index[ref]], (rec["relative_caption"],), gts)
            )

    def score(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, float]:
        if not self.labelled:
            raise ValueError(
                f"CIRCO {self.split} has no ground truths; use submission() for the evaluation server"
            )
        index = self.gallery_index()
        return circo_metrics(
            query_feats, gallery_feats, [[index[g] for g in q.target_ids] for q in self.queries]
        )

    def submission(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, object]:
        top, _ = topk_search(query_feats, gallery_feats, 50)
        ids = [int(r.image_id) for r in self.gallery]
        return {
            f"circo_{self.split}.json": {
                q.query_id: [ids[j] for j in top[i].tolist()] for i, q in enumerate(self.queries)
            }
        }
