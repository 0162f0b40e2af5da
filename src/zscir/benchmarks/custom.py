"""Your own labelled composed-retrieval set (``benchmark=custom``), scored like CIRCO.

Layout (every path in the annotations is relative to the image folder, with ``/`` separators)::

    <root>/
      images/                 the images; the gallery is every image here (recursively), unless `gallery`
      <split>.jsonl           one query per line (val.jsonl, test.jsonl, ...)
      gallery.txt             optional (option `gallery`): the gallery, one image path per line

    {"reference": "shoes/0001.jpg", "caption": "is red with a lower heel", "targets": ["shoes/0107.jpg"]}

``targets`` lists every image that answers the query, the main one first; ``"id"`` (optional) names
the query (default: its line number). Blank lines and lines starting with ``#`` are skipped. Every
malformed line (not JSON, a missing key, an image that is not there, a target outside the gallery) is
reported together with its line number before anything is encoded.

Scores (percent), as the CIRCO evaluator computes them over the top 50: ``map@{5,10,25,50}`` over all
targets (AP@k normalised by min(k, number of targets)) and ``recall@{1,5,10,25,50}`` of the main target.
The reference stays in the gallery unless ``exclude_reference`` (then it is never retrieved, as in CIRR).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from zscir.benchmarks.base import AnnotationError, Benchmark, ImageRef, Query
from zscir.metrics.functional import circo_metrics_from_ranking
from zscir.retrieval.search import topk_search
from zscir.utils.images import DatasetLayoutError, list_images

#: errors listed in one AnnotationError (the count of the rest is given)
SHOWN_ERRORS = 20


class Custom(Benchmark):
    kind = "custom"
    metric_names = (
        "map@5",
        "map@10",
        "map@25",
        "map@50",
        "recall@1",
        "recall@5",
        "recall@10",
        "recall@25",
        "recall@50",
    )

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        name: str | None = None,
        images: str = "images",
        annotations: str | None = None,
        gallery: str | None = None,
        exclude_reference: bool = False,
    ):
        """
        Args:
            root: the dataset folder.
            split: names the annotation file ``<root>/<split>.jsonl`` unless ``annotations`` is given.
            images: the image folder (relative to ``root``, or absolute).
            annotations: the JSONL file (relative to ``root``, or absolute).
            gallery: a file listing the gallery images (relative to ``root``, or absolute); None: every
                image in the image folder.
            exclude_reference: leave each query's reference image out of its ranking.

        Raises:
            DatasetLayoutError: a missing folder or file, an empty image folder or gallery.
            AnnotationError: malformed lines, each with its line number.
        """
        super().__init__(root, split, name)
        self.excludes_reference = exclude_reference
        self.image_dir = self.root / images
        path = self.root / (annotations or f"{split}.jsonl")
        if not path.is_file():
            raise DatasetLayoutError(
                f"custom benchmark: no annotation file {path}; write one query per line, e.g. "
                '{"reference": "a.jpg", "caption": "in red", "targets": ["b.jpg"]} (see zscir/benchmarks/custom.py)'
            )
        self.gallery = self._read_gallery(gallery)
        self._read_queries(path)

    def _read_gallery(self, gallery: str | None) -> list[ImageRef]:
        """The gallery: image ids are paths relative to the image folder, as the annotations write them."""
        if gallery is None:
            return [
                ImageRef(f.relative_to(self.image_dir).as_posix(), f) for f in list_images(self.image_dir)
            ]
        listing = self.root / gallery
        if not listing.is_file():
            raise DatasetLayoutError(f"custom benchmark: no gallery list {listing}")
        files, errors = [], []
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            file = self.image_dir / entry
            if not file.is_file():
                errors.append(f"{listing}:{number}: no image {file}")
            files.append(ImageRef(entry, file))
        _raise(errors, listing)
        if not files:
            raise DatasetLayoutError(f"custom benchmark: the gallery list {listing} names no image")
        return files

    def _read_queries(self, path: Path) -> None:
        index = self.gallery_index()
        errors: list[str] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(f"{where}: not valid JSON ({err.msg})")
                continue
            problem = _check_record(record)
            if problem:
                errors.append(f"{where}: {problem}")
                continue
            reference = self.image_dir / record["reference"]
            if not reference.is_file():
                errors.append(f"{where}: reference image {reference} does not exist")
                continue
            outside = [t for t in record["targets"] if t not in index]
            if outside:
                errors.append(f"{where}: target(s) {outside} are not in the gallery")
                continue
            ref = ImageRef(record["reference"], reference)
            query_id = str(record.get("id", number))
            self.queries.append(Query(query_id, ref, (record["caption"],), tuple(record["targets"])))
        _raise(errors, path)
        if not self.queries:
            raise AnnotationError(f"{path} holds no query")
        ids = [q.query_id for q in self.queries]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise AnnotationError(f"{path}: query id(s) {twice[:SHOWN_ERRORS]} are used twice")
        if len({bool(q.target_ids) for q in self.queries}) > 1:
            raise AnnotationError(f"{path}: some queries list targets and some do not")

    def score(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, float]:
        if not self.labelled:
            raise ValueError(f"{self.name}: the queries list no targets, so there is nothing to score")
        index = self.gallery_index()
        exclude = None
        if self.excludes_reference:
            exclude = torch.tensor([index.get(q.reference.image_id, -1) for q in self.queries])
        ranked = topk_search(query_feats, gallery_feats, 50, exclude=exclude)[0]
        positives = [[index[t] for t in q.target_ids] for q in self.queries]
        out = circo_metrics_from_ranking(ranked, positives)
        first = torch.tensor([p[0] for p in positives])
        out["recall@1"] = 100.0 * (ranked[:, 0].cpu() == first).double().mean().item()
        return self.keyed({m: out[m] for m in type(self).metric_names})


def _check_record(record: object) -> str | None:
    """What is wrong with one parsed line, or None."""
    if not isinstance(record, dict):
        return f"expected an object with keys reference, caption, targets; got {json.dumps(record)[:120]}"
    missing = [k for k in ("reference", "caption", "targets") if k not in record]
    if missing:
        return f"missing key(s) {missing}"
    if not isinstance(record["reference"], str) or not isinstance(record["caption"], str):
        return "reference and caption must be strings"
    targets = record["targets"]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        return "targets must be a list of image paths (strings)"
    if len(set(targets)) != len(targets):
        return f"a target is listed twice: {targets}"
    return None


def _raise(errors: list[str], path: Path) -> None:
    if errors:
        more = f"\n  ... and {len(errors) - SHOWN_ERRORS} more" if len(errors) > SHOWN_ERRORS else ""
        listing = "\n  ".join(errors[:SHOWN_ERRORS])
        raise AnnotationError(f"{len(errors)} bad line(s) in {path}:\n  {listing}{more}")
