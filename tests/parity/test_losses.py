"""Each method's training loss against a transcription of the official computation, on identical tensors
(and identical random draws), equal to 1e-6.

The transcriptions are written here from the official files (cited by file:line); they are the reference,
zscir's code is what is tested.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from zscir.cli.config import CONF_DIR
from zscir.methods import build_method
from zscir.methods.cam_ti import contrastive_loss
from zscir.methods.lincir import add_noise
from zscir.methods.pli import pli_loss

warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step called without a Trainer

#: the losses are float32 (zscir casts features to float32, as the official fp32 code computes them): equal
#: to 1e-6, absolute or relative to the loss (a loss near 20 has float32 steps of 2e-6)
TOL = dict(rtol=1e-6, atol=1e-6)


def features(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---- PLI ----------------------------------------------------------------------------------------------
def official_pli_loss(
    ref_features: torch.Tensor, tar_features: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """Chen-Junyang-cn/PLI losses/batch_based_classification_loss.py:29-39: ``forward`` passes tau = 1.0
    to ``cal_loss``, which takes the cross-entropy of ``ref · tarᵀ / tau`` against ``arange(B)``; no
    normalisation there. trainers/pretrainer.py:103-115 passes ref = masked image feature + text feature."""
    pred = ref_features.mm(tar_features.transpose(0, 1)) / tau
    return F.cross_entropy(pred, torch.arange(0, ref_features.size(0)).long())


def official_blip_target(tar: torch.Tensor) -> torch.Tensor:
    """models/image_encoders/blip_image_encoder.py:29-33: the full-image path (``proj=True``) normalises
    the projected class token; the masked path (:99-101) and the text encoder
    (models/text_encoders/blip_text_encoder.py:38-41) return it unnormalised."""
    return F.normalize(tar, dim=-1)


@pytest.mark.parametrize("seed", range(3))
def test_pli_clip_loss_is_the_official_batch_classification_loss(seed):
    # raw CLIP features: norms around 10, logits in the tens, as the official fp32 code sees them
    masked, text, target = (features(16, 512, seed=seed + 10 * k, scale=0.5) for k in range(3))
    expected = official_pli_loss(masked + text, target)
    torch.testing.assert_close(pli_loss(masked + text, target, 1.0, "none"), expected, **TOL)
    assert expected.item() > 1.0  # not a saturated (zero) loss


@pytest.mark.parametrize("seed", range(3))
def test_pli_blip_loss_normalises_the_target_only(seed):
    masked, text, target = (features(16, 256, seed=seed + 10 * k, scale=0.5) for k in range(3))
    expected = official_pli_loss(masked + text, official_blip_target(target))
    torch.testing.assert_close(pli_loss(masked + text, target, 1.0, "target"), expected, **TOL)
    assert not torch.allclose(pli_loss(masked + text, target, 1.0, "none"), expected, atol=1e-3)


@pytest.mark.parametrize(
    ("experiment", "normalize"), [("pli_clip_b32_imagenet", "none"), ("pli_blip_imagenet", "target")]
)
def test_pli_training_step_is_the_official_loss_of_its_features(experiment, normalize):
    """The method's own training step (its masks, towers and the experiment's ``normalize``) equals the
    official formula applied to the same three features."""
    method_cfg = OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml")["method"]
    assert method_cfg.normalize == normalize
    backbone = {"open_clip": dict(name="tiny", kind="open_clip", model="tiny")}
    if normalize == "target":
        backbone = {"hf_blip": dict(name="tiny_blip", kind="hf_blip", model="tiny")}
    (spec,) = backbone.values()
    method = build_method(spec, {"kind": "pli", "mask_ratio": 0.5, "normalize": normalize})
    method.train()
    size = method.encoder.image_size
    pixels = features(4, 3, size, size, seed=1)
    captions = ["a red circle", "two blue squares", "a green triangle on the left", "a purple cross"]
    loss = method.training_step({"pixels": pixels, "caption": captions}, 0)
    enc = method.encoder
    keep = method.draw_keep(4, batch_idx=0)
    ref = enc.encode_image(pixels, keep=keep) + enc.encode_text(enc.tokenize(captions))
    tar = enc.encode_image(pixels)
    tar = official_blip_target(tar) if normalize == "target" else tar
    torch.testing.assert_close(loss, official_pli_loss(ref, tar), **TOL)


# ---- LinCIR -------------------------------------------------------------------------------------------
def official_lincir_loss(method, original_tokens, replaced_tokens, l2_normalize=False) -> torch.Tensor:
    """navervision/lincir train_phi.py:227-241: text_embeds of the original caption; input = a clone plus
    ``1.0 · rand(B).unsqueeze(-1) · randn(B, D)`` (one uniform per caption, drawn before the Gaussian, both
    from the global RNG); optional L2 normalisation; φ; the replaced caption encoded with φ's output in
    every pseudo-token; MSE (mean) between the two text embeddings in float32. The text encoder is zscir's
    tiny one here (what is compared is the noise and the loss around it)."""
    enc = method.encoder
    original_text_embeddings = enc.encode_text(original_tokens)
    input_features = original_text_embeddings.clone()
    input_features += (
        1.0
        * torch.rand(input_features.shape[0], device=input_features.device).unsqueeze(-1)
        * torch.randn(input_features.shape, device=input_features.device)
    )
    if l2_normalize:
        input_features = F.normalize(input_features, dim=-1)
    estimated_token_embeddings = method.phi(input_features)
    replaced_text_embeddings = enc.encode_text_with_pseudo(replaced_tokens, estimated_token_embeddings)
    return F.mse_loss(replaced_text_embeddings.float(), original_text_embeddings.float(), reduction="mean")


def test_lincir_noise_uses_the_official_draws():
    z = features(8, 32, seed=3)
    torch.manual_seed(5)
    official = z.clone()
    official += 1.0 * torch.rand(z.shape[0]).unsqueeze(-1) * torch.randn(z.shape)
    torch.manual_seed(5)
    torch.testing.assert_close(add_noise(z, 1.0), official, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("l2_normalize", [False, True])
def test_lincir_loss_is_the_official_noise_and_mse(l2_normalize):
    method = build_method(
        dict(name="tiny_hf", kind="hf_clip", model="tiny"),
        {"kind": "lincir", "normalize_input": l2_normalize},
    )
    method.train()  # φ's dropout draws from the global RNG after the noise, in both computations
    enc = method.encoder
    original = enc.tokenize(["a big red dog runs", "two blue squares on the left", "a cat"])
    replaced = enc.tokenize(["a $ runs", "two $ on the $", "a $"])
    torch.manual_seed(11)
    ours = method.self_masking_loss(original, replaced)
    torch.manual_seed(11)
    with torch.no_grad():  # zscir encodes the frozen caption without a graph; values are the same
        expected = official_lincir_loss(method, original, replaced, l2_normalize)
    torch.testing.assert_close(ours, expected, **TOL)
    torch.manual_seed(12)
    assert not torch.allclose(
        method.self_masking_loss(original, replaced), expected, atol=1e-4
    )  # draws matter


# ---- CAM-TI: the original (Pic2Word) loss -------------------------------------------------------------
def official_pic2word_loss(image_features, text_features, logit_scale) -> torch.Tensor:
    """google-research/composed_image_retrieval src/trainer.py:102-156 (``get_loss_img2text``, one
    process): both features L2-normalised (:107-108), logit scale = CLIP's ``logit_scale.exp()`` (:109),
    cross-entropy of image→text and of text→image logits against ``arange(B)`` (:147-154), averaged (:155);
    ``loss_img``/``loss_txt`` are ``nn.CrossEntropyLoss()`` (:163-164)."""
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    ground_truth = torch.arange(len(image_features)).long()
    logits_per_image = logit_scale * image_features @ text_features.t()
    loss_img_val = torch.nn.CrossEntropyLoss()(logits_per_image, ground_truth)
    logits_per_text = logit_scale * text_features @ image_features.t()
    loss_txt_val = torch.nn.CrossEntropyLoss()(logits_per_text, ground_truth)
    return (loss_img_val + loss_txt_val) / 2


@pytest.mark.parametrize("seed", range(3))
def test_cam_ti_original_loss_is_pic2words_contrastive_loss(seed):
    cfg = OmegaConf.load(CONF_DIR / "method" / "cam_ti.yaml")
    assert cfg.symmetric is True
    logit_scale = torch.tensor(math.log(100.0)).exp()  # OpenAI CLIP's learned scale, clamped at 100
    assert 1.0 / cfg.temperature == pytest.approx(logit_scale.item(), rel=1e-6)
    pseudo_text, image = features(12, 64, seed=seed), features(12, 64, seed=seed + 100, scale=3.0)
    ours = contrastive_loss(pseudo_text, image, torch.arange(12), cfg.temperature, cfg.symmetric)
    torch.testing.assert_close(ours, official_pic2word_loss(image, pseudo_text, logit_scale), **TOL)
