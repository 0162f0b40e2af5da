"""CAM-TI: Grad-CAM maps, region masks, noun selection, the loss as written, the CAM cache, and a run."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM

from zscir.backbones import build_encoder
from zscir.cam import (
    CamCache,
    CamSpec,
    NounCams,
    grad_cams,
    mask_pixels,
    prompt_features,
    upsample_cams,
    visible,
)
from zscir.cam.gradcam import _ImageTower, target_layer, vit_reshape_transform
from zscir.cam.masks import encode_visible_tokens, masked_features
from zscir.methods.cam_ti import CamTI, contrastive_loss
from zscir.text.nouns import NounSelector, find_nouns, mask_noun, stable_index

TINY = {"kind": "open_clip", "model": "tiny"}


@pytest.fixture(scope="module")
def encoder():
    enc = build_encoder(**TINY)
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc.eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def targets(encoder):
    return prompt_features(encoder, ["circle", "square", "dog", "tree", "circle"])


# ---- Grad-CAM ---------------------------------------------------------------------------------------
def test_cam_is_finite_in_unit_range_on_the_patch_grid_and_batched_equals_one_by_one(
    encoder, pixels, targets
):
    batched = grad_cams(encoder, pixels, targets)
    assert batched.shape == (5, *encoder.grid_size) == (5, 8, 8)
    assert batched.dtype == torch.float32
    assert torch.isfinite(batched).all()
    assert batched.min() >= 0.0
    assert batched.max() <= 1.0
    assert torch.allclose(batched.flatten(1).max(1).values, torch.ones(5), atol=1e-5)  # min-max normalised
    assert (batched.flatten(1).std(1) > 0.05).all()  # a map, not a constant
    one_by_one = grad_cams(encoder, pixels, targets, batch_size=1)
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    # the target matters: another noun gives another map
    assert not torch.allclose(batched[0], grad_cams(encoder, pixels[:1], targets[2:3])[0], atol=1e-3)


def test_counterfactual_cam_explains_the_negated_target_and_differs_from_the_plain_map(encoder, pixels):
    nouns = ["circle", "square", "dog", "tree", "circle"]
    plain = NounCams(encoder, CamSpec(block=-2))(pixels, nouns)
    counter = NounCams(encoder, CamSpec(block=-2, negate=True))(pixels, nouns)
    expected = grad_cams(encoder, pixels, -prompt_features(encoder, nouns), block=-2)
    assert torch.allclose(counter, expected, atol=1e-6)
    assert not torch.allclose(counter, plain, atol=1e-2)


def test_cam_equals_grad_cam_packages_own_full_graph_map(encoder, pixels, targets):
    """Our shortcuts (graph from the target block on, maps kept on the grid, our upsampling) change nothing."""
    ours = upsample_cams(grad_cams(encoder, pixels, targets), (64, 64))
    tower = _ImageTower(encoder, torch.device("cpu"))
    cam = GradCAM(
        model=tower,
        target_layers=[target_layer(encoder)],
        reshape_transform=vit_reshape_transform(encoder.grid_size),
    )
    try:
        from zscir.cam.gradcam import SimilarityTarget

        pixel_input = pixels.clone().requires_grad_(True)  # frozen weights: the graph must start somewhere
        reference = cam(input_tensor=pixel_input, targets=[SimilarityTarget(t) for t in targets])
    finally:
        cam.activations_and_grads.release()
    assert reference.shape == (5, 64, 64)
    assert np.allclose(ours.numpy(), reference, atol=1e-4)


def test_cam_leaves_no_gradients_on_frozen_weights_and_works_under_bf16_autocast(encoder, pixels, targets):
    fp32 = grad_cams(encoder, pixels, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        default = grad_cams(encoder, pixels, targets)  # autocast switched off inside: same as fp32
        kept = grad_cams(encoder, pixels, targets, autocast=True)
    assert all(p.grad is None for p in encoder.parameters())
    assert torch.allclose(default, fp32, atol=1e-6)
    assert torch.isfinite(kept).all()
    assert kept.shape == fp32.shape
    assert 0.0 <= kept.min() <= kept.max() <= 1.0


def test_cam_refuses_inference_mode(encoder, pixels, targets):
    with torch.inference_mode(), pytest.raises(RuntimeError, match="autograd"):
        grad_cams(encoder, pixels, targets)


# ---- masks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.2, 0.3, 0.4])
def test_mask_keeps_the_fraction_the_threshold_implies(encoder, pixels, tau):
    grid = torch.rand(5, 8, 8, generator=torch.Generator().manual_seed(1))
    grid = (grid - grid.amin((1, 2), keepdim=True)) / grid.amax((1, 2), keepdim=True)
    maps = upsample_cams(grid, (64, 64))
    for region in ("background", "object"):
        masked = mask_pixels(pixels, grid, tau, region)
        shown = (maps >= tau) if region == "background" else (maps < tau)
        assert torch.equal(masked, pixels * shown[:, None])  # hidden pixels = 0, the normalisation mean
        _, fraction = masked_features(encoder, pixels, grid, tau, region, "pixels")
        assert torch.allclose(fraction, shown.flatten(1).float().mean(1))
        _, token_fraction = masked_features(encoder, pixels, grid, tau, region, "tokens")
        expected = (grid >= tau) if region == "background" else (grid < tau)
        assert torch.allclose(token_fraction, expected.flatten(1).float().mean(1))
    # background and object split every pixel between them
    assert torch.equal(visible(maps, tau, "background"), ~visible(maps, tau, "object"))


def test_token_masking_is_exact_per_sample(encoder, pixels):
    keep = torch.zeros(5, 8, 8, dtype=torch.bool)
    keep[0, :2] = True  # 16 patches
    keep[1, :, :2] = True  # 16 patches, others
    keep[2, 3, 3] = True  # 1 patch
    keep[3] = True  # all 64
    # sample 4 keeps nothing: the class token alone
    feats = encode_visible_tokens(encoder, pixels, keep)
    for i in range(5):
        idx = keep[i].flatten().nonzero().squeeze(1)[None]
        alone = encoder.encode_image(pixels[i : i + 1], keep=idx)
        assert torch.allclose(feats[i], alone[0], atol=1e-5), i
    assert torch.allclose(feats[3], encoder.encode_image(pixels[3:4])[0], atol=1e-5)


# ---- nouns ------------------------------------------------------------------------------------------
def test_nouns_of_hand_made_sentences():
    nouns = find_nouns(
        [
            "A man riding a horse on the beach.",
            "red and blue",
            "a large red circle next to two small squares",
            "a photo of a dog",
        ]
    )
    assert [n.text for n in nouns[0]] == ["man", "horse", "beach"]
    assert nouns[1] == []
    assert [n.text for n in nouns[2]] == ["circle", "squares"]
    assert [n.text for n in nouns[3]] == ["photo", "dog"]
    caption = "A man riding a horse on the beach."
    assert caption[nouns[0][1].start : nouns[0][1].end] == "horse"
    assert [n.text for n in find_nouns([caption], exclude=["Horse"])[0]] == ["man", "beach"]


def test_masking_replaces_the_chosen_noun_or_every_occurrence():
    caption = "a red circle and a blue circle on a table"
    nouns = find_nouns([caption])[0]
    assert [n.text for n in nouns] == ["circle", "circle", "table"]
    assert mask_noun(caption, nouns, 1) == "a red circle and a blue $ on a table"
    assert mask_noun(caption, nouns, 1, all_occurrences=True) == "a red $ and a blue $ on a table"
    assert mask_noun(caption, nouns, 2) == "a red circle and a blue circle on a $"


def test_fixed_sampling_is_stable_per_key_and_covers_every_noun():
    caption = "a cat and a dog and a bird"
    selector = NounSelector(sampling="fixed", seed=3)
    first = selector.select([caption] * 60, [f"img{i}" for i in range(60)])
    again = NounSelector(sampling="fixed", seed=3).select([caption] * 60, [f"img{i}" for i in range(60)])
    assert first == again
    assert {c.noun for c in first} == {"cat", "dog", "bird"}
    for choice in first:
        assert choice.masked_caption == caption[: choice.start] + "$" + caption[choice.end :]
    assert selector.select(["blue and green"], ["x"]) == [None]
    assert stable_index(3, "img0", 3) == stable_index(3, "img0", 3)
    with pytest.raises(ValueError, match="key"):
        selector.select([caption])
    drawn = {c.noun for c in NounSelector(sampling="random", seed=0).select([caption] * 40)}
    assert drawn == {"cat", "dog", "bird"}


# ---- the loss ---------------------------------------------------------------------------------------
def _method(**overrides) -> CamTI:
    config = {"kind": "cam_ti", "phi_dropout": 0.0, **overrides}
    method = CamTI(backbone=TINY, config=config)
    method.train()
    return method


def _batch(pixels):
    return {
        "pixels": pixels[:4],
        "index": torch.arange(4),
        "key": ["a", "b", "c", "d"],
        "caption": ["a large red circle", "red and blue", "two small squares", "a tiny $triangle"],
    }


def _log_softmax_row(scores: list[float], k: int) -> float:
    top = max(scores)
    return scores[k] - top - math.log(sum(math.exp(s - top) for s in scores))


def _info_nce(
    queries: torch.Tensor, images: torch.Tensor, labels: list[int], t: float, symmetric: bool
) -> float:
    """The formula, written out with Python floats."""
    q = [[float(x) for x in row] for row in queries.double()]
    v = [[float(x) for x in row] for row in images.double()]

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    forward = -sum(
        _log_softmax_row([cos(qi, vj) / t for vj in v], labels[i]) for i, qi in enumerate(q)
    ) / len(q)
    if not symmetric:
        return forward
    backward = -sum(
        _log_softmax_row([cos(v[labels[i]], qj) / t for qj in q], i) for i in range(len(q))
    ) / len(q)
    return (forward + backward) / 2


@pytest.mark.parametrize(
    ("symmetric", "region", "mode"), [(True, "background", "pixels"), (False, "object", "tokens")]
)
def test_loss_on_a_fixed_batch_equals_the_formulas(pixels, symmetric, region, mode):
    lam, t, tau = 0.7, 0.07, 0.35
    method = _method(lam=lam, temperature=t, symmetric=symmetric, tau=tau, mask_region=region, mask_mode=mode)
    batch = _batch(pixels)
    got = method.losses(batch)
    enc = method.encoder

    with torch.no_grad():
        full = enc.encode_image(batch["pixels"])
        # original: "a photo of $" with $ <- phi(full image) against the full images
        photo = enc.encode_text_with_pseudo(enc.tokenize(["a photo of $"] * 4), method.phi(full))
        original = _info_nce(photo, full, [0, 1, 2, 3], t, symmetric)
    # query-target: one noun per caption ("red and blue" has none; the "$" of "$triangle" is removed)
    rows, nouns = [0, 2, 3], ["circle", "squares", "triangle"]
    masked_captions = ["a large red $", "two small $", "a tiny $"]
    grid = grad_cams(enc, batch["pixels"][rows], prompt_features(enc, nouns))
    with torch.no_grad():
        if mode == "pixels":
            keep = (
                upsample_cams(grid, (64, 64)) >= tau
                if region == "background"
                else upsample_cams(grid, (64, 64)) < tau
            )
            masked = enc.encode_image(batch["pixels"][rows] * keep[:, None])
        else:
            keep = grid >= tau if region == "background" else grid < tau
            masked = torch.stack(
                [
                    enc.encode_image(batch["pixels"][r : r + 1], keep=keep[k].flatten().nonzero().T)[0]
                    for k, r in enumerate(rows)
                ]
            )
        query = enc.encode_text_with_pseudo(enc.tokenize(masked_captions), method.phi(masked))
        query_target = _info_nce(query, full, rows, t, symmetric)

    assert got["original"].item() == pytest.approx(original, rel=1e-4)
    assert got["query_target"].item() == pytest.approx(query_target, rel=1e-4)
    assert got["loss"].item() == pytest.approx(lam * query_target + original, rel=1e-4)
    assert got["noun_fraction"].item() == pytest.approx(0.75)
    assert contrastive_loss(query, full, torch.tensor(rows), t, symmetric).item() == pytest.approx(
        query_target, rel=1e-4
    )


@pytest.mark.parametrize("region", ["background", "object"])
def test_both_mask_regions_train_phi_only(pixels, region):
    method = _method(mask_region=region, tau=0.3)
    terms = method.losses(_batch(pixels))
    assert torch.isfinite(terms["loss"])
    assert 0.0 < terms["visible_fraction"].item() < 1.0
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.phi.parameters())
    assert all(p.grad is None for p in method.encoder.parameters())


def test_mask_regions_show_complementary_parts(pixels):
    fractions = {
        r: _method(mask_region=r, tau=0.3).losses(_batch(pixels))["visible_fraction"]
        for r in ("background", "object")
    }
    assert fractions["background"].item() + fractions["object"].item() == pytest.approx(1.0, abs=1e-6)


def test_captions_without_a_noun_fall_back_to_the_original_loss(pixels):
    method = _method(lam=1.0)
    batch = {**_batch(pixels), "caption": ["red and blue", "green", "big and small", "yellow"]}
    terms = method.losses(batch)
    assert terms["query_target"].item() == 0.0
    assert terms["loss"].item() == pytest.approx(terms["original"].item())
    assert method.cams.computed == 0  # no CAM work at all


# ---- cache ------------------------------------------------------------------------------------------
def test_a_query_with_nothing_visible_only_takes_part_in_the_original_loss(pixels):
    # tau 1.0 is above every min-max normalised CAM value (max is 1 - 1e-7): background masking hides all
    method = _method(lam=1.0, tau=1.0, mask_region="background")
    terms = method.losses(_batch(pixels))
    assert terms["visible_fraction"].item() == 0.0
    assert terms["blank_fraction"].item() == pytest.approx(0.75)  # the three captions with a noun
    assert terms["noun_fraction"].item() == pytest.approx(0.75)  # still counted as having a noun
    assert terms["query_target"].item() == 0.0
    assert terms["loss"].item() == pytest.approx(terms["original"].item())


def test_cam_cache_hits_misses_and_recomputes_bad_entries(encoder, pixels, tmp_path):
    nouns, ids = ["circle", "square", "dog", "tree", "circle"], ["i0", "i1", "i2", "i3", "i4"]
    cams = NounCams(encoder, CamSpec(), cache=CamCache(tmp_path, "ns"))
    first = cams(pixels, nouns, ids)
    assert cams.computed == 5
    assert (cams.cache.hits, cams.cache.misses) == (0, 5)
    assert len(list(tmp_path.rglob("*.cam"))) == 5
    second = cams(pixels, nouns, ids)
    assert cams.computed == 5  # nothing recomputed
    assert cams.cache.hits == 5
    assert torch.equal(first, second)
    assert torch.allclose(first, NounCams(encoder)(pixels, nouns), atol=1e-6)  # uncached path agrees
    # a truncated entry and an entry for other pixels are recomputed, the rest still hit
    cams.cache.path("i1", "square").write_bytes(b"ZCAM\x01")
    other = pixels.clone()
    other[3] = torch.flip(other[3], dims=[-1])
    third = cams(other, nouns, ids)
    assert cams.computed == 7
    assert torch.equal(third[[0, 2, 4]], first[[0, 2, 4]])  # read back bit for bit
    assert torch.allclose(third[1], first[1], atol=1e-5)  # recomputed (in another batch)
    assert not torch.allclose(third[3], first[3])
    # another noun for the same image is another entry; another namespace shares nothing
    cams(pixels[:1], ["tree"], ["i0"])
    assert cams.computed == 8
    fresh = NounCams(encoder, CamSpec(), cache=CamCache(tmp_path, "other"))
    fresh(pixels, nouns, ids)
    assert fresh.computed == 5


# ---- a whole run ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cam_ti_trains_evaluates_writes_its_grid_and_reuses_the_cam_cache(compose, tmp_path):
    from zscir.cli.train import train

    overrides = [
        "method=cam_ti",
        "backbone=tiny",
        "trainer.max_steps=2",
        "trainer.precision=32-true",
        "data.batch_size=16",
        "method.cam_grid=4",
        "trainer.log_every_n_steps=1",
    ]
    metrics = train(compose("train", overrides))
    run = tmp_path / "run"
    assert {"synthetic_cirr/recall@1", "synthetic_circo/map@10"} <= set(metrics)
    assert (run / "cam_grid.png").stat().st_size > 5000
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["zscir"]["method"] == "cam_ti"
    assert all(k.startswith("phi.") for k in ckpt["state_dict"])  # frozen CLIP left out
    entries = list((tmp_path / "outputs" / "cache" / "cam").rglob("*.cam"))
    assert 0 < len(entries) <= 32
    stamps = {p: p.stat().st_mtime_ns for p in entries}
    # the same two batches again: every CAM comes from the cache, nothing is rewritten
    train(compose("train", [*overrides, f"paths.run_dir={tmp_path / 'again'}"]))
    rows = list(csv.DictReader((tmp_path / "again" / "csv" / "version_0" / "metrics.csv").open()))
    rates = [float(r["train/cam_cache_hit_rate"]) for r in rows if r.get("train/cam_cache_hit_rate")]
    assert rates
    assert all(rate == 1.0 for rate in rates)
    assert sorted((tmp_path / "outputs" / "cache" / "cam").rglob("*.cam")) == sorted(entries)
    assert {p: p.stat().st_mtime_ns for p in entries} == stamps
    assert json.loads((tmp_path / "again" / "run_info.json").read_text())["method"] == "cam_ti"


def test_cam_grid_cli_draws_one_row_per_sample_and_refuses_other_methods(small_world, tmp_path):
    from PIL import Image

    from conftest import small_world_overrides
    from zscir.cam.grid import CELL
    from zscir.cli.cam_grid import write_grid

    base = [
        f"paths.data_dir={small_world}",
        f"paths.output_dir={tmp_path / 'outputs'}",
        "backbone=tiny",
        *small_world_overrides(),
    ]
    path = write_grid([*base, "method=cam_ti", "method.cam_cache_dir=null"], 3, tmp_path / "grid.png")
    image = Image.open(path)
    assert image.width > 3 * CELL
    assert 3 * CELL < image.height < 4 * (CELL + 6)  # three sample rows (cell + padding) and a header
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # images and heat maps, not blank
    with pytest.raises(ValueError, match="method=cam_ti"):
        write_grid([*base, "method=sum"], 3, tmp_path / "other.png")


@pytest.mark.parametrize("autocast", [False, True])
def test_cam_cache_namespace_follows_the_precision_only_when_the_cams_autocast(tmp_path, autocast):
    """With cam_autocast the maps are computed in the Trainer's (or caller's) precision: bf16 maps get their
    own namespace; without it they are fp32 whatever the Trainer's precision, and share one."""
    import lightning as L

    from zscir.methods import build_method

    method = build_method(TINY, {"kind": "cam_ti", "cam_cache_dir": str(tmp_path), "cam_autocast": autocast})
    base = method.cams.cache.root.name
    method.use_cam_cache()
    assert method.cams.cache.root.name == base  # unchanged: a hit
    method.trainer = L.Trainer(precision="bf16-mixed", accelerator="cpu", logger=False)
    method.use_cam_cache()
    assert (method.cams.cache.root.name != base) == autocast
    other = build_method(
        {**TINY, "transform": "targetpad"}, {"kind": "cam_ti", "cam_cache_dir": str(tmp_path)}
    )
    assert (
        other.cams.cache.root.name
        != build_method(TINY, {"kind": "cam_ti", "cam_cache_dir": str(tmp_path)}).cams.cache.root.name
    )
