"""Pic2Word against transcriptions of the official code (google-research/composed_image_retrieval at
8c05329), on the same weights and tensors, to 1e-6:

* the loss (``get_loss_img2text``, src/trainer.py:102-156) on identical features, and end to end on an OpenAI
  CLIP model (OpenAI's ``clip`` package, the class Pic2Word's model/model.py extends) with the same mapping;
* the pseudo-word in text: zscir replaces the embedding of ``$`` in "a photo of $" where the official code
  inserts the image token before the end-of-text of "a photo of" (``encode_text_img``, model/model.py:422-437),
  and in "a photo of $ , {caption}" where it splices the token over ``*`` (``encode_text_img_retrieval``,
  model/model.py:468-499).

The transcriptions below are the reference; zscir's encoder (open_clip, converted from the OpenAI weights)
and method are what is tested.
"""

import warnings

import clip
import open_clip
import pytest
import torch
import torch.nn.functional as F

from zscir.backbones.open_clip_encoder import OpenCLIPEncoder
from zscir.methods import build_method
from zscir.methods.inversion import encode_with_template
from zscir.methods.pic2word import PROMPTS, Img2Text, pic2word_loss

warnings.filterwarnings("ignore", message=".*self.log.*")

TOL = dict(rtol=1e-6, atol=1e-6)
CAPTIONS = ["is red and has a larger circle", "two blue squares instead", "make it green.", "no cross"]


# ---- transcriptions of the official code --------------------------------------------------------------
def official_encode_text_img(model, text, img_tokens):
    """model/model.py:422-437: the image token goes in before the first row's end-of-text; the sequence
    is shifted right by one (the last position dropped) and pooled at end-of-text + 1."""
    b_size = img_tokens.size(0)
    x = model.token_embedding(text).type(model.dtype)
    collect_ind = text == model.vocab_size - 1  # self.end_id (model/model.py:347)
    collect_ind = collect_ind.nonzero()[:, 1]
    img_tokens = img_tokens.view(b_size, 1, -1)
    x = torch.cat([x[:, : collect_ind[0]], img_tokens, x[:, collect_ind[0] : -1]], dim=1)
    x = x + model.positional_embedding.type(model.dtype)
    x = x.permute(1, 0, 2)
    x = model.transformer(x)
    x = x.permute(1, 0, 2)
    x = model.ln_final(x).type(model.dtype)
    return x[torch.arange(x.size(0)), collect_ind + 1] @ model.text_projection


def official_encode_text_img_retrieval(model, text, img_tokens, split_ind):
    """model/model.py:468-499 (``repeat=False``, one token per row): the token replaces the first row's
    ``split_ind`` position in every row; pooled at end-of-text."""
    b_size = img_tokens.shape[0]
    x = model.token_embedding(text).type(model.dtype)
    collect_ind = text == model.vocab_size - 1
    collect_ind = collect_ind.nonzero()[:, 1]
    ind_insert = text[0] == split_ind
    img_tokens = img_tokens.view(b_size, 1, -1)
    ind_insert = ind_insert.nonzero()[0]
    x = torch.cat([x[:, :ind_insert], img_tokens, x[:, ind_insert + 1 :]], dim=1)
    x = x + model.positional_embedding.type(model.dtype)
    x = x.permute(1, 0, 2)
    x = model.transformer(x)
    x = x.permute(1, 0, 2)
    x = model.ln_final(x).type(model.dtype)
    return x[torch.arange(x.size(0)), collect_ind] @ model.text_projection


def official_loss_from_features(image_features, text_features, logit_scale):
    """src/trainer.py:107-110, 146-155 (single process): normalise both, logits at exp(logit_scale),
    cross-entropy in both directions, averaged."""
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    ground_truth = torch.arange(len(image_features)).long()
    logits_per_image = logit_scale * image_features @ text_features.t()
    loss_img_val = F.cross_entropy(logits_per_image, ground_truth)
    logits_per_text = logit_scale * text_features @ image_features.t()
    loss_txt_val = F.cross_entropy(logits_per_text, ground_truth)
    return (loss_img_val + loss_txt_val) / 2


def official_get_loss_img2text(model, img2text, images):
    """src/trainer.py:94-110: image features without gradients, token = img2text(features), text =
    encode_text_img(tokenize("a photo of"), token), the model's own logit scale."""
    with torch.no_grad():
        image_features = model.encode_image(images)
    token_features = img2text(image_features)
    text = clip.tokenize("a photo of").view(1, -1).repeat(token_features.size(0), 1)
    text_features = official_encode_text_img(model, text, token_features)
    return official_loss_from_features(image_features, text_features, model.logit_scale.exp())


# ---- the same weights in OpenAI's CLIP and in zscir's encoder ---------------------------------------------
@pytest.fixture(scope="module")
def models():
    """A small random OpenAI CLIP (fp32, QuickGELU) and zscir's open_clip encoder holding its weights."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = clip.model.CLIP(
            embed_dim=48,
            image_resolution=32,
            vision_layers=2,
            vision_width=64,
            vision_patch_size=8,
            context_length=77,
            vocab_size=49408,
            transformer_width=64,
            transformer_heads=1,  # open_clip derives heads = width // 64 from the state dict
            transformer_layers=2,
        ).eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    ours = open_clip.model.build_model_from_openai_state_dict(state, quick_gelu=True, cast_dtype=None)
    ours.float().load_state_dict(reference.state_dict())  # the builder rounded the weights to fp16
    transform = open_clip.image_transform(32, is_train=False)
    encoder = OpenCLIPEncoder(ours, open_clip.tokenizer.SimpleTokenizer(context_length=77), transform, "t")
    return reference, encoder


def tokens(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", range(3))
def test_loss_is_the_official_loss_on_identical_features(seed):
    image, text = tokens(16, 768, seed) * 0.5, tokens(16, 768, seed + 100) * 0.5
    expected = official_loss_from_features(image, text, torch.tensor(100.0))
    torch.testing.assert_close(pic2word_loss(image, text, 100.0), expected, **TOL)
    assert expected.item() > 1.0  # not a saturated loss


def test_training_text_is_the_official_insert_before_end_of_text(models):
    reference, encoder = models
    pseudo = tokens(4, 64, seed=1)
    with torch.no_grad():
        expected = official_encode_text_img(reference, clip.tokenize(["a photo of"] * 4), pseudo)
        ours = encoder.encode_text_with_pseudo(encoder.tokenize(["a photo of $"] * 4), pseudo)
    torch.testing.assert_close(ours, expected, **TOL)


def test_inference_text_with_dollar_is_the_official_splice_over_star(models):
    reference, encoder = models
    pseudo = tokens(4, 64, seed=2)
    star = [PROMPTS["pic2word"].replace("$", "*").format(caption=c) for c in CAPTIONS]
    star_ids = clip.tokenize(star)
    dollar_ids = encoder.tokenize([PROMPTS["pic2word"].format(caption=c) for c in CAPTIONS])
    # the two prompts tokenise alike except at the pseudo-word: '*' (official src/eval_utils.py:322) vs '$'
    star_id = int(clip.tokenize(["*"])[0][1])
    assert (star_id, encoder.placeholder_id) == (265, 259)
    differ = (star_ids != dollar_ids).nonzero().tolist()
    assert differ == [[row, 4] for row in range(4)]
    with torch.no_grad():
        expected = official_encode_text_img_retrieval(reference, star_ids, pseudo, split_ind=star_id)
        ours = encode_with_template(encoder, pseudo, CAPTIONS, PROMPTS["pic2word"])
    torch.testing.assert_close(ours, expected, **TOL)


def test_method_loss_is_the_official_get_loss_img2text(models):
    """The whole training loss: OpenAI CLIP + the official computation vs the method on the same weights
    (the mapping's dropout off, so both see the same mapping)."""
    reference, encoder = models
    method = build_method({"name": "tiny", "kind": "open_clip", "model": "tiny"}, {"kind": "pic2word"})
    method.encoder = encoder  # the same weights as ``reference``
    method.img2text = Img2Text(encoder.embed_dim, encoder.token_dim)
    method.logit_scale = float(reference.logit_scale.exp())
    method.eval()
    images = tokens(6, 3 * 32 * 32, seed=3).view(6, 3, 32, 32)
    expected = official_get_loss_img2text(reference, method.img2text, images)
    ours = method.loss(images)
    torch.testing.assert_close(ours, expected, **TOL)
    # and the gradients the mapping receives
    grads = torch.autograd.grad(expected, list(method.img2text.parameters()))
    ours_grads = torch.autograd.grad(method.loss(images), list(method.img2text.parameters()))
    for a, b in zip(ours_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
