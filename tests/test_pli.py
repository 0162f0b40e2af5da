"""PLI masked tuning: token dropping, the loss against a transcription of the official code, which towers
train, the inference formula, the warm-up schedule, and a train → checkpoint → evaluate round trip."""

import csv
import warnings

import pytest
import torch
import torch.nn.functional as F

from zscir.backbones import BackboneLoadError
from zscir.cli.evaluate import evaluate
from zscir.cli.train import train
from zscir.methods import build_method
from zscir.methods.pli import distinct_random_keep, epoch_warmup, num_kept, pli_loss
from zscir.retrieval.search import normalize

warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step called without a Trainer

CAPTIONS = ["a large red circle on the left", "two blue squares", "a small green triangle", "a purple cross"]


def pli(backbone: str = "tiny", kind: str = "open_clip", **config) -> torch.nn.Module:
    return build_method({"name": backbone, "kind": kind, "model": "tiny"}, {"kind": "pli", **config})


@pytest.fixture(scope="module")
def method():
    return pli()


def batch_for(method, n: int = 4, seed: int = 0) -> dict:
    size = method.encoder.image_size
    pixels = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return {"pixels": pixels, "caption": CAPTIONS[:n]}


# ---- token dropping ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_masks_in_a_batch_are_never_identical(seed):
    """L = 4, keep 2: only 6 subsets exist, so 6 independent draws repeat one 98.5 % of the time."""
    keep = distinct_random_keep(6, 4, 0.5, generator=torch.Generator().manual_seed(seed))
    assert keep.shape == (6, 2)
    assert len({tuple(row) for row in keep.tolist()}) == 6
    assert all(row == sorted(set(row)) and row[0] >= 0 and row[-1] < 4 for row in keep.tolist())


def test_more_samples_than_distinct_masks_is_refused():
    with pytest.raises(ValueError, match="distinct subsets"):
        distinct_random_keep(7, 4, 0.5)


@pytest.mark.parametrize(
    ("num_patches", "ratio", "kept"),
    [(49, 0.75, 12), (49, 0.5, 24), (256, 0.75, 64), (576, 0.5, 288), (64, 0.25, 48)],
)
def test_kept_count_is_int_of_L_times_one_minus_r(num_patches, ratio, kept):
    assert num_kept(num_patches, ratio) == kept
    assert distinct_random_keep(3, num_patches, ratio).shape == (3, kept)


def test_masks_differ_across_ranks_and_batches_and_repeat_for_the_same_batch(method):
    b = 8
    rank0 = method.draw_keep(b, batch_idx=3, epoch=1, world=2, rank=0)
    rank1 = method.draw_keep(b, batch_idx=3, epoch=1, world=2, rank=1)
    rows = {tuple(r) for r in torch.cat([rank0, rank1]).tolist()}
    assert len(rows) == 2 * b  # distinct over the global batch of both ranks
    assert torch.equal(rank0, method.draw_keep(b, batch_idx=3, epoch=1, world=2, rank=0))  # resumable
    assert not torch.equal(rank0, method.draw_keep(b, batch_idx=4, epoch=1, world=2, rank=0))
    assert not torch.equal(rank0, method.draw_keep(b, batch_idx=3, epoch=2, world=2, rank=0))


@pytest.mark.parametrize("kind", ["open_clip", "hf_clip", "hf_blip"])
def test_masked_view_feeds_class_token_plus_kept_patches(kind):
    """The transformer sees 1 + int(L·(1−r)) tokens for the query view and 1 + L for the target."""
    m = pli(kind=kind, mask_ratio=0.75)
    blocks = (
        m.encoder.model.visual.transformer if kind == "open_clip" else m.encoder.model.vision_model.encoder
    )
    lengths = []

    def record(_module, args, kwargs):
        x = args[0] if args else kwargs["inputs_embeds"]
        lengths.append(x.shape[1])

    handle = blocks.register_forward_pre_hook(record, with_kwargs=True)
    try:
        m.training_step(batch_for(m), 0)
    finally:
        handle.remove()
    num_patches = m.encoder.num_patches
    assert lengths == [1 + int(num_patches * 0.25), 1 + num_patches]


# ---- the loss ---------------------------------------------------------------------------------------
def official_clip_loss(clip, images, text_ids, noise, mask_ratio):
    """A line-by-line transcription of the official training step for CLIP (https://github.com/Chen-Junyang-cn/PLI; docs/methods.md, PLI):
    trainers/pretrainer.py ``mask_forword`` with models/image_encoders/clip_image_encoder.py
    ``mask_forword``/``random_masking``, models/text_encoders/clip_text_encoder.py and
    losses/batch_based_classification_loss.py (tau = 1.0), on open_clip modules (batch-first)."""
    v = clip.visual
    x = v.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = x + v.positional_embedding[1:, :].unsqueeze(0)
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    cls_token = v.class_embedding + v.positional_embedding[:1, :].unsqueeze(0)
    x = torch.cat((cls_token.expand(n, -1, -1), x), dim=1)
    x = v.ln_pre(x)
    x = v.transformer(x)
    ref = v.ln_post(x[:, 0, :]) @ v.proj

    t = clip.token_embedding(text_ids) + clip.positional_embedding
    t = clip.ln_final(clip.transformer(t, attn_mask=clip.attn_mask))
    txt = t[torch.arange(n), text_ids.argmax(dim=-1)] @ clip.text_projection

    tar = clip.encode_image(images)
    composed = ref + txt
    pred = composed.mm(tar.transpose(0, 1)) / 1.0
    return F.cross_entropy(pred, torch.arange(0, n).long())


def test_loss_equals_the_official_computation(method):
    batch = batch_for(method)
    keep = method.draw_keep(4, batch_idx=0)
    # official noise whose argsort puts exactly our kept patches first (in a random order)
    noise = torch.rand(4, method.encoder.num_patches) + 1
    noise.scatter_(1, keep, torch.rand(keep.shape))
    ids = method.encoder.tokenize(batch["caption"])
    expected = official_clip_loss(method.encoder.model, batch["pixels"], ids, noise, 0.75)
    ours = method.training_step(batch, 0)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert ours.item() > 0


def test_loss_options_follow_their_formulas():
    g = torch.Generator().manual_seed(0)
    q, t = torch.randn(5, 8, generator=g) * 3, torch.randn(5, 8, generator=g) * 3
    labels = torch.arange(5)
    nq, nt = F.normalize(q, dim=-1), F.normalize(t, dim=-1)
    torch.testing.assert_close(pli_loss(q, t), F.cross_entropy(q @ t.T, labels))
    torch.testing.assert_close(pli_loss(q, t, normalize="target"), F.cross_entropy(q @ nt.T, labels))
    torch.testing.assert_close(pli_loss(q, t, 1 / 0.07, "both"), F.cross_entropy(nq @ nt.T / 0.07, labels))
    symmetric = (F.cross_entropy(q @ t.T, labels) + F.cross_entropy(t @ q.T, labels)) / 2
    torch.testing.assert_close(pli_loss(q, t, symmetric=True), symmetric)
    assert not torch.allclose(pli_loss(q, t, symmetric=True), pli_loss(q, t))


def test_learnable_temperature_trains_and_is_saved():
    m = pli(learnable_temperature=True, temperature=0.07, normalize="both")
    torch.testing.assert_close(m.logit_scale.exp(), torch.tensor(1 / 0.07))
    m.training_step(batch_for(m), 0).backward()
    assert m.logit_scale.grad is not None
    assert m.logit_scale.grad.abs() > 0
    checkpoint = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(checkpoint)
    assert "logit_scale" in checkpoint["state_dict"]
    assert not hasattr(pli(), "logit_scale")  # fixed temperature: nothing to learn


# ---- which towers train -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "tune"),
    [
        ("open_clip", "both"),
        ("open_clip", "image"),
        ("open_clip", "text"),
        ("hf_clip", "image"),
        ("hf_blip", "text"),
    ],
)
def test_gradients_reach_the_tuned_towers_only(kind, tune):
    m = pli(kind=kind, tune=tune)
    m.train()
    m.training_step(batch_for(m), 0).backward()
    enc = m.encoder
    tuned = {"both": ("image", "text"), "image": ("image",), "text": ("text",)}[tune]
    for tower in ("image", "text"):
        params = enc.tower_parameters(tower)
        if tower in tuned:
            assert all(p.requires_grad for p in params)
            assert sum(p.grad.abs().sum().item() for p in params if p.grad is not None) > 0
            assert all(mod.training for mod in enc.tower_modules(tower))
        else:
            assert not any(p.requires_grad or p.grad is not None for p in params)
            assert not any(mod.training for mod in enc.tower_modules(tower))  # dropout off: frozen for real
    towers = {id(p) for t in ("image", "text") for p in enc.tower_parameters(t)}
    loose = [n for n, p in enc.named_parameters() if id(p) not in towers]
    assert loose  # logit_scale (CLIP); ITM head and cross-attention (BLIP)
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters() if id(p) not in towers)
    checkpoint = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(checkpoint)
    saved = {n.split(".")[2] for n in checkpoint["state_dict"] if n.startswith("encoder.model.")}
    frozen_tower = {
        "image": {"visual", "vision_model", "vision_proj", "visual_projection"},
        "text": {"transformer", "text_encoder", "text_model", "text_projection", "text_proj"},
    }
    for tower in set(("image", "text")) - set(tuned):
        assert not saved & frozen_tower[tower]  # rebuilt from the backbone config on load


# ---- inference ---------------------------------------------------------------------------------------
def test_inference_is_the_weighted_sum_of_normalised_features(method):
    batch = {"pixels": batch_for(method)["pixels"], "texts": CAPTIONS}
    enc = method.encoder
    with torch.no_grad():
        text = F.normalize(enc.encode_text(enc.tokenize(CAPTIONS)), dim=-1)
        image = F.normalize(enc.encode_image(batch["pixels"]), dim=-1)
        assert method.img_weight == pytest.approx(0.25)  # 1 − mask_ratio
        torch.testing.assert_close(method.compose(batch), F.normalize(text + 0.25 * image, dim=-1))
        override = pli(img_weight=0.6)
        torch.testing.assert_close(override.compose(batch), F.normalize(text + 0.6 * image, dim=-1))
        # before tuning, PLI's query is the `sum` baseline's with img_weight = 1 − mask_ratio
        baseline = build_method(
            {"name": "tiny", "kind": "open_clip", "model": "tiny"}, {"kind": "sum", "img_weight": 0.25}
        )
        torch.testing.assert_close(method.compose(batch), normalize(baseline.compose(batch)))
        assert not torch.allclose(method.compose(batch), override.compose(batch))


# ---- schedule --------------------------------------------------------------------------------------
def test_epoch_warmup_is_the_official_linear_lr_per_epoch():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    official = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5)
    for epoch in range(10):
        assert epoch_warmup(epoch, 5, 0.01) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        official.step()
    assert epoch_warmup(3, 0, 0.01) == 1.0


def test_train_checkpoint_evaluate_round_trip(compose, tmp_path):
    """experiment=pli_clip_b32_imagenet on the tiny backbone and synthetic data: the warm-up is applied
    per epoch, the tuned towers are saved, and evaluating the checkpoint reproduces the run's metrics."""
    overrides = [
        "backbone=tiny",
        "data=synthetic",
        "data.batch_size=32",
        "trainer=cpu",
        "trainer.precision=32-true",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=2",
        "trainer.log_every_n_steps=1",
        "method.optim.lr=1e-4",
        "method.warmup_epochs=2",
        "eval_benchmarks=[synthetic_cirr,synthetic_circo]",
        "checkpoint.monitor=null",  # the final metrics then come from last.ckpt, evaluated again below
    ]
    metrics = train(compose("train", ["experiment=pli_clip_b32_imagenet", *overrides]))
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    with open(next((run / "csv").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    assert lrs == pytest.approx([1e-6, 1e-6, 50.5e-6, 50.5e-6])  # 0.01·lr in epoch 0, 0.505·lr in epoch 1
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    untuned = pli().state_dict()
    assert not torch.equal(state["encoder.model.visual.proj"], untuned["encoder.model.visual.proj"])
    again = evaluate(
        compose(
            "eval",
            [
                "backbone=tiny",
                "method=pli",
                f"ckpt_path={ckpt}",
                "eval_benchmarks=[synthetic_cirr,synthetic_circo]",
                f"paths.run_dir={tmp_path / 'eval'}",
            ],
        )
    )
    assert again == pytest.approx(metrics, abs=1e-6)
    before = evaluate(
        compose(
            "eval",
            [
                "backbone=tiny",
                "method=pli",
                "eval_benchmarks=[synthetic_cirr,synthetic_circo]",
                f"paths.run_dir={tmp_path / 'e0'}",
            ],
        )
    )
    assert before != again  # the checkpoint's weights were used, not the backbone's


@pytest.mark.parametrize(
    ("experiment", "model"),
    [
        ("pli_clip_b32_imagenet", "ViT-B-32"),
        ("pli_clip_l14_imagenet", "ViT-L-14"),
    ],
)
def test_paper_experiments_with_named_weights_fail_clearly_offline(
    compose, tmp_path, monkeypatch, experiment, model
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(
        "train", [f"experiment={experiment}", "trainer=cpu", f"backbone.cache_dir={tmp_path / 'hub'}"]
    )
    with pytest.raises(BackboneLoadError) as err:
        train(cfg)
    assert model in str(err.value)
    assert str(tmp_path / "hub") in str(err.value)  # where it looked
