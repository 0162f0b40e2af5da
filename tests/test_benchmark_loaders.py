"""Loaders read the official layouts of miniature benchmark copies: ids, galleries, query texts, image
conversion and GeneCIS crops, and clear errors for wrong roots, bad annotations and broken images."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from benchmark_fixtures import (
    CIRR_VAL,
    CIRR_VAL_IMAGES,
    FIQ_SPLITS,
    make_circo,
    make_cirr,
    make_fashioniq,
    make_genecis,
)
from zscir.benchmarks import (
    AnnotationError,
    DatasetLayoutError,
    ImageLoadError,
    build_benchmark,
)
from zscir.benchmarks.genecis import dilated_box


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    make_fashioniq(root / "FashionIQ")
    make_fashioniq(root / "FashionIQ_jpg", ext=".jpg")
    make_cirr(root / "CIRR")
    make_cirr(root / "CIRR_readme", layout="readme")
    make_cirr(root / "CIRR_parent" / "cirr", layout="readme")
    make_circo(root / "CIRCO")
    make_genecis(root / "GeneCIS")
    return root


# ---- FashionIQ -------------------------------------------------------------------------------------------
def test_fashioniq_all_categories_share_one_gallery_entry_per_image(data):
    b = build_benchmark("fashioniq", data / "FashionIQ", "val", category="all")
    ids = [g.image_id for g in b.gallery]
    assert len(ids) == len(set(ids)) == 12 + 11 + 4 - 2  # shirt/toptee share B00SHARED1, B00SHARED2
    assert [q.query_id for q in b.queries] == [
        "dress/0",
        "dress/1",
        "dress/2",
        "shirt/0",
        "shirt/1",
        "shirt/2",
        "toptee/0",
    ]
    # each category keeps its own gallery, in its split file's order
    first, count, positions = b.parts["toptee"]
    assert (first, count) == (6, 1)
    assert [ids[p] for p in positions] == FIQ_SPLITS["toptee"]


def test_fashioniq_single_category_ids_are_triplet_indices_and_reference_stays(data):
    b = build_benchmark("fashioniq", data / "FashionIQ", "val", category="shirt")
    assert [g.image_id for g in b.gallery] == FIQ_SPLITS["shirt"]
    assert [q.query_id for q in b.queries] == ["0", "1", "2"]
    assert b.metric_names == ("recall@10", "recall@50")
    # the reference is NOT removed: it is an ordinary gallery image
    assert b.queries[1].reference.image_id in {g.image_id for g in b.gallery}


def test_fashioniq_caption_orders_are_stripped_and_joined(data):
    b = build_benchmark("fashioniq", data / "FashionIQ", "val", category="all")
    texts = {q.query_id: q.texts for q in b.queries}
    assert texts["dress/0"] == (
        "is shiny and silver and fit and flare",
        "fit and flare and is shiny and silver",
    )
    assert texts["dress/1"] == ("is white and has sleeves", "has sleeves and is white")
    assert texts["dress/2"] == (" and is floral", "is floral and ")  # an empty caption stays empty
    assert texts["shirt/2"] == ("longer, and red and ", " and longer, and red")  # "." strips to nothing
    assert texts["toptee/0"] == (" and is striped", "is striped and ")


def test_fashioniq_finds_jpg_images_and_converts_to_rgb(data):
    for root in ("FashionIQ", "FashionIQ_jpg"):
        b = build_benchmark("fashioniq", data / root, "val", category="dress")
        image = b.load_image(b.gallery[2])  # B00DRESS03 is grayscale
        assert image.mode == "RGB"
        assert image.size == (20, 16)
    b = build_benchmark("fashioniq", data / "FashionIQ_jpg", "val", category="toptee")
    assert b.gallery[0].path.suffix == ".jpg"
    assert b.load_image(b.gallery[0]).mode == "RGB"  # a palette image


def test_fashioniq_test_split_is_unlabelled(data):
    b = build_benchmark("fashioniq", data / "FashionIQ", "test", category="dress")
    assert not b.labelled
    assert b.submission_splits == ()


def test_fashioniq_missing_image_names_the_files(data, tmp_path):
    root = shutil.copytree(data / "FashionIQ", tmp_path / "fiq")
    (root / "images" / "B00DRESS07.png").unlink()
    b = build_benchmark("fashioniq", root, "val", category="dress")
    with pytest.raises(ImageLoadError, match=r"B00DRESS07.*B00DRESS07\.png.*B00DRESS07\.jpg"):
        b.load_image(b.gallery[6])


def test_fashioniq_wrong_root_lists_expected_files(tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        build_benchmark("fashioniq", tmp_path, "val", category="dress")
    message = str(err.value)
    assert "captions/cap.dress.val.json" in message
    assert "image_splits/split.dress.val.json" in message
    assert "XiaoxiaoGuo/fashion-iq" in message


def test_fashioniq_target_outside_the_gallery_is_refused(data, tmp_path):
    root = shutil.copytree(data / "FashionIQ", tmp_path / "fiq")
    caps = root / "captions" / "cap.dress.val.json"
    triplets = json.loads(caps.read_text())
    triplets[1]["target"] = "B00NOWHERE"
    caps.write_text(json.dumps(triplets))
    with pytest.raises(AnnotationError, match="B00NOWHERE"):
        build_benchmark("fashioniq", root, "val", category="dress")


# ---- CIRR -------------------------------------------------------------------------------------------------
def test_cirr_both_layouts_read_the_same_benchmark(data):
    searle = build_benchmark("cirr", data / "CIRR", "val")
    readme = build_benchmark("cirr", data / "CIRR_readme", "val")
    assert [g.image_id for g in searle.gallery] == [g.image_id for g in readme.gallery] == CIRR_VAL_IMAGES
    for a, b in zip(searle.queries, readme.queries):
        assert (a.query_id, a.texts, a.target_ids, a.subset_ids) == (
            b.query_id,
            b.texts,
            b.target_ids,
            b.subset_ids,
        )
    assert searle.gallery[0].path == data / "CIRR" / "dev" / "dev-1-0-img0.png"
    assert readme.gallery[0].path == data / "CIRR_readme" / "img_raw" / "dev" / "dev-1-0-img0.png"
    assert all(g.path.is_file() for g in readme.gallery)
    # the README tree may also be given by its parent folder (holding cirr/{captions,img_raw})
    parent = build_benchmark("cirr", data / "CIRR_parent", "val")
    assert parent.gallery[0].path == data / "CIRR_parent" / "cirr" / "img_raw" / "dev" / "dev-1-0-img0.png"


def test_cirr_subset_is_members_minus_reference_with_exact_names(data):
    b = build_benchmark("cirr", data / "CIRR", "val")
    q = {x.query_id: x for x in b.queries}
    assert list(q) == [str(p) for p, *_ in CIRR_VAL]
    assert q["12060"].reference.image_id == q["12061"].reference.image_id == "dev-1-0-img0"
    assert q["12060"].subset_ids == (
        "dev-1-0-img1",
        "dev-1-1-img0",
        "dev-11-0-img0",
        "dev-1-10-img0",
        "dev-10-1-img0",
    )
    assert q["12060"].target_ids == ("dev-1-1-img0",)  # target_hard, not target_soft
    assert q["17"].target_ids == ("dev-11-0-img0",)


def test_cirr_test1_is_unlabelled_and_test_is_explained(data):
    b = build_benchmark("cirr", data / "CIRR", "test1")
    assert not b.labelled
    assert b.submission_splits == ("test1",)
    with pytest.raises(ValueError, match="called 'test1'"):
        build_benchmark("cirr", data / "CIRR", "test")


def test_cirr_wrong_root_lists_both_layouts(tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        build_benchmark("cirr", tmp_path, "val")
    message = str(err.value)
    assert "cirr/captions/cap.rc2.val.json" in message
    assert "img_raw" in message
    assert "Cuberick-Orion/CIRR" in message


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r: r[0]["img_set"]["members"].remove("dev-1-1-img0"), "not in img_set.members"),
        (lambda r: r[1]["img_set"]["members"].append("dev-99-0-img0"), "dev-99-0-img0"),
        (lambda r: r[2].update(target_hard=r[2]["reference"]), "is the reference"),
        (lambda r: r[3].update(pairid=r[4]["pairid"]), "appears twice"),
        (lambda r: r[0].pop("target_hard"), "some pairs have a target_hard"),
    ],
)
def test_cirr_inconsistent_annotations_are_refused(data, tmp_path, edit, match):
    root = shutil.copytree(data / "CIRR", tmp_path / "cirr")
    path = root / "cirr" / "captions" / "cap.rc2.val.json"
    records = json.loads(path.read_text())
    edit(records)
    path.write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=match):
        build_benchmark("cirr", root, "val")


# ---- CIRCO ------------------------------------------------------------------------------------------------
def test_circo_gallery_is_the_whole_index_with_12_digit_files(data):
    b = build_benchmark("circo", data / "CIRCO", "val")
    assert b.gallery[1].image_id == "7"
    assert b.gallery[1].path.name == "000000000007.jpg"
    assert all(g.path.is_file() for g in b.gallery)
    assert [q.query_id for q in b.queries] == ["0", "1", "2"]
    assert b.queries[0].target_ids == ("9761", "489535", "57541", "375057", "119881")
    assert b.aspects[0] == ("cardinality", "addition")
    assert not build_benchmark("circo", data / "CIRCO", "test").labelled


@pytest.mark.parametrize(
    ("file", "edit", "match"),
    [
        ("annotations/val.json", lambda r: r[1].update(id=5), "must equal\\s+their position"),
        ("annotations/val.json", lambda r: r[2].update(gt_img_ids=[7, 42]), "must start with target_img_id"),
        ("annotations/val.json", lambda r: r[0].update(reference_img_id=31337), "31337"),
        (
            "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json",
            lambda r: r["images"].append(dict(r["images"][3])),
            "listed twice",
        ),
    ],
)
def test_circo_inconsistent_annotations_are_refused(data, tmp_path, file, edit, match):
    root = shutil.copytree(data / "CIRCO", tmp_path / "circo")
    records = json.loads((root / file).read_text())
    edit(records)
    (root / file).write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=match):
        build_benchmark("circo", root, "val")


def test_circo_wrong_root_marks_the_missing_files(data, tmp_path):
    root = shutil.copytree(data / "CIRCO", tmp_path / "circo")
    (root / "annotations" / "test.json").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        build_benchmark("circo", root, "test")
    message = str(err.value)
    assert "MISSING" in message
    assert "annotations/test.json" in message
    assert "image_info_unlabeled2017.json" in message
    assert "found" in message  # the image info is there


def test_images_of_every_mode_load_as_rgb_and_broken_ones_are_named(data, tmp_path):
    b = build_benchmark("circo", data / "CIRCO", "val")
    by_id = {g.image_id: g for g in b.gallery}
    for image_id, mode in (("7", "L"), ("42", "CMYK"), ("100", "RGBA")):
        assert Image.open(by_id[image_id].path).mode == mode
        assert b.load_image(by_id[image_id]).mode == "RGB"
    root = shutil.copytree(data / "CIRCO", tmp_path / "circo")
    (root / "COCO2017_unlabeled" / "unlabeled2017" / "000000009761.jpg").write_bytes(b"not a jpeg")
    (root / "COCO2017_unlabeled" / "unlabeled2017" / "000000057541.jpg").unlink()
    b = build_benchmark("circo", root, "val")
    by_id = {g.image_id: g for g in b.gallery}
    with pytest.raises(ImageLoadError, match=r"cannot decode.*000000009761\.jpg"):
        b.load_image(by_id["9761"])
    with pytest.raises(ImageLoadError, match=r"missing.*000000057541\.jpg"):
        b.load_image(by_id["57541"])


# ---- GeneCIS ----------------------------------------------------------------------------------------------
def test_genecis_candidates_start_with_the_target_and_crops_keep_their_box(data):
    b = build_benchmark("genecis", data / "GeneCIS", "val", task="focus_attribute")
    q0 = b.queries[0]
    assert q0.candidate_ids[0] == q0.target_ids[0] == "61:4.5,6.25,10.0,20.0"
    assert q0.candidate_ids[2] == q0.candidate_ids[0]  # the target repeated in its own gallery
    assert len(q0.candidate_ids) == 4
    # one VG image, several crops: distinct gallery entries
    crops = [g.image_id for g in b.gallery if g.image_id.startswith("2373241:")]
    assert len(crops) == 3
    assert len({g.image_id for g in b.gallery}) == len(b.gallery)
    assert q0.reference.image_id == "2373241:10.0,8.0,12.0,10.0"


def test_genecis_object_tasks_read_12_digit_coco_files(data):
    b = build_benchmark("genecis", data / "GeneCIS", "val", task="focus_object")
    assert b.queries[0].candidate_ids == ("153527", "121506", "536947", "42")
    assert b.gallery[0].path.name == "000000153527.jpg"
    images = [b.load_image(g) for g in b.gallery]
    assert {im.mode for im in images} == {"RGB"}
    assert images[0].size == (20, 16)  # whole images, no crop


def test_genecis_dilation_grows_left_and_top_only():
    # unclamped: left = x - 0.7 w, right = left + 1.7 w = x + w (the official quirk)
    left, top, right, bottom = dilated_box([50, 40, 20, 10], 200, 100)
    assert (left, top) == pytest.approx((36, 33))
    assert (right, bottom) == pytest.approx((70, 50))
    # clamped at 0, the box then extends 1.7 w from the edge, clamped to the image
    assert dilated_box([5, 5, 20, 50], 30, 60) == (0, 0, 30, 60)


@pytest.mark.parametrize(
    ("image_id", "bbox", "box", "offset"),
    [
        # 40x30 RGB, [10, 8, 12, 10]: (1.6, 1.0, 22.0, 18.0) -> Pillow rounds to (2, 1, 22, 18): 20x17, pad 1 on top
        ("2373241", [10, 8, 12, 10], (2, 1, 22, 18), (0, 1)),
        # [20, 5, 15, 20]: left 9.5 rounds half-to-even to 10; top clamps to 0, bottom to the height: 25x30
        ("2373241", [20, 5, 15, 20], (10, 0, 35, 30), (2, 0)),
        # 32x48 grayscale, [4.5, 6.25, 10, 20]: both clamp to 0 -> (0, 0, 17, 34): 17x34, pad 8 on the left
        ("61", [4.5, 6.25, 10, 20], (0, 0, 17, 34), (8, 0)),
    ],
)
def test_genecis_crop_pixels_match_a_hand_made_crop(data, image_id, bbox, box, offset):
    b = build_benchmark("genecis", data / "GeneCIS", "val", task="focus_attribute")
    ref = next(
        g for g in [*b.gallery, *(q.reference for q in b.queries)] if g.image_id.startswith(f"{image_id}:")
    )
    crop_id = f"{image_id}:{','.join(repr(float(v)) for v in bbox)}"
    ref = type(ref)(crop_id, ref.path)
    b.boxes[crop_id] = tuple(bbox)
    got = np.asarray(b.load_image(ref))
    source = np.asarray(Image.open(ref.path).convert("RGB"))
    left, t, r, btm = box
    side = max(r - left, btm - t)
    expected = np.zeros((side, side, 3), dtype=np.uint8)
    expected[offset[1] : offset[1] + btm - t, offset[0] : offset[0] + r - left] = source[t:btm, left:r]
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_genecis_needs_a_task_and_a_root(data, tmp_path):
    with pytest.raises(ValueError, match="focus_attribute"):
        build_benchmark("genecis", data / "GeneCIS", "val")
    with pytest.raises(DatasetLayoutError, match=r"genecis/change_object\.json"):
        build_benchmark("genecis", tmp_path, "val", task="change_object")


def test_unknown_benchmark_option_is_named(data):
    with pytest.raises(ValueError, match=r"no option\(s\) \['task'\].*category"):
        build_benchmark("fashioniq", data / "FashionIQ", "val", task="dress")


def test_fixture_images_really_have_the_awkward_modes(data):
    assert Image.open(data / "CIRR" / "dev" / "dev-3-0-img0.png").mode == "P"
    assert Image.open(data / "CIRR" / "dev" / "dev-1-10-img0.png").mode == "RGBA"
    assert Image.open(data / "GeneCIS" / "VG_100K_all" / "498334.jpg").mode == "CMYK"
    b = build_benchmark("cirr", data / "CIRR", "val")
    assert {b.load_image(g).mode for g in b.gallery} == {"RGB"}
