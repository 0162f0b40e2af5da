"""The BLIP encoder (``kind: hf_blip``) against the library it wraps: unmasked features equal
``BlipForImageTextRetrieval``'s ITC scores, keeping every patch equals no dropping, pseudo-token
injection, tower bookkeeping, and a clear offline failure for named weights."""

import pytest
import torch
import torch.nn.functional as F

from zscir.backbones import BackboneLoadError, build_encoder, random_keep
from zscir.backbones.hf_blip_encoder import tiny_vocab


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(kind="hf_blip", model="tiny")


def pixels(encoder, n: int, seed: int = 0) -> torch.Tensor:
    size = encoder.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_placeholder_id_comes_from_the_bert_tokenizer(encoder):
    assert encoder.placeholder_id == tiny_vocab().index("$")
    assert encoder.placeholder_id != 259  # CLIP's id; BLIP's vocabulary differs
    ids = encoder.tokenize(["a photo of $ that is red"])
    assert ids.shape == (1, encoder.context_length)
    assert ids[0, 0].item() == tiny_vocab().index("[CLS]")
    assert ids[0, 4].item() == encoder.placeholder_id


def test_unmasked_features_equal_the_library(encoder):
    images = pixels(encoder, 3)
    ids = encoder.tokenize(["a red circle", "two blue squares on the left", "a cross"])
    with torch.no_grad():
        image, text = encoder.encode_image(images), encoder.encode_text(ids)
        itc = encoder.model(
            input_ids=ids, pixel_values=images, attention_mask=(ids != 0).long(), use_itm_head=False
        ).itm_score
        vision = encoder.model.vision_model(pixel_values=images).last_hidden_state[:, 0]
    assert image.shape == text.shape == (3, encoder.embed_dim)
    torch.testing.assert_close(F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T, itc)
    torch.testing.assert_close(image, encoder.model.vision_proj(vision))


def test_padding_does_not_change_text_features(encoder):
    short = build_encoder(kind="hf_blip", model="tiny")
    short.context_length = 24
    captions = ["a red circle", "two blue squares on the left"]
    with torch.no_grad():
        torch.testing.assert_close(
            short.encode_text(short.tokenize(captions)),
            encoder.encode_text(encoder.tokenize(captions)),
            atol=1e-5,
            rtol=1e-5,
        )


def test_keeping_every_patch_equals_no_keep(encoder):
    images = pixels(encoder, 2)
    keep = torch.arange(encoder.num_patches).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.encode_image(images, keep=keep), encoder.encode_image(images), atol=1e-5, rtol=1e-5
        )


def test_dropping_patches_changes_features_per_sample(encoder):
    images = pixels(encoder, 2)
    keep = random_keep(2, encoder.num_patches, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dropped = encoder.encode_image(images, keep=keep)
        assert dropped.shape == (2, encoder.embed_dim)
        assert not torch.allclose(dropped, encoder.encode_image(images), atol=1e-4)
        alone = encoder.encode_image(images[1:], keep=keep[1:])
    torch.testing.assert_close(alone, dropped[1:], atol=1e-5, rtol=1e-5)


def test_positional_embedding_is_added_before_dropping(encoder):
    images = pixels(encoder, 1)
    with torch.no_grad():
        a = encoder.encode_image(images, keep=torch.tensor([[0, 1, 9]]))
        b = encoder.encode_image(images, keep=torch.tensor([[9, 1, 0]]))
        c = encoder.encode_image(images, keep=torch.tensor([[0, 1, 10]]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, c, atol=1e-5)


def test_pseudo_injection_with_own_embedding_equals_plain_encoding(encoder):
    ids = encoder.tokenize(["a photo of the red", "the blue"])
    pos = torch.tensor([4, 1])  # "the" in both rows ([CLS] is position 0)
    assert (ids[torch.arange(2), pos] == tiny_vocab().index("the")).all()
    own = encoder.token_embedding()(ids)[torch.arange(2), pos].detach()
    masked = ids.clone()
    masked[torch.arange(2), pos] = encoder.placeholder_id
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.encode_text_with_pseudo(masked, own), encoder.encode_text(ids), atol=1e-5, rtol=1e-5
        )
        assert not torch.allclose(encoder.encode_text(masked), encoder.encode_text(ids), atol=1e-5)


def test_pseudo_gradients_reach_the_pseudo_token(encoder):
    pseudo = torch.randn(1, encoder.token_dim, requires_grad=True)
    encoder.encode_text_with_pseudo(encoder.tokenize(["a photo of $ that is red"]), pseudo).sum().backward()
    assert pseudo.grad is not None
    assert pseudo.grad.abs().sum() > 0


def test_towers_are_disjoint_and_leave_out_only_the_matching_heads(encoder):
    image, text = encoder.tower_parameters("image"), encoder.tower_parameters("text")
    assert not {id(p) for p in image} & {id(p) for p in text}
    ids = {id(p) for p in image} | {id(p) for p in text}
    leftover = [n for n, p in encoder.named_parameters() if id(p) not in ids]
    assert leftover
    assert all("crossattention" in n or "itm_head" in n for n in leftover), leftover


def test_random_init_is_reproducible_from_init_seed():
    a = build_encoder(kind="hf_blip", model="tiny", init_seed=3).state_dict()
    b = build_encoder(kind="hf_blip", model="tiny", init_seed=3).state_dict()
    c = build_encoder(kind="hf_blip", model="tiny", init_seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_named_weights_offline_fail_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneLoadError) as err:
        build_encoder(kind="hf_blip", model="Salesforce/blip-itm-base-coco", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "Salesforce/blip-itm-base-coco" in message
    assert str(tmp_path) in message
    assert "backbone.model=/path/to/" in message
