"""The ViT-H/14 and ViT-bigG/14 backbones (LinCIR-huge/-giga) without their weights: the hub configs,
written here, against open_clip's installed configs and the shipped conf/backbone files, and zscir's
encoders built from them on the meta device (no memory, no download). Also: every open_clip backbone
config with a pretrained tag states the activation that tag's weights were trained with."""

from __future__ import annotations

import open_clip
import pytest
import torch
import transformers
from omegaconf import OmegaConf

from zscir.backbones.hf_clip_encoder import HFCLIPEncoder
from zscir.backbones.open_clip_encoder import OpenCLIPEncoder, _activation_kwargs
from zscir.cli.config import CONF_DIR

CONF = CONF_DIR / "backbone"

#: The architecture values of the hub's config.json:
#: https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/blob/main/config.json and
#: https://huggingface.co/Geonmo/CLIP-Giga-config-fixed/blob/main/config.json (laion's ViT-bigG-14
#: config with projection_dim added to both towers, commit e52c7be). Both use GELU.
HUB = {
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": dict(
        projection_dim=1024,
        text_config=dict(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
        ),
        vision_config=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            hidden_act="gelu",
        ),
    ),
    "Geonmo/CLIP-Giga-config-fixed": dict(
        projection_dim=1280,
        text_config=dict(
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            max_position_embeddings=77,
            hidden_act="gelu",
        ),
        vision_config=dict(
            hidden_size=1664,
            intermediate_size=8192,
            num_hidden_layers=48,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            hidden_act="gelu",
        ),
    ),
}
#: open_clip's configs as published next to the weights (open_clip_config.json "model_cfg" of
#: laion/CLIP-ViT-H-14-laion2B-s32B-b79K and laion/CLIP-ViT-bigG-14-laion2B-39B-b160k).
OPEN_CLIP = {
    "ViT-H-14": dict(
        embed_dim=1024,
        vision_cfg=dict(image_size=224, layers=32, width=1280, head_width=80, patch_size=14),
        text_cfg=dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24),
    ),
    "ViT-bigG-14": dict(
        embed_dim=1280,
        vision_cfg=dict(
            image_size=224, layers=48, width=1664, head_width=104, mlp_ratio=4.9231, patch_size=14
        ),
        text_cfg=dict(context_length=77, vocab_size=49408, width=1280, heads=20, layers=32),
    ),
}
#: zscir backbone config -> (HF hub id, open_clip name, open_clip config file)
SAME_MODEL = {
    "ViT-H-14": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "hf_clip_vit_h14", "clip_vit_h14"),
    "ViT-bigG-14": ("Geonmo/CLIP-Giga-config-fixed", "hf_clip_vit_bigg14", "clip_vit_bigg14"),
}


def backbone_conf(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))


@pytest.mark.parametrize("name", sorted(OPEN_CLIP))
def test_open_clip_config_and_backbone_files_match_the_hub(name):
    hub_id, hf_conf, oc_conf = SAME_MODEL[name]
    installed = open_clip.get_model_config(name)
    assert installed["embed_dim"] == OPEN_CLIP[name]["embed_dim"]
    for tower in ("vision_cfg", "text_cfg"):
        for key, value in OPEN_CLIP[name][tower].items():
            assert installed[tower][key] == value, (name, tower, key)
    assert not installed.get("quick_gelu", False)
    assert backbone_conf(hf_conf)["model"] == hub_id
    conf = backbone_conf(oc_conf)
    assert conf["model"] == name
    assert conf["quick_gelu"] is False
    assert open_clip.get_pretrained_cfg(name, conf["pretrained"]), "unknown pretrained tag"


@pytest.mark.parametrize("name", sorted(OPEN_CLIP))
def test_hub_and_open_clip_describe_the_same_architecture(name):
    hub, oc = HUB[SAME_MODEL[name][0]], OPEN_CLIP[name]
    hv, ht, ov, ot = hub["vision_config"], hub["text_config"], oc["vision_cfg"], oc["text_cfg"]
    assert hub["projection_dim"] == oc["embed_dim"]
    assert (hv["hidden_size"], hv["num_hidden_layers"]) == (ov["width"], ov["layers"])
    assert hv["num_attention_heads"] == ov["width"] // ov["head_width"]
    assert hv["intermediate_size"] == round(ov["width"] * ov.get("mlp_ratio", 4.0))
    assert (hv["image_size"], hv["patch_size"]) == (ov["image_size"], ov["patch_size"])
    assert (ht["hidden_size"], ht["num_hidden_layers"]) == (ot["width"], ot["layers"])
    assert (ht["num_attention_heads"], ht["intermediate_size"]) == (ot["heads"], 4 * ot["width"])
    assert (ht["max_position_embeddings"], ht["vocab_size"]) == (ot["context_length"], ot["vocab_size"])
    assert hv["hidden_act"] == ht["hidden_act"] == "gelu"  # open_clip: quick_gelu False


@pytest.mark.parametrize("name", sorted(OPEN_CLIP))
def test_zscir_encoders_built_from_either_config_agree(name):
    """Both encoders, built on the meta device, expose the same dimensions and parameter count."""
    with torch.device("meta"):
        hf_model = transformers.CLIPModel(transformers.CLIPConfig(**HUB[SAME_MODEL[name][0]]))
        oc_model = open_clip.CLIP(**open_clip.get_model_config(name))
    hf = HFCLIPEncoder(hf_model, image_transform=None, transform_id="meta")
    oc = OpenCLIPEncoder(oc_model, open_clip.get_tokenizer(name), image_transform=None, transform_id="meta")
    dims = ("embed_dim", "token_dim", "context_length", "image_size", "num_patches")
    assert [getattr(hf, d) for d in dims] == [getattr(oc, d) for d in dims]
    assert (hf.embed_dim, hf.image_size, hf.num_patches) == (OPEN_CLIP[name]["embed_dim"], 224, 256)
    assert len(hf.vision_blocks()) == len(oc.vision_blocks()) == OPEN_CLIP[name]["vision_cfg"]["layers"]
    assert sum(p.numel() for p in hf_model.parameters()) == sum(p.numel() for p in oc_model.parameters())
    assert not any(isinstance(m, open_clip.transformer.QuickGELU) for m in oc_model.modules())
    assert {type(m).__name__ for m in hf_model.modules()} >= {"GELUActivation"}


def test_every_tagged_open_clip_backbone_states_its_activation():
    """A pretrained tag's weights fix the activation; the config says so explicitly (it stays right when
    the tag is swapped for a local file), and the builder resolves the tag to the same activation."""
    checked = 0
    for path in sorted(CONF.glob("*.yaml")):
        conf = OmegaConf.to_container(OmegaConf.load(path))
        if conf.get("kind") != "open_clip" or not conf.get("pretrained"):
            continue
        tag = open_clip.get_pretrained_cfg(conf["model"], conf["pretrained"])
        assert tag, f"{path.name}: unknown pretrained tag"
        assert conf.get("quick_gelu") is bool(tag.get("quick_gelu", False)), path.name
        kwargs = _activation_kwargs(conf["model"], conf["pretrained"], conf["quick_gelu"])
        arch_quick = bool(open_clip.get_model_config(conf["model"]).get("quick_gelu", False))
        built_quick = kwargs.get("force_quick_gelu", kwargs.get("quick_gelu", arch_quick))
        assert built_quick is conf["quick_gelu"], path.name
        checked += 1
    assert checked >= 4  # ViT-B-32 and ViT-L-14 (openai, QuickGELU), ViT-H-14 and ViT-bigG-14 (GELU)
