import pytest
import torch

from zscir.backbones import BackboneLoadError, build_encoder, random_keep


@pytest.fixture(scope="module", params=["open_clip", "hf_clip"])
def encoder(request):
    torch.manual_seed(0)
    return build_encoder(kind=request.param, model="tiny")


def test_placeholder_is_clip_dollar(encoder):
    assert encoder.placeholder_id == 259
    ids = encoder.tokenize(["a photo of $ that is red"])
    assert ids.shape == (1, encoder.context_length)
    assert ids[0, 4].item() == 259


def test_encode_image_without_keep_equals_library(encoder):
    pixels = torch.randn(3, 3, encoder.image_size, encoder.image_size)
    ours = encoder.encode_image(pixels)
    if hasattr(encoder.model, "visual"):
        library = encoder.model.encode_image(pixels)
    else:
        library = encoder.model.get_image_features(pixel_values=pixels).pooler_output
    assert ours.shape == (3, encoder.embed_dim)
    torch.testing.assert_close(ours, library)


def test_encode_text_trims_padding_and_equals_the_library_on_the_full_context(encoder):
    ids = encoder.tokenize(["a red circle", "a small blue square left of a big green triangle", ""])
    longest = int((ids != 0).sum(1).max())  # the second caption's tokens incl. start and end of text
    widths = []
    hook = encoder.token_embedding().register_forward_hook(
        lambda _m, inputs, _o: widths.append(inputs[0].shape[1])
    )
    try:
        ours = encoder.encode_text(ids)
    finally:
        hook.remove()
    if hasattr(encoder.model, "visual"):
        library = encoder.model.encode_text(ids)
    else:
        library = encoder.model.get_text_features(input_ids=ids).pooler_output
    assert widths == [longest]
    assert longest < encoder.context_length
    torch.testing.assert_close(ours, library, atol=1e-5, rtol=1e-5)


def test_keeping_every_patch_equals_no_keep(encoder):
    pixels = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    keep = torch.arange(encoder.num_patches).expand(2, -1)
    torch.testing.assert_close(
        encoder.encode_image(pixels, keep=keep), encoder.encode_image(pixels), atol=1e-5, rtol=1e-5
    )


def test_dropping_patches_changes_features_per_sample(encoder):
    pixels = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    keep = random_keep(2, encoder.num_patches, 0.75, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (2, int(encoder.num_patches * 0.25))
    dropped = encoder.encode_image(pixels, keep=keep)
    assert dropped.shape == (2, encoder.embed_dim)
    assert not torch.allclose(dropped, encoder.encode_image(pixels), atol=1e-4)
    # sample 0 with sample 0's kept patches is independent of what sample 1 keeps
    alone = encoder.encode_image(pixels[:1], keep=keep[:1])
    torch.testing.assert_close(alone, dropped[:1], atol=1e-5, rtol=1e-5)


def test_positional_embedding_is_added_before_dropping(encoder):
    """Keeping patches [1, 0] (reordered) must equal keeping [0, 1]: positions travel with the tokens."""
    pixels = torch.randn(1, 3, encoder.image_size, encoder.image_size)
    a = encoder.encode_image(pixels, keep=torch.tensor([[0, 1, 5]]))
    b = encoder.encode_image(pixels, keep=torch.tensor([[5, 1, 0]]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_pseudo_injection_with_own_embedding_equals_plain_encoding(encoder):
    ids = encoder.tokenize(["a big red circle", "two blue squares on the left"])
    word_pos = torch.tensor([3, 2])  # "red", "blue"
    own = encoder.token_embedding()(ids)[torch.arange(2), word_pos + 1].detach()  # +1: start token
    masked = ids.clone()
    masked[torch.arange(2), word_pos + 1] = encoder.placeholder_id
    torch.testing.assert_close(
        encoder.encode_text_with_pseudo(masked, own), encoder.encode_text(ids), atol=1e-5, rtol=1e-5
    )


def test_pseudo_injection_replaces_every_placeholder(encoder):
    ids = encoder.tokenize(["$ and $", "$ and a circle"])
    pseudo = torch.randn(2, encoder.token_dim)
    out = encoder.encode_text_with_pseudo(ids, pseudo)
    other = encoder.encode_text_with_pseudo(ids, pseudo + 1.0)
    assert out.shape == (2, encoder.embed_dim)
    assert not torch.allclose(out, other)
    # the hook is removed afterwards: plain encoding of the same ids no longer sees the pseudo-token
    plain = encoder.encode_text(ids)
    assert not torch.allclose(plain, out)


def test_pseudo_gradients_reach_the_pseudo_token(encoder):
    ids = encoder.tokenize(["a photo of $ that is red"])
    pseudo = torch.randn(1, encoder.token_dim, requires_grad=True)
    encoder.encode_text_with_pseudo(ids, pseudo).sum().backward()
    assert pseudo.grad is not None
    assert pseudo.grad.abs().sum() > 0


def test_random_init_is_reproducible_from_init_seed():
    a = build_encoder(kind="open_clip", model="tiny", init_seed=3)
    b = build_encoder(kind="open_clip", model="tiny", init_seed=3)
    c = build_encoder(kind="open_clip", model="tiny", init_seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tower_freezing_covers_every_parameter_once(encoder):
    image, text = encoder.tower_parameters("image"), encoder.tower_parameters("text")
    ids = {id(p) for p in image} | {id(p) for p in text}
    assert not {id(p) for p in image} & {id(p) for p in text}
    leftover = [n for n, p in encoder.named_parameters() if id(p) not in ids]
    assert all("logit" in n for n in leftover), leftover


@pytest.mark.parametrize(
    ("kind", "model", "hint"),
    [
        ("open_clip", "ViT-B-32", "backbone.pretrained=/path/to/"),
        ("hf_clip", "openai/clip-vit-base-patch32", "backbone.model=/path/to/"),
    ],
)
def test_named_weights_offline_fail_with_a_clear_message(monkeypatch, tmp_path, kind, model, hint):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneLoadError) as err:
        build_encoder(
            kind=kind,
            model=model,
            pretrained="openai" if kind == "open_clip" else None,
            cache_dir=str(tmp_path),
        )
    message = str(err.value)
    assert model in message
    assert str(tmp_path) in message  # where it looked
    assert hint in message  # how to pass a local copy


def test_missing_local_checkpoint_is_named(tmp_path):
    with pytest.raises(BackboneLoadError, match="does not exist"):
        build_encoder(kind="open_clip", model="tiny", checkpoint=str(tmp_path / "nope.pt"))


@pytest.mark.parametrize(
    ("kind", "model", "option", "hint"),
    [
        ("hf_clip", "tiny", {"quick_gelu": True}, "hidden_act"),
        ("hf_clip", "tiny", {"pretrained": "openai"}, "backbone.model"),
        ("open_clip", "tiny", {"caption_preprocess": "blip_caption"}, "which takes context_length"),
    ],
)
def test_an_option_the_kind_does_not_take_is_refused_by_name(kind, model, option, hint):
    # before the builders were a registry, an HF kind silently ignored `pretrained`
    with pytest.raises(BackboneLoadError, match=f"{next(iter(option))} do not apply to kind={kind}") as err:
        build_encoder(kind, model, **option)
    assert hint in str(err.value)


def test_every_backbone_config_names_a_registered_kind():
    from omegaconf import OmegaConf

    from zscir.backbones import BACKBONES, backbone_builder
    from zscir.cli.config import CONF_DIR

    files = sorted((CONF_DIR / "backbone").glob("*.yaml"))
    assert files
    for file in files:
        assert OmegaConf.load(file).kind in BACKBONES, file.name
    with pytest.raises(BackboneLoadError, match="unknown backbone kind 'clip'"):
        backbone_builder("clip")
