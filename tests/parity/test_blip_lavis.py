"""The LAVIS BLIP backbone (``kind: lavis_blip``) against LAVIS itself: checkpoints written with LAVIS's
exact key names and shapes load completely, and features equal plain-torch transcriptions of LAVIS's ViT
and BERT forwards (and of the official PLI masked forward) over the same state dict; captions are
processed as LAVIS's ``blip_caption`` does and encoded as the official PLI code does (30 tokens, no
attention mask, dropout while training).

Sources transcribed (salesforce/LAVIS @ 506965b, Chen-Junyang-cn/PLI @ da9cdb4):
  lavis/models/vit.py, lavis/models/med.py, lavis/models/blip_models/blip_feature_extractor.py,
  lavis/models/blip_models/blip_pretrain.py, lavis/configs/models/med_config.json,
  lavis/processors/blip_processors.py, PLI models/image_encoders/blip_image_encoder.py,
  models/text_encoders/blip_text_encoder.py, data/__init__.py.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zscir.backbones import BackboneLoadError, build_encoder, random_keep
from zscir.backbones.hf_blip_encoder import blip_caption, tiny_vocab
from zscir.backbones.lavis_blip_encoder import LAVIS_BLIP_BASE_URL, lavis_to_transformers

# ---- LAVIS's state dict layout ----------------------------------------------------------------------
#: dimensions of LAVIS blip_feature_extractor base (vit.py:476-488 vit_type "base"; med_config.json;
#: blip_feature_extractor.py:183 embed_dim 256) and of the tiny test model (LAVIS_BLIP_ARCHS["tiny"])
DIMS = {
    "base": dict(vw=768, vdepth=12, vheads=12, patch=16, grid=14, tw=768, tdepth=12, theads=12, ff=3072,
                 vocab=30524, positions=512, embed=256),
    "tiny": dict(vw=64, vdepth=2, vheads=4, patch=8, grid=8, tw=64, tdepth=2, theads=4, ff=128,
                 vocab=len(tiny_vocab()) + 2, positions=64, embed=32),
}  # fmt: skip


def vit_shapes(prefix: str, d: dict, grid: int | None = None) -> dict[str, tuple]:
    """``VisionTransformer`` parameters (lavis/models/vit.py:211-246; timm PatchEmbed ``proj``; Block
    :131-149 with Attention :69-71 qkv_bias=True and Mlp :40-42, mlp_ratio 4)."""
    w, g = d["vw"], grid or d["grid"]
    out = {
        f"{prefix}cls_token": (1, 1, w),
        f"{prefix}pos_embed": (1, g * g + 1, w),
        f"{prefix}patch_embed.proj.weight": (w, 3, d["patch"], d["patch"]),
        f"{prefix}patch_embed.proj.bias": (w,),
    }
    for i in range(d["vdepth"]):
        b = f"{prefix}blocks.{i}."
        out |= {
            b + "norm1.weight": (w,), b + "norm1.bias": (w,),
            b + "attn.qkv.weight": (3 * w, w), b + "attn.qkv.bias": (3 * w,),
            b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
            b + "norm2.weight": (w,), b + "norm2.bias": (w,),
            b + "mlp.fc1.weight": (4 * w, w), b + "mlp.fc1.bias": (4 * w,),
            b + "mlp.fc2.weight": (w, 4 * w), b + "mlp.fc2.bias": (w,),
        }  # fmt: skip
    return out | {f"{prefix}norm.weight": (w,), f"{prefix}norm.bias": (w,)}


def bert_shapes(prefix: str, d: dict) -> dict[str, tuple]:
    """med.py ``BertModel(add_pooling_layer=False)``: BertEmbeddings :56-85 (no token types:
    ``add_type_embeddings: false``; the ``position_ids`` buffer is persistent), BertLayer :391-420 with
    cross-attention (``add_cross_attention: true``, key/value over ``encoder_width``), BertSelfAttention
    :142-148, BertSelfOutput :292-297, BertIntermediate :362-365, BertOutput :377-382."""
    w, ff = d["tw"], d["ff"]
    out = {
        f"{prefix}embeddings.position_ids": (1, d["positions"]),
        f"{prefix}embeddings.word_embeddings.weight": (d["vocab"], w),
        f"{prefix}embeddings.position_embeddings.weight": (d["positions"], w),
        f"{prefix}embeddings.LayerNorm.weight": (w,),
        f"{prefix}embeddings.LayerNorm.bias": (w,),
    }
    for i in range(d["tdepth"]):
        layer = f"{prefix}encoder.layer.{i}."
        for att in ("attention.", "crossattention."):
            a = layer + att
            kv_in = d["vw"] if att == "crossattention." else w  # encoder_width
            out |= {
                a + "self.query.weight": (w, w), a + "self.query.bias": (w,),
                a + "self.key.weight": (w, kv_in), a + "self.key.bias": (w,),
                a + "self.value.weight": (w, kv_in), a + "self.value.bias": (w,),
                a + "output.dense.weight": (w, w), a + "output.dense.bias": (w,),
                a + "output.LayerNorm.weight": (w,), a + "output.LayerNorm.bias": (w,),
            }  # fmt: skip
        out |= {
            layer + "intermediate.dense.weight": (ff, w), layer + "intermediate.dense.bias": (ff,),
            layer + "output.dense.weight": (w, ff), layer + "output.dense.bias": (w,),
            layer + "output.LayerNorm.weight": (w,), layer + "output.LayerNorm.bias": (w,),
        }  # fmt: skip
    return out


def feature_extractor_shapes(d: dict, grid: int | None = None) -> dict[str, tuple]:
    """``BlipFeatureExtractor.state_dict()`` (blip_feature_extractor.py:39-55)."""
    proj = {
        "vision_proj.weight": (d["embed"], d["vw"]), "vision_proj.bias": (d["embed"],),
        "text_proj.weight": (d["embed"], d["tw"]), "text_proj.bias": (d["embed"],),
        "temp": (),
    }  # fmt: skip
    return vit_shapes("visual_encoder.", d, grid) | bert_shapes("text_encoder.", d) | proj


def pretrain_only_shapes(d: dict, queue: int) -> dict[str, tuple]:
    """What ``BlipPretrain`` (blip_pretrain.py:67-106) saves besides the feature extractor's keys: the
    caption decoder (med.py BertLMHeadModel :1131-1141: ``bert`` + ``cls.predictions`` :648-677), the ITM
    head, the momentum copies and the ITC queues (queue_size 57600, blip_pretrain.py:376)."""
    w, v = d["tw"], d["vocab"]
    head = {
        "text_decoder.cls.predictions.bias": (v,),
        "text_decoder.cls.predictions.transform.dense.weight": (w, w),
        "text_decoder.cls.predictions.transform.dense.bias": (w,),
        "text_decoder.cls.predictions.transform.LayerNorm.weight": (w,),
        "text_decoder.cls.predictions.transform.LayerNorm.bias": (w,),
        "text_decoder.cls.predictions.decoder.weight": (v, w),
        "text_decoder.cls.predictions.decoder.bias": (v,),
    }
    other = {
        "itm_head.weight": (2, w), "itm_head.bias": (2,),
        "vision_proj_m.weight": (d["embed"], d["vw"]), "vision_proj_m.bias": (d["embed"],),
        "text_proj_m.weight": (d["embed"], w), "text_proj_m.bias": (d["embed"],),
        "image_queue": (d["embed"], queue), "text_queue": (d["embed"], queue), "queue_ptr": (1,),
    }  # fmt: skip
    return (
        bert_shapes("text_decoder.bert.", d)
        | head
        | vit_shapes("visual_encoder_m.", d)
        | bert_shapes("text_encoder_m.", d)
        | other
    )


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of these shapes. The large ones are views, at random offsets, of one shared
    N(0, 0.02²) buffer, so a full-size checkpoint takes ~130 MB on disk (torch.save stores a shared storage
    once) while every tensor still holds different values; LayerNorm weights are 1 + noise."""
    g = torch.Generator().manual_seed(seed)
    largest = max(math.prod(s) for s in shapes.values())
    buffer = torch.randn(largest + 4096, generator=g) * 0.02
    out = {}
    for key, shape in shapes.items():
        n = math.prod(shape)
        if key.endswith("position_ids"):
            out[key] = torch.arange(shape[-1]).expand(shape).clone()
        elif key == "queue_ptr":
            out[key] = torch.zeros(shape, dtype=torch.long)
        elif "norm" in key.lower() and key.endswith("weight"):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            offset = int(torch.randint(0, buffer.numel() - n + 1, (1,), generator=g))
            out[key] = buffer[offset : offset + n].view(shape)
    return out


def write_checkpoint(path: Path, state: dict) -> str:
    torch.save({"model": state}, path)  # LAVIS reads checkpoint["model"] (blip.py, load_from_pretrained)
    return str(path)


def write_bert_vocab(folder: Path, size: int = 30522) -> str:
    """A stand-in for bert-base-uncased's vocab.txt with its size (30522): the test vocabulary padded
    with unused tokens, so LAVIS's added [DEC] and [ENC] get their real ids 30522 and 30523."""
    vocab = tiny_vocab()
    vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return str(folder)


# ---- transcriptions of LAVIS's forwards -------------------------------------------------------------
def lavis_vit_cls(sd: dict, pixels: torch.Tensor, heads: int, ids_keep: torch.Tensor | None = None):
    """LAVIS ``VisionTransformer.forward`` (vit.py:265-281) → ``vision_proj`` on the class token
    (blip_feature_extractor.py:144-147 / PLI blip_image_encoder.py:30-33), in plain torch ops; with
    ``ids_keep`` [B, K], PLI's ``mask_forword`` (blip_image_encoder.py:72-101): patch tokens plus their
    position embedding are gathered before the class token is prepended."""
    p = "visual_encoder."
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"],
                 stride=sd[p + "patch_embed.proj.weight"].shape[-1])  # fmt: skip
    x = x.flatten(2).transpose(1, 2)  # timm PatchEmbed
    pos = sd[p + "pos_embed"]
    x = x + pos[:, 1:]
    if ids_keep is not None:
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))
    x = torch.cat([(sd[p + "cls_token"] + pos[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
    b, n, c = x.shape
    depth = len({k.split(".")[2] for k in sd if k.startswith(p + "blocks.")})
    for i in range(depth):
        k = f"{p}blocks.{i}."
        h = F.layer_norm(x, (c,), sd[k + "norm1.weight"], sd[k + "norm1.bias"], eps=1e-6)  # vit.py:209
        qkv = F.linear(h, sd[k + "attn.qkv.weight"], sd[k + "attn.qkv.bias"])
        q, kk, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # vit.py:90-99
        attn = ((q @ kk.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = x + F.linear(h, sd[k + "attn.proj.weight"], sd[k + "attn.proj.bias"])  # Block :156
        h = F.layer_norm(x, (c,), sd[k + "norm2.weight"], sd[k + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, sd[k + "mlp.fc1.weight"], sd[k + "mlp.fc1.bias"]))  # Mlp :45-51, nn.GELU
        x = x + F.linear(h, sd[k + "mlp.fc2.weight"], sd[k + "mlp.fc2.bias"])  # Block :157
    x = F.layer_norm(x, (c,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)
    return F.linear(x, sd["vision_proj.weight"], sd["vision_proj.bias"])[:, 0]


def lavis_text_cls(sd: dict, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """The official PLI text feature (blip_text_encoder.py:27-41): med.py ``BertModel.forward`` with
    ``mode="text"`` and no attention mask (so :914-917 attends to every position, padding included) →
    ``text_proj`` on [CLS]. Eval mode (dropout off); BERT LayerNorm eps 1e-12, exact GELU
    (med_config.json)."""
    p = "text_encoder."
    w = sd[p + "embeddings.word_embeddings.weight"].shape[1]
    ln = lambda x, k: F.layer_norm(x, (w,), sd[k + ".weight"], sd[k + ".bias"], eps=1e-12)  # noqa: E731
    lin = lambda x, k: F.linear(x, sd[k + ".weight"], sd[k + ".bias"])  # noqa: E731
    b, n = ids.shape
    x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][:n]
    x = ln(x, p + "embeddings.LayerNorm")  # BertEmbeddings.forward :88-123
    depth = len({k.split(".")[3] for k in sd if k.startswith(p + "encoder.layer.")})
    for i in range(depth):
        k = f"{p}encoder.layer.{i}."
        split = lambda t: t.view(b, n, heads, w // heads).permute(0, 2, 1, 3)  # noqa: E731  :178-182
        q, kk, v = (split(lin(x, k + f"attention.self.{m}")) for m in ("query", "key", "value"))
        scores = (q @ kk.transpose(-1, -2)) / math.sqrt(w // heads)  # :258 (no mask: + 0)
        h = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(b, n, w)
        x = ln(lin(h, k + "attention.output.dense") + x, k + "attention.output.LayerNorm")  # :299-303
        # mode="text": no cross-attention (BertLayer.forward :449)
        h = F.gelu(lin(x, k + "intermediate.dense"))  # :371-374
        x = ln(lin(h, k + "output.dense") + x, k + "output.LayerNorm")  # :384-388
    return F.linear(x, sd["text_proj.weight"], sd["text_proj.bias"])[:, 0]


def lavis_pre_caption(caption: str, max_words: int = 50) -> str:
    """``BlipCaptionProcessor.pre_caption`` (lavis/processors/blip_processors.py:49-68), line by line."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    caption_words = caption.split(" ")
    if len(caption_words) > max_words:
        caption = " ".join(caption_words[:max_words])
    return caption


# ---- fixtures -------------------------------------------------------------------------------------
CAPTIONS = ["A dog, running on the beach.", "two (red) cars: parked!", "a photo of $ that is blue"]


class Setup:
    def __init__(self, arch: str, root: Path):
        self.arch, self.d = arch, DIMS[arch]
        shapes = feature_extractor_shapes(self.d) | pretrain_only_shapes(
            self.d, 57600 if arch == "base" else 16
        )
        self.state = random_state(shapes)
        self.file = write_checkpoint(root / "model_base_capfilt_large.pth", self.state)
        tokenizer = write_bert_vocab(root / "bert") if arch == "base" else None
        self.encoder = build_encoder(kind="lavis_blip", model=arch, checkpoint=self.file, tokenizer=tokenizer)
        self.encoder.eval()


@pytest.fixture(scope="module", params=["tiny", pytest.param("base", marks=pytest.mark.slow)])
def setup(request, tmp_path_factory):
    return Setup(request.param, tmp_path_factory.mktemp(f"lavis_{request.param}"))


def pixels(encoder, n: int, seed: int = 0) -> torch.Tensor:
    size = encoder.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- loading ----------------------------------------------------------------------------------------
def test_every_feature_extractor_key_is_consumed_and_nothing_is_missing(setup):
    extractor = feature_extractor_shapes(setup.d)
    mapped, ignored = lavis_to_transformers(setup.state)
    ours = setup.encoder.model.state_dict()
    assert set(mapped) == set(ours)  # every parameter of ours comes from the checkpoint
    # each of ours holds exactly one checkpoint tensor; the only feature-extractor keys without a
    # parameter of their own are the temperature (unused by PLI) and the position_ids buffer (checked)
    assert len(mapped) == len(extractor) - 2
    used = {k for k in extractor if k not in ("temp", "text_encoder.embeddings.position_ids")}
    assert {id(setup.state[k]) for k in used} == {id(v) for v in mapped.values()}  # renamed, not copied
    assert set(ignored) == (set(setup.state) - set(extractor)) | {"temp"}
    assert any(k.startswith("visual_encoder_m.") for k in ignored)
    assert "text_decoder.cls.predictions.decoder.weight" in ignored


def test_paper_geometry_224px_196_patches_30_tokens(setup):
    enc = setup.encoder
    if setup.arch == "base":
        assert (enc.image_size, enc.num_patches, enc.context_length) == (224, 196, 30)
        assert (enc.embed_dim, enc.token_dim) == (256, 768)
        assert enc.model.vision_model.embeddings.position_embedding.shape == (1, 197, 768)
        tok = enc._tokenizer
        assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]  # blip.py init_tokenizer
        assert len(tok) == 30524
    from PIL import Image

    image = Image.new("RGB", (300, 200), (200, 30, 10))
    assert enc.image_transform(image).shape == (3, enc.image_size, enc.image_size)
    assert enc.tokenize(CAPTIONS).shape == (3, 30)


# ---- features equal the transcribed LAVIS forwards --------------------------------------------------
def test_image_features_equal_the_lavis_vit(setup):
    images = pixels(setup.encoder, 2)
    with torch.no_grad():
        ours = setup.encoder.encode_image(images)
        ref = lavis_vit_cls(setup.state, images, setup.d["vheads"])
    assert ours.shape == (2, setup.d["embed"])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_dropped_tokens_equal_the_official_pli_masked_forward(setup):
    enc = setup.encoder
    images = pixels(enc, 2, seed=1)
    keep = random_keep(2, enc.num_patches, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = enc.encode_image(images, keep=keep)
        ref = lavis_vit_cls(setup.state, images, setup.d["vheads"], ids_keep=keep)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_text_features_equal_the_lavis_bert_without_attention_mask(setup):
    ids = setup.encoder.tokenize(CAPTIONS)
    assert (ids == 0).any()  # padded: the missing mask matters
    with torch.no_grad():
        ours = setup.encoder.encode_text(ids)
        ref = lavis_text_cls(setup.state, ids, setup.d["theads"])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# ---- text handling --------------------------------------------------------------------------------
TRICKY = {
    "A Dog.  Running!!": "a dog running",
    'He said "hi" (twice)': "he said hi twice",
    "e.g. 3.5 m; ~ok~ #1 *": "e g 3 5 m ok 1",
    "it's a $ that, isn't? - yes": "it's a $ that, isn't? - yes",
    "word.\n": "word",
    "  ~*#:;  ": "",
    "tab\tand\nnewline\n": "tab\tand\nnewline",
    "[ENC] Über-CAFÉ": "[enc] über-café",
}


@pytest.mark.parametrize(("caption", "expected"), TRICKY.items())
def test_blip_caption_equals_lavis_pre_caption(caption, expected):
    assert lavis_pre_caption(caption) == expected  # the hand-written value checks the transcription
    assert blip_caption(caption) == expected


def test_blip_caption_keeps_fifty_words():
    long = " ".join(f"w{i}" for i in range(60)) + "."
    assert blip_caption(long) == lavis_pre_caption(long) == " ".join(f"w{i}" for i in range(50))
    assert blip_caption("a b") == "a b"


def tiny(**options):
    return build_encoder(kind="lavis_blip", model="tiny", **options)


def test_tokenize_is_pre_caption_then_bert_padded_to_30():
    enc = tiny()
    # PLI data/__init__.py:158-161: text_processors["eval"] (blip_caption), then the tokenizer with
    # padding="max_length", truncation, max_length=max_txt_len
    expected = enc._tokenizer(
        [lavis_pre_caption(c) for c in CAPTIONS], padding="max_length", truncation=True, max_length=30,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    assert torch.equal(enc.tokenize(CAPTIONS), expected)
    raw = tiny(caption_preprocess="none").tokenize(["A DOG."])
    assert not torch.equal(raw, enc.tokenize(["A DOG."]))  # upper case is [UNK] in the uncased vocabulary
    assert enc.placeholder_id == tiny_vocab().index("$")


def test_padding_is_attended_unless_masked():
    captions = ["a red dog", "the blue"]  # shorter than 20 tokens, even character by character
    enc, short = tiny(), tiny(context_length=20)
    masked, masked_short = tiny(text_attention_mask=True), tiny(text_attention_mask=True, context_length=20)
    with torch.no_grad():
        a, b = enc.encode_text(enc.tokenize(captions)), short.encode_text(short.tokenize(captions))
        c = masked.encode_text(masked.tokenize(captions))
        d = masked_short.encode_text(masked_short.tokenize(captions))
    assert not torch.allclose(a, b, atol=1e-4)  # official: 10 more [PAD] tokens change the feature
    torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-5)  # masked: padding is invisible
    assert not torch.allclose(a, c, atol=1e-4)


def test_text_dropout_follows_the_tower_mode():
    enc = tiny()
    ids, images = enc.tokenize(CAPTIONS), pixels(enc, 2)
    enc.set_tower_trainable("text", True)
    enc.set_tower_trainable("image", True)
    assert enc.model.text_encoder.config.hidden_dropout_prob == 0.1  # med_config.json
    with torch.no_grad():
        assert not torch.allclose(enc.encode_text(ids), enc.encode_text(ids))  # dropout 0.1 active
        torch.testing.assert_close(enc.encode_image(images), enc.encode_image(images))  # LAVIS ViT: none
        enc.set_tower_trainable("text", False)
        torch.testing.assert_close(enc.encode_text(ids), enc.encode_text(ids))


# ---- token dropping and other encoder duties on the tiny model ---------------------------------------
def test_keeping_every_patch_equals_no_keep():
    enc = tiny()
    images = pixels(enc, 2)
    keep = torch.arange(enc.num_patches).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            enc.encode_image(images, keep=keep), enc.encode_image(images), atol=1e-5, rtol=1e-5
        )


def test_towers_leave_out_only_the_cross_attention():
    enc = tiny()
    image, text = enc.tower_parameters("image"), enc.tower_parameters("text")
    assert not {id(p) for p in image} & {id(p) for p in text}
    ids = {id(p) for p in image} | {id(p) for p in text}
    leftover = [n for n, p in enc.named_parameters() if id(p) not in ids]
    assert leftover
    assert all("crossattention" in n for n in leftover), leftover


# ---- checkpoint handling ------------------------------------------------------------------------------
def test_position_embedding_is_interpolated_as_lavis_does(tmp_path):
    d = DIMS["tiny"]
    state = random_state(feature_extractor_shapes(d))  # 64 px: an 8 x 8 grid
    file = write_checkpoint(tmp_path / "ckpt.pth", state)
    enc = tiny(checkpoint=file, image_size=48)  # 6 x 6
    # LAVIS interpolate_pos_embed (vit.py:426-455), transcribed
    pos = state["visual_encoder.pos_embed"]
    grid = pos[:, 1:].reshape(-1, 8, 8, d["vw"]).permute(0, 3, 1, 2)
    grid = (
        F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
        .permute(0, 2, 3, 1)
        .flatten(1, 2)
    )
    expected = torch.cat([pos[:, :1], grid], dim=1)
    assert enc.num_patches == 36
    torch.testing.assert_close(enc.model.vision_model.embeddings.position_embedding.data, expected)
    images = pixels(enc, 1)
    with torch.no_grad():
        ref = lavis_vit_cls(state | {"visual_encoder.pos_embed": expected}, images, d["vheads"])
        torch.testing.assert_close(enc.encode_image(images), ref, atol=1e-5, rtol=1e-5)


def test_unknown_and_missing_keys_fail_by_name(tmp_path):
    d = DIMS["tiny"]
    state = random_state(feature_extractor_shapes(d))
    bad = write_checkpoint(tmp_path / "unknown.pth", state | {"visual_encoder.head.weight": torch.zeros(2)})
    with pytest.raises(BackboneLoadError, match=r"visual_encoder\.head\.weight"):
        tiny(checkpoint=bad)
    missing = {k: v for k, v in state.items() if k != "text_proj.bias"}
    with pytest.raises(BackboneLoadError, match=r"1 missing keys .*text_proj\.bias"):
        tiny(checkpoint=write_checkpoint(tmp_path / "missing.pth", missing))
    wrong = state | {"vision_proj.weight": torch.zeros(d["embed"] + 1, d["vw"])}
    with pytest.raises(BackboneLoadError, match=r"vision_proj\.weight"):
        tiny(checkpoint=write_checkpoint(tmp_path / "shape.pth", wrong))


def test_a_zscir_export_loads_back(tmp_path):
    enc = tiny(
        checkpoint=write_checkpoint(
            tmp_path / "ckpt.pth", random_state(feature_extractor_shapes(DIMS["tiny"]))
        )
    )
    export = tmp_path / "export.pt"
    torch.save(enc.model.state_dict(), export)  # what clip_pretrain's export_backbone writes
    again = tiny(checkpoint=str(export), init_seed=5)
    images = pixels(enc, 1)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), enc.encode_image(images))


def test_missing_weights_name_the_file_to_download(tmp_path):
    with pytest.raises(BackboneLoadError) as err:
        build_encoder(
            kind="lavis_blip", model="base", checkpoint=str(tmp_path / "model_base_capfilt_large.pth")
        )
    assert LAVIS_BLIP_BASE_URL in str(err.value)
    assert "backbone.checkpoint=" in str(err.value)
    with pytest.raises(BackboneLoadError, match=r"model_base_capfilt_large\.pth"):
        build_encoder(kind="lavis_blip", model="base")


def test_pli_blip_experiment_uses_the_lavis_model(compose):
    cfg = compose("train", ["experiment=pli_blip_imagenet"])
    b = cfg.backbone
    assert (b.kind, b.model, b.image_size, b.context_length) == ("lavis_blip", "base", 224, 30)
    assert (b.text_attention_mask, b.caption_preprocess) == (False, "blip_caption")
    assert b.checkpoint.endswith("model_base_capfilt_large.pth")


def test_pli_blip_training_without_the_weights_names_the_file_to_download(compose):
    from zscir.cli.train import train

    cfg = compose("train", ["experiment=pli_blip_imagenet", "trainer=cpu"])
    with pytest.raises(BackboneLoadError) as err:
        train(cfg)
    assert LAVIS_BLIP_BASE_URL in str(err.value)
    assert cfg.backbone.checkpoint in str(err.value)  # where it looked


def test_pli_trains_the_lavis_backbone_with_dropped_tokens():
    import warnings

    from zscir.methods import build_method

    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step without a Trainer
    m = build_method({"name": "tiny_lavis_blip", "kind": "lavis_blip", "model": "tiny"}, {"kind": "pli"})
    m.train()
    lengths = []
    blocks = m.encoder.model.vision_model.encoder
    handle = blocks.register_forward_pre_hook(
        lambda _m, a, kw: lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    size = m.encoder.image_size
    batch = {
        "pixels": torch.randn(4, 3, size, size),
        "caption": ["a red dog.", "The blue cat", "a tree", "two cars"],
    }
    try:
        m.training_step(batch, 0).backward()
    finally:
        handle.remove()
    assert lengths == [1 + int(m.encoder.num_patches * (1 - m.cfg.mask_ratio)), 1 + m.encoder.num_patches]
    assert m.encoder.model.text_encoder.embeddings.dropout.training  # official: text dropout while tuning
    for tower in ("image", "text"):
        assert (
            sum(p.grad.abs().sum().item() for p in m.encoder.tower_parameters(tower) if p.grad is not None)
            > 0
        )


def test_a_checkpoint_with_arbitrary_objects_is_refused_with_advice(tmp_path):
    import argparse

    file = tmp_path / "ckpt.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, file)  # unpickling it could run code
    with pytest.raises(BackboneLoadError, match="weights_only"):
        tiny(checkpoint=str(file))
