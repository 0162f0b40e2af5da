"""Miniature copies of FashionIQ, CIRR, CIRCO and GeneCIS in their official on-disk layouts.

Each ``make_*`` writes a few tiny images and the annotation files, with the awkward cases real data has:
look-alike CIRR names inside one ``img_set``, two queries sharing a reference, grayscale / RGBA / palette /
CMYK images, 12-digit zero-padded CIRCO file names, empty and punctuated FashionIQ captions, shirt and
toptee galleries sharing images, a GeneCIS target repeated in its own gallery (an exact tie) and one
Visual Genome image cropped several times. Every query count is odd (the DDP sampler then pads).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 16)) -> Path:
    """A distinct noise image (seeded by the file name) saved in ``mode``: JPEG for .jpg, except modes
    JPEG cannot hold (P, RGBA), written as PNG under the .jpg name, as found in the wild."""
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    image = rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = path.suffix == ".jpg" and mode not in ("P", "RGBA")
    image.save(path, format="JPEG" if jpeg else "PNG", **({"quality": 95} if jpeg else {}))
    return path


def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


# ---- FashionIQ --------------------------------------------------------------------------------------
FIQ_SPLITS = {  # dress and shirt galleries exceed 10 images, so recall@10 can miss
    "dress": [f"B00DRESS{i:02d}" for i in range(1, 13)],
    "shirt": [
        "B00SHIRT01",
        "B00SHARED1",
        "B00SHIRT02",
        "B00SHARED2",
        *(f"B00SHIRT{i:02d}" for i in range(3, 10)),
    ],
    "toptee": ["B00TOPTE01", "B00SHARED2", "B00TOPTE02", "B00SHARED1"],  # shares two images with shirt
}
FIQ_VAL = {  # 3 + 3 + 1 triplets: the category mean differs from a recall pooled over all queries
    "dress": [
        {
            "target": "B00DRESS02",
            "candidate": "B00DRESS01",
            "captions": ["is shiny and silver.", "fit and flare"],
        },
        {"target": "B00DRESS04", "candidate": "B00DRESS01", "captions": [" is white, ", "has sleeves?"]},
        {"target": "B00DRESS05", "candidate": "B00DRESS03", "captions": ["", "is floral..."]},
    ],
    "shirt": [
        {"target": "B00SHARED1", "candidate": "B00SHIRT01", "captions": ["is blue", "has a collar"]},
        {"target": "B00SHIRT03", "candidate": "B00SHARED2", "captions": ["is darker", "is darker"]},
        {"target": "B00SHIRT02", "candidate": "B00SHIRT03", "captions": ["longer, and red", "."]},
    ],
    "toptee": [
        {"target": "B00SHARED1", "candidate": "B00SHARED2", "captions": ["?", "is striped ,"]},
    ],
}
FIQ_MODES = {"B00DRESS03": "L", "B00SHIRT02": "RGBA", "B00TOPTE01": "P", "B00SHARED2": "L"}


def make_fashioniq(root: Path, ext: str = ".png") -> Path:
    for cat, names in FIQ_SPLITS.items():
        _dump(root / "image_splits" / f"split.{cat}.val.json", names)
        _dump(root / "captions" / f"cap.{cat}.val.json", FIQ_VAL[cat])
        _dump(root / "image_splits" / f"split.{cat}.test.json", names)
        _dump(
            root / "captions" / f"cap.{cat}.test.json",
            [{"candidate": t["candidate"], "captions": t["captions"]} for t in FIQ_VAL[cat]],
        )
        for name in names:
            write_image(root / "images" / f"{name}{ext}", FIQ_MODES.get(name, "RGB"))
    return root


FIQ_PLI_PAIRS = {  # PLI's own query lists: per pair (reference, target, [caption line 1, caption line 2])
    "dress": [  # its gallery is all 12 dress images, in another order than the split list
        ("B00DRESS01", "B00DRESS02", ["is shiny and silver.", "fit and flare"]),
        ("B00DRESS01", "B00DRESS04", ["is white,", "has sleeves?"]),
        ("B00DRESS03", "B00DRESS05", ["is floral...", "is floral..."]),  # PLI's files repeat a lone caption
        ("B00DRESS06", "B00DRESS07", ["is red & short", "has a *star*"]),
        ("B00DRESS08", "B00DRESS09", ["is longer", "is darker"]),
        ("B00DRESS10", "B00DRESS11", ["is blue", "is blue"]),
        ("B00DRESS12", "B00DRESS06", ["is plain", "is plainer"]),
    ],
    "shirt": [  # the official triplet B00SHARED2 -> B00SHIRT03 is not in PLI's list
        ("B00SHIRT01", "B00SHARED1", ["is blue", "has a collar"]),
        ("B00SHIRT03", "B00SHIRT02", ["longer, and red", "."]),
    ],
    "toptee": [("B00SHARED2", "B00SHARED1", ["?", "is striped ,"])],
}


def make_fashioniq_pli_lists(root: Path, split: str = "val") -> Path:
    """PLI's FashionIQ query lists ``captions_pairs/fashion_iq-<split>-cap-<category>.txt`` in its format:
    ``<cat>/<ref>.jpg;<cat>/<target>.jpg;<caption> `` (a space ends every line's caption), two lines a pair."""
    for cat, pairs in FIQ_PLI_PAIRS.items():
        lines = [f"{cat}/{ref}.jpg;{cat}/{target}.jpg;{c} \n" for ref, target, caps in pairs for c in caps]
        path = root / "captions_pairs" / f"fashion_iq-{split}-cap-{cat}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines))
    return root


# ---- CIRR ---------------------------------------------------------------------------------------------
CIRR_VAL_IMAGES = [
    "dev-1-0-img0",
    "dev-1-0-img1",
    "dev-1-1-img0",
    "dev-11-0-img0",  # look-alikes of dev-1-1-img0 / dev-1-10-img0 (no substring matching allowed)
    "dev-1-10-img0",
    "dev-10-1-img0",
    "dev-2-0-img0",
    "dev-2-0-img1",
    "dev-3-0-img0",
]
_SET_A = ["dev-1-0-img0", "dev-1-0-img1", "dev-1-1-img0", "dev-11-0-img0", "dev-1-10-img0", "dev-10-1-img0"]
_SET_B = ["dev-2-0-img0", "dev-2-0-img1", "dev-3-0-img0", "dev-1-0-img0", "dev-11-0-img0", "dev-10-1-img0"]
CIRR_VAL = [  # pairid, reference, target_hard, members
    (12060, "dev-1-0-img0", "dev-1-1-img0", _SET_A),
    (12061, "dev-1-0-img0", "dev-1-10-img0", _SET_A),  # the same reference as 12060
    (305, "dev-2-0-img0", "dev-2-0-img1", _SET_B),
    (17, "dev-3-0-img0", "dev-11-0-img0", _SET_B),
    (18, "dev-10-1-img0", "dev-1-0-img0", _SET_A),
]
CIRR_TEST_IMAGES = [n.replace("dev-", "test1-") for n in CIRR_VAL_IMAGES]
CIRR_TEST = [
    (p + 1, r.replace("dev-", "test1-"), [m.replace("dev-", "test1-") for m in s]) for p, r, _, s in CIRR_VAL
]
CIRR_MODES = {"dev-2-0-img1": "L", "dev-1-10-img0": "RGBA", "dev-3-0-img0": "P"}


def make_cirr(root: Path, layout: str = "searle") -> Path:
    """``layout="searle"``: ROOT/cirr/{captions,image_splits} + ROOT/dev; ``"readme"``: ROOT/{captions,
    image_splits} + ROOT/img_raw/dev."""
    ann = root / "cirr" if layout == "searle" else root
    images = root if layout == "searle" else root / "img_raw"
    val = []
    for pair, ref, target, members in CIRR_VAL:
        val.append(
            {
                "pairid": pair,
                "reference": ref,
                "target_hard": target,
                "target_soft": {target: 1.0, ref: 0.5},  # never used: only target_hard counts
                "caption": f"change pair {pair}",
                "img_set": {"id": 7, "members": members, "reference_rank": 2, "target_rank": 3},
            }
        )
    test = [
        {
            "pairid": pair,
            "reference": ref,
            "caption": f"make pair {pair}",
            "img_set": {"id": 3, "members": members, "reference_rank": 1},
        }
        for pair, ref, members in CIRR_TEST
    ]
    for split, folder, names, caps in (
        ("val", "dev", CIRR_VAL_IMAGES, val),
        ("test1", "test1", CIRR_TEST_IMAGES, test),
    ):
        _dump(ann / "captions" / f"cap.rc2.{split}.json", caps)
        _dump(ann / "image_splits" / f"split.rc2.{split}.json", {n: f"./{folder}/{n}.png" for n in names})
        for n in names:
            write_image(images / folder / f"{n}.png", CIRR_MODES.get(n.replace("test1-", "dev-"), "RGB"))
    return root


# ---- CIRCO --------------------------------------------------------------------------------------------
CIRCO_IDS = [243611, 7, 9761, 489535, 57541, 375057, 119881, 85932, 100, 1234567, 42]
CIRCO_VAL = [  # reference, gt_img_ids (target first), semantic aspects
    (85932, [9761, 489535, 57541, 375057, 119881], ["cardinality", "addition"]),
    (7, [243611], ["negation"]),
    (100, [42, 7, 1234567], ["cardinality"]),
]
CIRCO_TEST_REFS = [7, 85932, 7]  # two test queries share a reference
CIRCO_MODES = {7: "L", 42: "CMYK", 100: "RGBA"}


def make_circo(root: Path) -> Path:
    images = [
        {"license": 1, "file_name": f"{i:012d}.jpg", "coco_url": "", "height": 16, "width": 20, "id": i}
        for i in CIRCO_IDS
    ]
    _dump(
        root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json",
        {"info": {}, "images": images, "licenses": [], "categories": []},
    )
    for i in CIRCO_IDS:
        write_image(
            root / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg", CIRCO_MODES.get(i, "RGB")
        )
    val = [
        {
            "reference_img_id": ref,
            "target_img_id": gts[0],
            "relative_caption": f"query {n}",
            "shared_concept": "a thing",
            "gt_img_ids": gts,
            "id": n,
            "semantic_aspects": aspects,
        }
        for n, (ref, gts, aspects) in enumerate(CIRCO_VAL)
    ]
    test = [
        {"reference_img_id": ref, "relative_caption": f"test {n}", "shared_concept": "x", "id": n}
        for n, ref in enumerate(CIRCO_TEST_REFS)
    ]
    _dump(root / "annotations" / "val.json", val)
    _dump(root / "annotations" / "test.json", test)
    return root


# ---- GeneCIS ------------------------------------------------------------------------------------------
VG_IMAGES = {"2373241": ("RGB", (40, 30)), "61": ("L", (32, 48)), "498334": ("CMYK", (36, 36))}


def _vaw(image_id: str, box: list[float]) -> dict:
    return {"image_id": image_id, "instance_bbox": box, "object_name": "thing", "instance_id": 1}


GENECIS_ATTRIBUTE = [
    {
        "condition": "color",
        "reference": _vaw("2373241", [10, 8, 12, 10]),
        "target": _vaw("61", [4.5, 6.25, 10, 20]),
        "gallery": [
            _vaw("2373241", [20, 5, 15, 20]),
            _vaw("61", [4.5, 6.25, 10, 20]),
            _vaw("498334", [0, 0, 36, 36]),
        ],
    },  # the target is repeated in its gallery: an exact tie that counts for the target
    {
        "condition": "material",
        "reference": _vaw("498334", [3, 3, 10, 10]),
        "target": _vaw("2373241", [20, 5, 15, 20]),
        "gallery": [
            _vaw("2373241", [10, 8, 12, 10]),
            _vaw("61", [0, 0, 5, 5]),
            _vaw("498334", [30, 2, 6, 30]),
        ],
    },
    {
        "condition": "pattern",
        "reference": _vaw("61", [0, 0, 5, 5]),
        "target": _vaw("498334", [30, 2, 6, 30]),
        "gallery": [
            _vaw("61", [4.5, 6.25, 10, 20]),
            _vaw("2373241", [1, 1, 30, 8]),
            _vaw("2373241", [10, 8, 12, 10]),
        ],
    },
]
COCO_VAL_IDS = {189213: "RGB", 153527: "L", 121506: "RGB", 536947: "RGBA", 42: "RGB", 77: "RGB"}
GENECIS_OBJECT = [
    {
        "condition": "cardboard",
        "reference": {"val_image_id": 189213},
        "target": {"val_image_id": 153527},
        "gallery": [{"val_image_id": 121506}, {"val_image_id": 536947}, {"val_image_id": 42}],
    },
    {
        "condition": "dog",
        "reference": {"val_image_id": 42},
        "target": {"val_image_id": 77},
        "gallery": [{"val_image_id": 77}, {"val_image_id": 189213}, {"val_image_id": 121506}],
    },
    {
        "condition": "table",
        "reference": {"val_image_id": 153527},
        "target": {"val_image_id": 121506},
        "gallery": [{"val_image_id": 536947}, {"val_image_id": 189213}, {"val_image_id": 153527}],
    },
]


def make_genecis(root: Path) -> Path:
    for task, templates in (
        ("focus_attribute", GENECIS_ATTRIBUTE),
        ("change_attribute", GENECIS_ATTRIBUTE[::-1]),
        ("focus_object", GENECIS_OBJECT),
        ("change_object", GENECIS_OBJECT[::-1]),
    ):
        _dump(root / "genecis" / f"{task}.json", templates)
    for image_id, (mode, size) in VG_IMAGES.items():
        write_image(root / "VG_100K_all" / f"{image_id}.jpg", mode, size)
    for image_id, mode in COCO_VAL_IDS.items():
        write_image(root / "val2017" / f"{image_id:012d}.jpg", mode)
    return root
