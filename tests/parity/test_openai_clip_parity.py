"""zscir's open_clip encoder against OpenAI's own ``clip`` package on full-size ViT-B/32 and ViT-L/14.

Random weights in OpenAI's on-disk format (fp16 state dict, and the TorchScript archive OpenAI released)
are loaded through the project's normal path (``build_encoder(kind="open_clip", pretrained=<file>)``) and
compared with ``clip.model.build_model`` on the same file: image and text features, SEARLE's
first-``$`` pseudo-token encoding and LinCIR's every-``$`` injection, the image transform and the
tokenizer. Tolerance (fp32): the largest absolute difference must stay below TOL = 1e-5 of the largest
feature magnitude (features have norm ~20), measured <= 4e-6 for text and pseudo-token encodings; image
features get IMAGE_TOL = 2e-5 (measured 6.7e-6 for B/32 and 8.6e-6 for L/14: open_clip's and OpenAI's
attention kernels round differently over 24 layers). Building the model with GELU instead of
QuickGELU moves features by 2e-2 to 5e-2 of their magnitude.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from PIL import Image

from zscir.backbones import BackboneLoadError, build_encoder

pytestmark = pytest.mark.slow  # full-size models: ~1-2 min per architecture on 2 CPU cores

with warnings.catch_warnings():  # openai-clip imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip
    import clip.model

#: OpenAI's hyper-parameters (``clip.model.CLIP`` arguments) of the released ViT-B/32 and ViT-L/14,
#: as ``clip.model.build_model`` reads them off the released state dicts (openai/CLIP clip/model.py
#: ``build_model``; the same values as open_clip's ViT-B-32.json / ViT-L-14.json).
OPENAI_ARCHS = {
    "ViT-B-32": dict(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=32,
        context_length=77,
        vocab_size=49408,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    ),
    "ViT-L-14": dict(
        embed_dim=768,
        image_resolution=224,
        vision_layers=24,
        vision_width=1024,
        vision_patch_size=14,
        context_length=77,
        vocab_size=49408,
        transformer_width=768,
        transformer_heads=12,
        transformer_layers=12,
    ),
}
#: CLIP's initialisation gives nearly parallel features for different inputs and MLP inputs so small
#: that GELU and QuickGELU barely differ; scaling these weights up makes both differences real.
SCALED = ("c_fc.weight", "in_proj_weight", "conv1.weight")
TOL = 1e-5
IMAGE_TOL = 2e-5
#: "$" must stand alone to be token 259: glued to punctuation it becomes another token ("$," ->
#: "$" + ","; "($)" and "$." are single tokens), in OpenAI's tokenizer as in zscir's
CAPTIONS_WITH_DOLLAR = [
    "a photo of $ that is red",
    "$ and $ side by side",  # two placeholders: only the first is a pseudo-token in SEARLE
    "change $ to a $ with a hat",
    "$ ! now $ , again",
]


def openai_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random, non-degenerate state dict in OpenAI's format (their key names, fp16 as released)."""
    torch.manual_seed(seed)
    model = clip.model.CLIP(**OPENAI_ARCHS[arch])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(SCALED):
                p.mul_(3.0)
    return {k: v.half() for k, v in model.state_dict().items()}


def reference(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """OpenAI's model from a state dict, as ``clip.load(jit=False)`` builds it (then fp32)."""
    return clip.model.build_model(copy.deepcopy(state)).float().eval()


def assert_features_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    scale = float(ref.abs().max())
    err = float((ours - ref).abs().max())
    assert err <= tol * scale, f"max |ours - reference| = {err:.3g} > {tol} x {scale:.3g}"


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module", params=["ViT-B-32", pytest.param("ViT-L-14", marks=pytest.mark.slow)])
def pair(request, tmp_path_factory):
    """(architecture, weights file, zscir encoder, OpenAI reference) on the same random weights."""
    arch = request.param
    state = openai_state_dict(arch)
    path = tmp_path_factory.mktemp("openai") / f"{arch}.pt"
    torch.save(state, path)
    encoder = build_encoder(kind="open_clip", model=arch, pretrained=str(path), quick_gelu=True)
    return arch, path, encoder, reference(state)


def pixels(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pseudo_tokens(n: int, width: int, seed: int = 1) -> torch.Tensor:
    return 0.3 * torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def searle_encode_with_pseudo_tokens(model: torch.nn.Module, text: torch.Tensor, pseudo: torch.Tensor):
    """Transcription of SEARLE's ``encode_with_pseudo_tokens`` (miccunifi/SEARLE
    src/encode_with_pseudo_tokens.py, commit 9afa4f3, num_tokens=1): only the FIRST ``$`` (token 259)
    of each row becomes the row's pseudo-token (lines 15-17, 23-24), then OpenAI's text tower on the
    full context, pooled at the end-of-text token (lines 31-39)."""
    x = model.token_embedding(text).clone()
    hits = (text == 259).nonzero()  # [N, 2] (row, column), row-major; every row must hold a "$"
    _, per_row = torch.unique(hits[:, 0], return_counts=True)
    first_hit = torch.cumsum(per_row, dim=0) - per_row  # where each row's run of hits starts
    x[torch.arange(x.shape[0]), hits[first_hit, 1]] = pseudo
    return openai_text_tower(model, x, text)


def lincir_style_encode(model: torch.nn.Module, text: torch.Tensor, pseudo: torch.Tensor):
    """LinCIR's injection rule (navervision/lincir encode_with_pseudo_tokens.py, commit 7647a4d,
    lines 9-12: ``torch.where(text == 259, pseudo, embedding)``, EVERY ``$``) on OpenAI's text tower."""
    x = torch.where((text == 259).unsqueeze(-1), pseudo.unsqueeze(1), model.token_embedding(text))
    return openai_text_tower(model, x, text)


def openai_text_tower(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """openai/CLIP clip/model.py ``CLIP.encode_text`` after the token lookup."""
    x = x + model.positional_embedding
    x = model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ model.text_projection


def test_architecture_matches_openai(pair):
    arch, _, encoder, ref = pair
    cfg = OPENAI_ARCHS[arch]
    assert encoder.embed_dim == cfg["embed_dim"] == ref.text_projection.shape[1]
    assert encoder.token_dim == cfg["transformer_width"]
    assert encoder.context_length == cfg["context_length"]
    assert encoder.image_size == cfg["image_resolution"]
    assert encoder.num_patches == (cfg["image_resolution"] // cfg["vision_patch_size"]) ** 2
    ours = {k: v for k, v in encoder.model.state_dict().items() if k != "attn_mask"}
    assert ours.keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    assert {type(m).__name__ for m in encoder.model.modules()} >= {"QuickGELU"}
    assert not any(isinstance(m, torch.nn.GELU) for m in encoder.model.modules())


def test_image_features_equal_openai(pair):
    arch, _, encoder, ref = pair
    x = pixels(2 if arch == "ViT-L-14" else 3)
    with torch.no_grad():
        ours, theirs = encoder.encode_image(x), ref.encode_image(x)
    assert_features_close(ours, theirs, IMAGE_TOL)
    cos = torch.nn.functional.normalize(theirs, dim=-1)
    assert float((cos @ cos.T).triu(1).max()) < 0.9  # different images, different features


def test_text_features_equal_openai(pair):
    _, _, encoder, ref = pair
    captions = ["a photo of a cat", "a red car parked on the street at night", "", "$ is here"]
    ids = encoder.tokenize(captions)
    assert torch.equal(ids, clip.tokenize(captions))
    with torch.no_grad():
        ours, theirs = encoder.encode_text(ids), ref.encode_text(ids)
    assert_features_close(ours, theirs)


def test_first_dollar_pseudo_tokens_equal_searle(pair):
    _, _, encoder, ref = pair
    ids = clip.tokenize(CAPTIONS_WITH_DOLLAR)
    pseudo = pseudo_tokens(len(ids), encoder.token_dim)
    with torch.no_grad():
        ours = encoder.encode_text_with_pseudo(
            encoder.tokenize(CAPTIONS_WITH_DOLLAR), pseudo, occurrences="first"
        )
        theirs = searle_encode_with_pseudo_tokens(ref, ids, pseudo)
        every = encoder.encode_text_with_pseudo(ids, pseudo)
    assert_features_close(ours, theirs)
    # rows 1-3 hold a second "$": replacing it too must change them (the option is not a no-op)
    assert (ids == 259).sum(1).tolist() == [1, 2, 2, 2]
    for row in (1, 2, 3):
        assert max_rel_err(every[row], theirs[row]) > 100 * TOL
    assert_features_close(every[:1], theirs[:1])


def test_every_dollar_pseudo_tokens_equal_lincir_rule(pair):
    _, _, encoder, ref = pair
    ids = clip.tokenize(CAPTIONS_WITH_DOLLAR)
    pseudo = pseudo_tokens(len(ids), encoder.token_dim, seed=2)
    with torch.no_grad():
        ours = encoder.encode_text_with_pseudo(ids, pseudo)  # "all" is the default
        theirs = lincir_style_encode(ref, ids, pseudo)
    assert_features_close(ours, theirs)


def test_image_transform_equals_openai(pair):
    _, _, encoder, ref = pair
    openai_transform = clip.clip._transform(ref.visual.input_resolution)
    gen = torch.Generator().manual_seed(0)

    def noise(mode: str, size: tuple[int, int]) -> Image.Image:
        bands = len(Image.new(mode, (1, 1)).getbands())
        arr = torch.randint(0, 256, (size[1], size[0], bands), generator=gen, dtype=torch.uint8).numpy()
        return Image.fromarray(arr.squeeze(-1) if bands == 1 else arr, mode)

    images = {
        "RGB": noise("RGB", (640, 480)),
        "RGBA": noise("RGBA", (300, 500)),
        "L": noise("L", (257, 199)),
        "P": noise("RGB", (400, 300)).quantize(colors=64),
        "CMYK": noise("CMYK", (320, 240)),
        "1": noise("L", (230, 230)).convert("1"),
        "tiny": noise("RGB", (3, 5)),
        "very wide": noise("RGB", (2000, 40)),
    }
    for name, image in images.items():
        ours, theirs = encoder.image_transform(image), openai_transform(image)
        assert ours.shape == theirs.shape == (3, 224, 224), name
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)


def test_tokenizer_equals_openai(pair):
    _, _, encoder, _ = pair
    captions = [
        "Hello, World!!! ... (what?) -- 'quoted' \"double\" #hashtag @user 100% $5",
        "Café crème, naïve façade, Ångström, Ærøskøbing, São Paulo",
        "日本語のキャプション and 中文 mixed with English",
        "emoji 🐶🐱 🚗💨 👩‍👩‍👧 and a flag 🇫🇷",
        "&amp; &lt;html&gt; entities and    extra   spaces\tand\ttabs\nnewline",
        '$, $. ($) [$] "$" $\'s $-shaped $$ a$b',
        "ﬁ ligature, full-width ＡＢＣ, and mojibake Ã©",
        " ".join(["a long caption that keeps going"] * 30),  # > 77 tokens: truncated, end-of-text kept
    ]
    ours, theirs = encoder.tokenize(captions), clip.tokenize(captions, truncate=True)
    assert theirs[-1, -1] == 49407
    assert (theirs[:-1] != 0).sum(1).max() < 77
    assert torch.equal(ours, theirs)


def test_torchscript_archive_loads(pair, tmp_path):
    """OpenAI's released files are TorchScript archives; they load through the same option."""
    arch, _, _, ref = pair
    if arch != "ViT-B-32":
        pytest.skip("one architecture is enough for the file format")
    ids = clip.tokenize(["a photo of a cat", "two dogs"])
    traced = torch.jit.trace_module(copy.deepcopy(ref), {"encode_text": (ids,)}, check_trace=False)
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(traced.half(), path)  # released in fp16
    from_archive = build_encoder(kind="open_clip", model=arch, pretrained=str(path), quick_gelu=True)
    for key, value in ref.state_dict().items():  # the image tower's weights came along too
        torch.testing.assert_close(from_archive.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        assert_features_close(from_archive.encode_text(ids), ref.encode_text(ids))


def test_wrong_activation_is_caught(pair):
    """The same file built with GELU (what open_clip's plain ViT-B-32 config gives) fails the
    parity tolerance by orders of magnitude: the tests above can tell the two apart."""
    arch, path, _, ref = pair
    if arch != "ViT-B-32":
        pytest.skip("one architecture is enough to show the tolerance separates the activations")
    wrong = build_encoder(kind="open_clip", model=arch, pretrained=str(path), quick_gelu=False)
    ids = clip.tokenize(["a photo of a cat", "a red car"])
    with torch.no_grad():
        assert max_rel_err(wrong.encode_image(pixels(2)), ref.encode_image(pixels(2))) > 100 * TOL
        assert max_rel_err(wrong.encode_text(ids), ref.encode_text(ids)) > 100 * TOL


def test_openai_tag_gets_quickgelu_from_its_metadata(pair, monkeypatch):
    """``pretrained: openai`` (the clip_vit_b32/l14 configs) builds QuickGELU although open_clip's
    ``ViT-B-32`` config says GELU; the download is replaced by the local random file."""
    arch, path, _, ref = pair
    if arch != "ViT-B-32":
        pytest.skip("the tag logic does not depend on the size")
    import open_clip.factory

    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # open_clip's QuickGELU-mismatch warning must not fire either
        encoder = build_encoder(kind="open_clip", model=arch, pretrained="openai")
    ids = clip.tokenize(["a photo of a cat"])
    with torch.no_grad():
        assert_features_close(encoder.encode_image(pixels(2)), ref.encode_image(pixels(2)), IMAGE_TOL)
        assert_features_close(encoder.encode_text(ids), ref.encode_text(ids))
    with pytest.raises(BackboneLoadError, match=r"backbone.quick_gelu=true"):
        build_encoder(kind="open_clip", model=arch, pretrained="openai", quick_gelu=False)


def test_ddp_training_checkpoint_loads(pair, tmp_path):
    """An open_clip training checkpoint (``state_dict`` wrapper, ``module.`` keys from DDP) loads as
    ``backbone.checkpoint`` on top of a random-init model."""
    arch, _, _, ref = pair
    if arch != "ViT-B-32":
        pytest.skip("one architecture is enough for the file format")
    state = {"module." + k: v.float() for k, v in ref.state_dict().items()}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": state}, path)
    encoder = build_encoder(kind="open_clip", model="ViT-B-32-quickgelu", checkpoint=str(path))
    ids = clip.tokenize(["a photo of a cat"])
    with torch.no_grad():
        assert_features_close(encoder.encode_text(ids), ref.encode_text(ids))
