"""zscir's Hugging Face CLIP encoder (``kind: hf_clip``, LinCIR's backbone) against transformers and a
transcription of LinCIR's official pseudo-token encoder, on a full-size ViT-L/14 with random weights
saved by ``save_pretrained`` and loaded by path (``backbone.model=<dir>``).

Tolerance as in test_openai_clip_parity.py: max |ours - reference| <= 1e-5 x max |reference| (fp32).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from zscir.backbones import build_encoder

with warnings.catch_warnings():  # openai-clip imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip

pytestmark = pytest.mark.slow  # a 428M-parameter model built, saved and loaded: ~1 min on 2 CPU cores

#: The values of https://huggingface.co/openai/clip-vit-large-patch14/blob/main/config.json that shape
#: the model (text: 12 x 768, vision: 24 x 1024 patch 14 at 224 px, both QuickGELU, 768-d projection;
#: eos_token_id 2 makes transformers pool at the argmax token id, as OpenAI's CLIP does).
OPENAI_CLIP_VIT_L14 = dict(
    projection_dim=768,
    logit_scale_init_value=2.6592,
    text_config=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        projection_dim=768,
    ),
    vision_config=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
    ),
)
#: transformers initialises q/k with std width^-0.5 x (2 x layers)^-0.5, ~7x below OpenAI's init: attention
#: is then near uniform and noise images all pool to the same feature (cosine 0.999). Scaled up here, per
#: tower (captions differ token by token, so the text tower needs less).
QK_SCALE = {"vision_model": 20.0, "text_model": 3.0}
TOL = 1e-5


def assert_features_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    scale = float(ref.abs().max())
    err = float((ours - ref).abs().max())
    assert err <= tol * scale, f"max |ours - reference| = {err:.3g} > {tol} x {scale:.3g}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(zscir encoder loaded from a save_pretrained directory, the transformers model saved there)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.CLIPModel(transformers.CLIPConfig(**OPENAI_CLIP_VIT_L14)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(QK_SCALE[name.split(".")[0]])
    path = tmp_path_factory.mktemp("hf") / "clip-vit-large-patch14"
    model.save_pretrained(path)
    return build_encoder(kind="hf_clip", model=str(path)), model


def lincir_encode_with_pseudo_tokens_hf(
    model: transformers.CLIPModel, text: torch.Tensor, pseudo: torch.Tensor
):
    """Transcription of LinCIR's ``encode_with_pseudo_tokens_HF`` (navervision/lincir
    encode_with_pseudo_tokens.py, commit 7647a4d) against transformers 5: every ``$`` (token 259) takes the
    row's pseudo-token (lines 9-12), position embeddings are added (line 13), the encoder runs under a
    causal mask (lines 14-20; built here as an additive [B, 1, T, T] mask, which the current encoder
    takes as ``attention_mask``), then the final layer norm, pooling at the argmax token id (the
    end-of-text token) and the text projection (lines 21-27)."""
    tm = model.text_model
    x = tm.embeddings.token_embedding(text)
    x = torch.where(text.unsqueeze(-1) == 259, pseudo.unsqueeze(1), x)
    x = x + tm.embeddings.position_embedding(tm.embeddings.position_ids[:, : text.shape[1]])
    n, t = text.shape
    causal = torch.full((t, t), float("-inf")).triu(1).expand(n, 1, t, t)
    x = tm.final_layer_norm(tm.encoder(inputs_embeds=x, attention_mask=causal).last_hidden_state)
    return model.text_projection(x[torch.arange(n), text.argmax(dim=-1)])


def test_loaded_config_is_the_hub_config(pair):
    encoder, _ = pair
    cfg = encoder.model.config
    for tower in ("text_config", "vision_config"):
        for key, value in OPENAI_CLIP_VIT_L14[tower].items():
            assert getattr(getattr(cfg, tower), key) == value, (tower, key)
    assert (encoder.embed_dim, encoder.token_dim, encoder.context_length) == (768, 768, 77)
    assert (encoder.image_size, encoder.num_patches) == (224, 256)


def test_image_features_equal_transformers(pair):
    encoder, model = pair
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = encoder.encode_image(pixels)
        theirs = model.get_image_features(pixel_values=pixels).pooler_output
    assert_features_close(ours, theirs)
    cos = torch.nn.functional.normalize(theirs, dim=-1)
    assert float(cos[0] @ cos[1]) < 0.9


def test_text_features_equal_transformers_on_the_full_context(pair):
    encoder, model = pair
    captions = ["a photo of a cat", "a red car parked on the street at night", "", "$ is here"]
    ids = clip.tokenize(captions)  # what LinCIR's evaluation feeds the model
    assert torch.equal(encoder.tokenize(captions), ids)
    with torch.no_grad():
        ours = encoder.encode_text(ids)
        theirs = model.get_text_features(input_ids=ids).pooler_output  # all 77 positions
    assert_features_close(ours, theirs)


def test_pseudo_tokens_equal_lincir(pair):
    encoder, model = pair
    ids = clip.tokenize(["a photo of $ that is red", "$ and $ side by side", "change $ to a dog"])
    pseudo = 0.3 * torch.randn(3, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = encoder.encode_text_with_pseudo(ids, pseudo)
        theirs = lincir_encode_with_pseudo_tokens_hf(model, ids, pseudo)
        plain = model.get_text_features(input_ids=ids).pooler_output
    assert_features_close(ours, theirs)
    assert float((theirs - plain).abs().max()) > 100 * TOL * float(plain.abs().max())  # injection matters
