"""CIRR (Liu et al., ICCV 2021), dataset version rc2.

Two on-disk layouts are read:

* the one SEARLE, LinCIR and CLIP4Cir read: ``ROOT/cirr/{captions,image_splits}`` with images at
  ``ROOT/<relpath>`` (``ROOT/dev/...``, ``ROOT/test1/...``, ``ROOT/train/<n>/...``);
* the CIRR README's tree: ``ROOT/{captions,image_splits}`` with images under ``ROOT/img_raw/<relpath>``.

Rules (``shared/reference/benchmarks.md`` §2): gallery = every image of ``split.rc2.<split>.json`` minus
the query's reference; the positive is ``target_hard``; the subset is ``img_set.members`` minus the
reference, ranked in the order of the global ranking.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from zscir.data.benchmarks.base import (
    AnnotationError,
    Benchmark,
    DatasetLayoutError,
    ImageRef,
    Query,
    check_root,
    read_json,
    require_keys,
)
from zscir.metrics.functional import cirr_metrics
from zscir.retrieval.search import topk_search

OBTAIN = (
    "CIRR annotations: https://github.com/Cuberick-Orion/CIRR (branch cirr_dataset); images: the NLVR2 "
    "raw images (see the CIRR README, 'Download CIRR dataset')."
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

    def __init__(self, root: str | Path, split: str = "val", name: str | None = None):
        super().__init__(root, split, name)
        if split not in SPLITS:
            hint = " (CIRR's test split is called 'test1')" if split == "test" else ""
            raise ValueError(f"CIRR split must be one of {SPLITS}, got {split!r}{hint}")
        ann_dir, image_dir = self._layout()
        captions = read_json(ann_dir / "captions" / f"cap.rc2.{split}.json", "CIRR captions file", OBTAIN)
        paths = read_json(
            ann_dir / "image_splits" / f"split.rc2.{split}.json", "CIRR image split file", OBTAIN
        )
        if not isinstance(paths, dict) or not isinstance(captions, list):
            raise AnnotationError(
                f"{ann_dir}: expected a dict in split.rc2.{split}.json and a list in cap.rc2.{split}.json"
            )
        self.gallery = [ImageRef(name, image_dir / rel) for name, rel in paths.items()]
        index = self.gallery_index()
        where = f"cap.rc2.{split}.json"
        for rec in captions:
            require_keys(rec, ("pairid", "reference", "caption", "img_set"), where)
            require_keys(rec["img_set"], ("members",), where + " img_set")
            ref = rec["reference"]
            if ref not in index:
                raise AnnotationError(
                    f"{where}: reference {ref!r} of pair {rec['pairid']} is not in split.rc2.{split}.json"
                )
            targets = (rec["target_hard"],) if "target_hard" in rec else ()
            for t in targets:
                if t not in index:
                    raise AnnotationError(
                        f"{where}: target {t!r} of pair {rec['pairid']} is not in split.rc2.{split}.json"
                    )
            self.queries.append(
                Query(
                    query_id=str(rec["pairid"]),
                    reference=self.gallery[index[ref]],
                    texts=(rec["caption"],),
                    target_ids=targets,
                    subset_ids=tuple(m for m in rec["img_set"]["members"] if m != ref),
                )
            )

    def _layout(self) -> tuple[Path, Path]:
        """(annotation folder, image root) for whichever of the two layouts ``root`` holds."""
        if (self.root / "cirr" / "captions").is_dir():
            return self.root / "cirr", self.root
        if (self.root / "captions").is_dir():
            return self.root, self.root / "img_raw"
        check_root(self.root, ["cirr/captions/", "cirr/image_splits/", "dev/", "test1/"], OBTAIN)
        raise DatasetLayoutError(f"{self.root}: no cirr/captions/ or captions/ folder\n{OBTAIN}")

    def _indices(self) -> tuple[Tensor, Tensor, Tensor]:
        index = self.gallery_index()
        target = torch.tensor([index[q.target_ids[0]] for q in self.queries])
        reference = torch.tensor([index[q.reference.image_id] for q in self.queries])
        subset = torch.tensor([[index[m] for m in q.subset_ids] for q in self.queries])
        return target, reference, subset

    def score(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, float]:
        if not self.labelled:
            raise ValueError(f"CIRR {self.split} has no targets; use submission() for the evaluation server")
        target, reference, subset = self._indices()
        return cirr_metrics(query_feats, gallery_feats, target, reference, subset)

    def submission(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, object]:
        index = self.gallery_index()
        reference = torch.tensor([index[q.reference.image_id] for q in self.queries])
        top, _ = topk_search(query_feats, gallery_feats, 50, exclude=reference)
        subset = torch.tensor([[index[m] for m in q.subset_ids] for q in self.queries])
        names = [r.image_id for r in self.gallery]
        recall = {"version": "rc2", "metric": "recall"}
        recall_subset = {"version": "rc2", "metric": "recall_subset"}
        sub_scores = torch.einsum("qd,qcd->qc", _norm(query_feats), _norm(gallery_feats)[subset])
        for i, q in enumerate(self.queries):
            recall[q.query_id] = [names[j] for j in top[i].tolist()]
            order = torch.sort(sub_scores[i], descending=True, stable=True).indices[:3]
            recall_subset[q.query_id] = [q.subset_ids[j] for j in order.tolist()]
        return {
            f"cirr_{self.split}_recall.json": recall,
            f"cirr_{self.split}_recall_subset.json": recall_subset,
        }


def _norm(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)
