"""GeneCIS (Vaze et al., CVPR 2023): conditional similarity over small per-query candidate sets.

Layout (``facebookresearch/genecis``; its ``config.py`` has three separate paths, here found under one
root unless ``vg_dir`` / ``coco_dir`` say otherwise)::

    ROOT/genecis/<task>.json   (or ROOT/<task>.json)   the repo's template files, task one of
                                                         focus_attribute, change_attribute, focus_object, change_object
    ROOT/VG_100K_all/<image_id>.jpg                      Visual Genome 1.2 (attribute tasks), ids not padded
    ROOT/val2017/<12-digit id>.jpg                       COCO 2017 val (object tasks)

Each template is ``{"condition", "reference", "target", "gallery": [...]}``; object-task images are
``{"val_image_id": int}``, attribute-task images VAW instances ``{"image_id", "instance_bbox": [x, y, w, h]}``.

Rules (``docs/benchmarks.md``, GeneCIS; ``genecis/datasets/vaw_dataset.py``, ``eval_functions.py`` of
https://github.com/facebookresearch/genecis):
candidates = ``[target] + gallery`` with the target at index 0; recall@1/2/3 = share of templates whose
target is among the top k; a gallery item identical to the target (same image, same box) ties with it and
the tie counts for the target. Attribute images are crops: the box is dilated by 0.7 of its size to the
left and top only (``right = left + 1.7 w``, clamped to the image), cropped with Pillow's rounding, and
padded to a square with black, the crop centred. One Visual Genome image yields several crops, so a
crop's id is ``<image_id>:<x>,<y>,<w>,<h>`` (the box as floats, e.g. ``2373241:10.0,8.5,12.0,10.0``).

``protocol="pli"`` (PLI's ``genecis_eval.py``): the same templates, candidates and recall, but the query
is not the method's composition: it is :func:`pli_query`, ``normalize(0.5 · f_img(ref) + 0.5 · f_txt(cond))``
on the *unnormalised* tower features (PLI's inference weight is ignored there). Because that is a rule of
the protocol, not of a method, it lives here as :attr:`query_rule`; the evaluation loop applies it to the
raw tower features the method hands over (``RetrievalMethod.encode_towers``), and refuses methods whose
query is not built from their towers. PLI's image-only switch (``img_weight > 1``) is not reproduced
(evaluate ``method=image_only`` for that). Metric keys start with ``pli/``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from zscir.benchmarks.base import (
    AnnotationError,
    Benchmark,
    DatasetLayoutError,
    ImageRef,
    Query,
    ids_from_array,
    load_rgb,
    read_json,
    require_keys,
)
from zscir.metrics.functional import genecis_recall
from zscir.retrieval.search import check_finite, normalize

OBTAIN = (
    "GeneCIS templates: https://github.com/facebookresearch/genecis (genecis/*.json); images: Visual Genome 1.2 "
    "(VG_100K and VG_100K_2 merged into VG_100K_all/, https://visualgenome.org/api/v0/api_home.html) and "
    "COCO 2017 val (http://images.cocodataset.org/zips/val2017.zip); see the repo's DOWNLOAD.md."
)
TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
SPLITS = ("val", "test")  # GeneCIS has one evaluation set; either name selects it
DILATION = 0.7


def dilated_box(bbox: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """GeneCIS's crop box (left, top, right, bottom) for a VAW ``[x, y, w, h]`` box in a ``width`` ×
    ``height`` image. The box grows by 0.7·w / 0.7·h to the left and top only: ``right = left + 1.7 w``
    is ``x + w`` unless ``left`` was clamped at 0 — the official quirk, kept on purpose."""
    x, y, w, h = bbox
    left, top = max(0, x - DILATION * w), max(0, y - DILATION * h)
    right, bottom = min(width, left + (1 + DILATION) * w), min(height, top + (1 + DILATION) * h)
    return left, top, right, bottom


def expand_to_square(image: Image.Image) -> Image.Image:
    """Pad with black to a square, the image centred (offset rounded down), as GeneCIS does."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), (0,) * len(image.getbands()))
    out.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def pli_query(image: Tensor, text: Tensor) -> Tensor:
    """PLI's GeneCIS query (``genecis_eval.py:110-116``, compositor ``None``):
    ``normalize(0.5 · image + 0.5 · text)`` of the *unnormalised* tower features, in float32.

    Args:
        image: [B, D] reference-image features as the image tower outputs them.
        text: [B, D] condition-text features as the text tower outputs them.

    Returns:
        [B, D] L2-normalised queries. The larger-norm feature dominates: the two are not normalised first.
    """
    return normalize(0.5 * image.float() + 0.5 * text.float())


def crop_instance(image: Image.Image, bbox: Sequence[float]) -> Image.Image:
    """A VAW instance as GeneCIS shows it: dilated crop (Pillow rounds the float box) padded to a square."""
    return expand_to_square(image.crop(dilated_box(bbox, *image.size)))


class GeneCIS(Benchmark):
    kind = "genecis"
    metric_names = ("recall@1", "recall@2", "recall@3")
    protocols = ("official", "pli")

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        name: str | None = None,
        task: str | None = None,
        vg_dir: str | None = None,
        coco_dir: str | None = None,
        protocol: str = "official",
    ):
        # the four tasks are four benchmarks: each one's metrics and results carry its task in the name
        super().__init__(root, split, name or f"genecis_{task}", protocol)
        if protocol == "pli":
            self.query_rule = pli_query
        if split not in SPLITS:
            raise ValueError(f"GeneCIS has one evaluation set; split must be one of {SPLITS}, got {split!r}")
        if task not in TASKS:
            raise ValueError(f"GeneCIS needs a task (benchmark.task / --task), one of {TASKS}; got {task!r}")
        self.task = task
        self.vg_dir = Path(vg_dir).expanduser() if vg_dir else self.root / "VG_100K_all"
        self.coco_dir = Path(coco_dir).expanduser() if coco_dir else self.root / "val2017"
        where = self._annotation_file()
        templates = read_json(where, f"GeneCIS {task} templates", OBTAIN)
        if not isinstance(templates, list):
            raise AnnotationError(f"{where}: expected a list of templates")
        #: crop id -> VAW [x, y, w, h], for the attribute tasks' images
        self.boxes: dict[str, tuple[float, ...]] = {}
        index: dict[str, int] = {}
        for i, rec in enumerate(templates):
            require_keys(rec, ("condition", "reference", "target", "gallery"), f"{where.name}[{i}]")
            if not isinstance(rec["gallery"], list) or not rec["gallery"]:
                raise AnnotationError(f"{where.name}[{i}]: 'gallery' must be a non-empty list")
            candidates = [self._image(c, f"{where.name}[{i}]") for c in [rec["target"], *rec["gallery"]]]
            for ref in candidates:  # the gallery: every distinct candidate image, in order of appearance
                if ref.image_id not in index:
                    index[ref.image_id] = len(self.gallery)
                    self.gallery.append(ref)
            self.queries.append(
                Query(
                    query_id=str(i),
                    reference=self._image(rec["reference"], f"{where.name}[{i}]"),
                    texts=(str(rec["condition"]),),
                    target_ids=(candidates[0].image_id,),
                    candidate_ids=tuple(c.image_id for c in candidates),
                )
            )

    def _annotation_file(self) -> Path:
        options = [self.root / "genecis" / f"{self.task}.json", self.root / f"{self.task}.json"]
        for path in options:
            if path.is_file():
                return path
        listing = "\n  ".join(str(p) for p in options)
        raise DatasetLayoutError(
            f"{self.root} is not a GeneCIS root: none of\n  {listing}\nexists. Images are read from "
            f"{self.vg_dir} (attribute tasks) and {self.coco_dir} (object tasks); set benchmark.vg_dir / "
            f"benchmark.coco_dir if they live elsewhere.\n{OBTAIN}"
        )

    def _image(self, rec: object, where: str) -> ImageRef:
        if isinstance(rec, dict) and "val_image_id" in rec:  # object tasks: a whole COCO val image
            try:
                image_id = int(rec["val_image_id"])
            except (TypeError, ValueError) as err:
                raise AnnotationError(f"{where}: bad val_image_id {rec['val_image_id']!r}") from err
            return ImageRef(str(image_id), self.coco_dir / f"{image_id:012d}.jpg")
        require_keys(rec, ("image_id", "instance_bbox"), where)  # attribute tasks: a VAW instance crop
        box = rec["instance_bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, int | float) for v in box):
            raise AnnotationError(f"{where}: instance_bbox must be [x, y, w, h], got {box!r}")
        # repr(float): the same box written as 10 or 10.0 is one crop (and one gallery entry)
        crop_id = f"{rec['image_id']}:{','.join(repr(float(v)) for v in box)}"
        self.boxes[crop_id] = tuple(box)
        return ImageRef(crop_id, self.vg_dir / f"{rec['image_id']}.jpg")

    def load_image(self, ref: ImageRef) -> Image.Image:
        image = load_rgb(ref.path)  # RGB first: black padding then means black whatever the file's mode
        box = self.boxes.get(ref.image_id)
        return image if box is None else crop_instance(image, box)

    # ---- scoring ------------------------------------------------------------------------------
    def _candidate_index(self) -> Tensor:
        """[Q, C] gallery positions of each query's candidates, -1 padding shorter rows."""
        index = self.gallery_index()
        width = max((len(q.candidate_ids) for q in self.queries), default=0)
        out = torch.full((len(self.queries), width), -1, dtype=torch.long)
        for i, q in enumerate(self.queries):
            out[i, : len(q.candidate_ids)] = torch.tensor([index[c] for c in q.candidate_ids])
        return out

    def score(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, float]:
        cand = self._candidate_index()
        return self.keyed(genecis_recall(query_feats, gallery_feats[cand.clamp(min=0)], cand >= 0))

    def feature_arrays(self, query_feats: Tensor, gallery_feats: Tensor) -> dict[str, np.ndarray]:
        """``query_ids`` [Q], ``query_feats`` [Q, D], ``candidate_ids`` [Q, C] ("" pads shorter rows) and
        ``candidate_feats`` [Q, C, D] (zeros there), candidate 0 = the target; ``protocol`` when not
        official."""
        cand = self._candidate_index()
        feats = gallery_feats.detach().float().cpu()[cand.clamp(min=0)]
        feats[cand < 0] = 0
        ids = np.full(cand.shape, "", dtype=object)
        for i, q in enumerate(self.queries):
            ids[i, : len(q.candidate_ids)] = q.candidate_ids
        return {
            "query_ids": np.array([q.query_id for q in self.queries], dtype=str),
            "query_feats": query_feats.detach().float().cpu().numpy(),
            "candidate_ids": ids.astype(str),
            "candidate_feats": feats.numpy(),
            **self.protocol_array(),
        }

    def score_arrays(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Recall from ``query_feats`` and ``candidate_feats`` (index 0 = target), checked against the
        templates: one row per template (in ``query_ids`` order when given), each with its candidates."""
        self.check_protocol(arrays)
        missing = [k for k in ("query_feats", "candidate_feats") if k not in arrays]
        if missing:
            raise ValueError(f"{self.name}: the features file has no {missing} (it has {sorted(arrays)})")
        queries, cands = np.asarray(arrays["query_feats"]), np.asarray(arrays["candidate_feats"])
        n = len(self.queries)
        if queries.ndim != 2 or cands.ndim != 3 or queries.shape[0] != n or cands.shape[0] != n:
            raise ValueError(
                f"{self.name}: expected query_feats [{n}, D] and candidate_feats [{n}, C, D], "
                f"got {queries.shape} and {cands.shape}"
            )
        order = np.arange(n)
        if "query_ids" in arrays:
            ids = ids_from_array(arrays["query_ids"])
            position = {x: i for i, x in enumerate(ids)}
            if sorted(position) != sorted(q.query_id for q in self.queries) or len(position) != len(ids):
                raise ValueError(f"{self.name}: query_ids are not the template indices 0..{n - 1}")
            order = np.array([position[q.query_id] for q in self.queries])
        queries, cands = queries[order], cands[order]
        valid = np.zeros(cands.shape[:2], dtype=bool)
        given = np.asarray(arrays["candidate_ids"])[order] if "candidate_ids" in arrays else None
        for i, q in enumerate(self.queries):
            c = len(q.candidate_ids)
            if c > cands.shape[1]:
                raise ValueError(
                    f"{self.name}: template {q.query_id} has {c} candidates, the file {cands.shape[1]}"
                )
            valid[i, :c] = True
            if given is not None:
                self._check_candidates(q, ids_from_array(given[i])[:c])
        check_finite(queries, f"{self.name} query", [q.query_id for q in self.queries])
        names = [f"{q.query_id}/{c}" for q in self.queries for c in q.candidate_ids]  # template/candidate
        check_finite(cands[valid], f"{self.name} candidate", names)
        return self.keyed(
            genecis_recall(
                torch.from_numpy(queries).float(), torch.from_numpy(cands).float(), torch.from_numpy(valid)
            )
        )

    def _check_candidates(self, q: Query, given: list[str]) -> None:
        """Candidate ids must name the same images in the same order. Only the image id (the leading
        digits) is compared: other tools write crop boxes differently (``2373241_10_8_12_10``)."""
        if [_image_part(c) for c in given] != [_image_part(c) for c in q.candidate_ids]:
            raise ValueError(
                f"{self.name}: candidate_ids of template {q.query_id} are {given[:4]}..., expected "
                f"{list(q.candidate_ids[:4])}... (target first, then the template's gallery)"
            )

    def submission_arrays(self, arrays: Mapping[str, np.ndarray]) -> dict[str, object]:
        return {}


def _image_part(candidate_id: str) -> str:
    match = re.match(r"\d+", candidate_id.strip())
    return match.group(0).lstrip("0") if match else candidate_id
