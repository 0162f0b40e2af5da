"""BLIP as LAVIS releases it (``blip_feature_extractor``, type ``base``): the model the PLI paper tunes.

The LAVIS weights file (``model_base_capfilt_large.pth``: BLIP ViT-B/16 + BERT-base pre-trained with
CapFilt-L captions, *not* fine-tuned for retrieval) is a ``{"model": state_dict}`` pickle in
LAVIS's own module layout (``lavis/models/vit.py``, ``lavis/models/med.py``). It is loaded here into
transformers' BLIP modules (``BlipVisionModel``, ``BlipTextModel``): the text tower is the same BERT
port under the same names, and the ViT differs only by names, so the mapping is a list of renames.

What this backbone does like LAVIS and the official PLI code, where transformers' retrieval BLIP differs:

* 224 px images (196 patches of 16 px), LayerNorm eps 1e-6 in the ViT (``vit.py`` default);
* captions go through LAVIS's ``blip_caption`` processor (``hf_blip_encoder.blip_caption``), are padded to
  30 tokens (``max_txt_len``) and encoded **without** an attention mask (the official
  PLI text encoder calls the BERT with ``mode="text"`` and no mask, so padding is attended to);
* the text tower has dropout 0.1 (``med_config.json``), active while the tower trains;
* the BERT ``bert-base-uncased`` vocabulary plus LAVIS's two added tokens ``[DEC]`` and ``[ENC]``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from zscir.backbones.errors import (  # noqa: F401  (LAVIS_BLIP_BASE_URL: re-exported)
    LAVIS_BLIP_BASE_URL,
    BackboneLoadError,
    missing_weights_message,
)
from zscir.backbones.hf_blip_encoder import HFBLIPEncoder, blip_transform, tiny_tokenizer
from zscir.backbones.hf_clip_encoder import hub_kwargs

#: Architectures: LAVIS ``VisionTransformerEncoder`` ``vit_type: base`` (``lavis/models/vit.py``) and the
#: BERT of ``lavis/configs/models/med_config.json``; ``tiny`` is a random-init miniature for tests.
LAVIS_BLIP_ARCHS: dict[str, dict] = {
    "base": dict(
        image_size=224,
        image_text_hidden_size=256,
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
            layer_norm_eps=1e-6,
        ),
        text_config=dict(
            vocab_size=30524,
            hidden_size=768,
            encoder_hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=512,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            layer_norm_eps=1e-12,
        ),
    ),
    "tiny": dict(
        image_size=64,
        image_text_hidden_size=32,
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,  # LAVIS's ViT has mlp_ratio 4
            num_hidden_layers=2,
            num_attention_heads=4,
            patch_size=8,
            layer_norm_eps=1e-6,
            initializer_range=0.02,
        ),
        text_config=dict(
            hidden_size=64,
            encoder_hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            layer_norm_eps=1e-12,
        ),
    ),
}

#: LAVIS's ``blip_feature_extractor`` ``max_txt_len`` (``blip_feature_extractor.py``, ``from_config``)
LAVIS_MAX_TXT_LEN = 30

#: Keys of the full BLIP pre-training checkpoint that the feature extractor does not use: the momentum
#: encoders and their feature queues (ITC distillation), the caption decoder (LM loss), the ITM head and
#: the ITC temperature (PLI's loss has a fixed temperature). They are skipped by name; any other key
#: that does not map onto the model is an error.
IGNORED_PREFIXES = (
    "visual_encoder_m.",
    "text_encoder_m.",
    "vision_proj_m.",
    "text_proj_m.",
    "text_decoder.",
    "itm_head.",
)
IGNORED_KEYS = frozenset({"temp", "image_queue", "text_queue", "queue_ptr"})

# LAVIS ViT block (lavis/models/vit.py, Block) -> transformers BlipEncoderLayer
_BLOCK_RENAMES = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_BLOCK_KEY = re.compile(
    r"visual_encoder\.blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc[12])\.(\w+)"
)
_VISION_RENAMES = {
    "visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
    "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
    "visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    "visual_encoder.norm.weight": "vision_model.post_layernorm.weight",
    "visual_encoder.norm.bias": "vision_model.post_layernorm.bias",
}
# a buffer LAVIS saves (med.py BertEmbeddings.position_ids) and transformers rebuilds (not persistent)
_POSITION_IDS = "text_encoder.embeddings.position_ids"


class LavisBlip(nn.Module):
    """What ``BlipFeatureExtractor`` computes with, as transformers modules: the ViT (``vision_model``),
    the BERT text encoder with its cross-attention layers (``text_encoder``, no pooler) and the two ITC
    projections. ``config`` is a ``transformers.BlipConfig``."""

    def __init__(self, config: object):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.config = config
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        dim = config.image_text_hidden_size
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, dim)
        self.text_proj = nn.Linear(config.text_config.hidden_size, dim)


def lavis_tokenizer(name_or_dir: str | None, cache_dir: str | None = None) -> object:
    """The BERT tokenizer LAVIS's BLIP uses (``BlipBase.init_tokenizer``, ``lavis/models/blip_models/
    blip.py``): ``bert-base-uncased`` with ``[DEC]`` added as the beginning-of-sentence token and
    ``[ENC]`` as an extra special token (ids 30522 and 30523 with the real vocabulary).

    Args:
        name_or_dir: a directory holding ``bert-base-uncased``'s tokenizer files (at least
            ``vocab.txt``), or a hub name found in the Hugging Face cache; None: the generated test
            vocabulary of the ``tiny`` models.
        cache_dir: Hugging Face cache folder.

    Raises:
        BackboneLoadError: the tokenizer files cannot be found.
    """
    if name_or_dir is None:
        tokenizer = tiny_tokenizer()
    else:
        from transformers import BertTokenizer

        try:
            tokenizer = BertTokenizer.from_pretrained(name_or_dir, **hub_kwargs(name_or_dir, cache_dir, None))
        except Exception as err:
            raise BackboneLoadError(
                f"could not load the BERT tokenizer {name_or_dir!r}: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}\nLAVIS BLIP uses bert-base-uncased's "
                "vocabulary. Without network access, download it once elsewhere (hf download bert-base-uncased "
                "vocab.txt tokenizer_config.json --local-dir bert-base-uncased) and pass the folder: "
                "backbone.tokenizer=/path/to/bert-base-uncased"
            ) from err
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def interpolate_pos_embed(pos_embed: Tensor, num_patches: int) -> Tensor:
    """Resize a ViT position embedding [1, 1 + g², D] to [1, 1 + num_patches, D] as LAVIS does when a
    checkpoint's grid differs from the model's (``interpolate_pos_embed``, ``lavis/models/vit.py``): the
    class token's row is kept, the g × g grid is resized bicubically (``align_corners=False``)."""
    old, new = round((pos_embed.shape[1] - 1) ** 0.5), round(num_patches**0.5)
    if old == new:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def lavis_to_transformers(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a LAVIS BLIP state dict (``visual_encoder.*``, ``text_encoder.*``, ``vision_proj.*``,
    ``text_proj.*``) to :class:`LavisBlip`'s names.

    Returns:
        the renamed state dict (tensors shared, not copied) and the sorted keys skipped by the rule of
        :data:`IGNORED_PREFIXES` / :data:`IGNORED_KEYS`.

    Raises:
        BackboneLoadError: a key neither maps nor is ignored, or the saved ``position_ids`` are not
            ``0, 1, 2, ...`` (transformers rebuilds them as such).
    """
    out, ignored, unknown = {}, [], []
    for key, value in state.items():
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            ignored.append(key)
        elif key == _POSITION_IDS:
            if not torch.equal(value.flatten(), torch.arange(value.numel(), dtype=value.dtype)):
                raise BackboneLoadError(f"{key} in the checkpoint is not 0, 1, 2, ...")
        elif key in _VISION_RENAMES:
            out[_VISION_RENAMES[key]] = value
        elif m := _BLOCK_KEY.fullmatch(key):
            block, part, leaf = m.groups()
            out[f"vision_model.encoder.layers.{block}.{_BLOCK_RENAMES[part]}.{leaf}"] = value
        elif key.startswith(("text_encoder.", "vision_proj.", "text_proj.")):
            out[key] = value  # transformers' BlipTextModel is a port of LAVIS's med.py BertModel, same names
        else:
            unknown.append(key)
    if unknown:
        raise BackboneLoadError(
            f"{len(unknown)} checkpoint keys are not part of a LAVIS BLIP model (e.g. {unknown[:3]})"
        )
    return out, sorted(ignored)


def load_lavis_checkpoint(model: LavisBlip, path: str) -> list[str]:
    """Load a LAVIS BLIP weights file into ``model`` (every parameter must be filled, every key used or
    ignored by rule). Also accepts a plain :class:`LavisBlip` state dict (e.g. a zscir export).

    The position embedding is interpolated when the checkpoint's grid differs from the model's.

    Returns:
        the ignored checkpoint keys.

    Raises:
        BackboneLoadError: the file is missing, unreadable, or does not match the architecture.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise BackboneLoadError(missing_weights_message(str(file)))
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise BackboneLoadError(
            f"{file} holds more than tensors and plain containers, so it is not loaded (torch.load "
            f"weights_only=True refused it: {str(err).splitlines()[0]}). If you trust the file, keep only its "
            "weights: torch.save({'model': torch.load(f, weights_only=False)['model']}, new_file)"
        ) from err
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
        state, ignored = lavis_to_transformers(saved["model"])
    else:
        state, ignored = saved.get("state_dict", saved), []
    key = "vision_model.embeddings.position_embedding"
    if key in state:
        state[key] = interpolate_pos_embed(state[key], model.vision_model.embeddings.num_patches)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise BackboneLoadError(f"{file} does not match the BLIP architecture: {err}") from err
    if missing or unexpected:
        raise BackboneLoadError(
            f"{file} does not match the BLIP architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    return ignored


def build_lavis_blip(
    model: str = "base",
    checkpoint: str | None = None,
    init_seed: int = 0,
    cache_dir: str | None = None,
    tokenizer: str | None = "bert-base-uncased",
    image_size: int | None = None,
    context_length: int = LAVIS_MAX_TXT_LEN,
    text_attention_mask: bool = False,
    caption_preprocess: str = "blip_caption",
) -> HFBLIPEncoder:
    """Build the LAVIS ``blip_feature_extractor`` BLIP behind the :class:`Encoder` contract.

    Args:
        model: ``base`` (ViT-B/16 + BERT-base; needs ``checkpoint``) or ``tiny`` (random init, test vocabulary).
        checkpoint: the LAVIS weights file (``model_base_capfilt_large.pth``) or a zscir export of this model.
        init_seed: seed of the random initialisation (what ``checkpoint`` does not overwrite: nothing for
            ``base``; everything for ``tiny`` without a checkpoint).
        cache_dir: Hugging Face cache folder (for a tokenizer given by hub name).
        tokenizer: folder (or cached hub name) of ``bert-base-uncased``'s tokenizer; ignored by ``tiny``.
        image_size: input resolution (default: the architecture's, 224 for ``base``); a checkpoint with
            another grid has its position embedding interpolated.
        context_length: text length in tokens, padded and truncated (LAVIS ``max_txt_len`` 30).
        text_attention_mask: mask padding out of the text attention (the official PLI code does not).
        caption_preprocess: ``blip_caption`` (LAVIS's text processor, as the official code) or ``none``.

    Raises:
        BackboneLoadError: unknown architecture, missing weights or tokenizer, or a checkpoint that does
            not match.
    """
    import transformers

    if model not in LAVIS_BLIP_ARCHS:
        raise BackboneLoadError(
            f"unknown LAVIS BLIP model {model!r}; expected one of {sorted(LAVIS_BLIP_ARCHS)}"
        )
    if model != "tiny" and not checkpoint:
        raise BackboneLoadError(missing_weights_message(None))
    arch = LAVIS_BLIP_ARCHS[model]
    tok = lavis_tokenizer(None if model == "tiny" else tokenizer, cache_dir=cache_dir)
    text = dict(
        arch["text_config"],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,  # [DEC]
        eos_token_id=tok.sep_token_id,
        sep_token_id=tok.sep_token_id,
    )
    if model == "tiny":
        text["vocab_size"] = len(tok)
    elif len(tok) != text["vocab_size"]:
        raise BackboneLoadError(
            f"tokenizer {tokenizer!r} has {len(tok)} tokens with [DEC] and [ENC]; LAVIS BLIP has "
            f"{text['vocab_size']} (bert-base-uncased's 30522 + 2): pass bert-base-uncased's tokenizer"
        )
    size = int(image_size or arch["image_size"])
    config = transformers.BlipConfig(
        text_config=text,
        vision_config=dict(arch["vision_config"], image_size=size),
        image_text_hidden_size=arch["image_text_hidden_size"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        blip = LavisBlip(config)
    if checkpoint:
        load_lavis_checkpoint(blip, checkpoint)
    blip.eval()
    return HFBLIPEncoder(
        blip,
        tok,
        blip_transform(size),  # LAVIS blip_image_eval: bicubic resize to size x size, CLIP mean/std
        f"lavis-blip-resize{size}",
        context_length=context_length,
        text_attention_mask=text_attention_mask,
        caption_preprocess=caption_preprocess,
    )
