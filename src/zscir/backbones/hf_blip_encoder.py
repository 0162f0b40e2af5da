"""BLIP (Hugging Face ``BlipForImageTextRetrieval``) behind the :class:`Encoder` contract.

The unimodal retrieval features of BLIP (its ITC head): the ViT's class token → ``vision_proj``, and the
BERT text encoder's ``[CLS]`` token in text-only mode (no cross-attention) → ``text_proj``. The ITM head
and the text encoder's cross-attention layers belong to neither tower, so every method leaves them
frozen. Token dropping (PLI) keeps the class token and a subset of the patch tokens after the
positional embeddings were added, as the official PLI BLIP encoder does.
"""

from __future__ import annotations

import re
import string
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import transforms as T

from zscir.backbones.base import Encoder, gather_patches
from zscir.backbones.errors import BackboneLoadError, weights_hint
from zscir.backbones.hf_clip_encoder import CLIP_MEAN, CLIP_STD, hub_kwargs

#: BLIP's own models truncate captions at 35 tokens (LAVIS ``max_txt_len``); the text tower has 512 positions
DEFAULT_CONTEXT_LENGTH = 35

#: Values of ``caption_preprocess``: what is applied to captions before tokenizing.
CAPTION_PREPROCESSORS = ("none", "blip_caption")

#: Random-init BLIP configs for tests (``transformers.BlipConfig`` kwargs; the vocabulary is generated).
TINY_BLIP_CONFIGS: dict[str, dict] = {
    "tiny": dict(
        image_text_hidden_size=64,
        text_config=dict(
            hidden_size=64,
            encoder_hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            initializer_range=0.02,  # BLIP's default (1e-10) makes a random ViT blind to its input
        ),
    ),
}


def tiny_vocab() -> list[str]:
    """A small WordPiece vocabulary: BERT's special tokens, single characters and their ``##``
    continuations (so any lowercase ASCII text tokenizes, character by character), a few whole words."""
    chars = string.ascii_lowercase + string.digits
    words = ["a", "an", "the", "of", "photo", "that", "is", "and", "on", "in", "with"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *string.punctuation]
    vocab += ["##" + c for c in chars] + words
    return list(dict.fromkeys(vocab))


def tiny_tokenizer() -> object:
    """A BERT tokenizer over :func:`tiny_vocab`, built offline from a temporary vocab file (the file is
    read once at construction; a path works across transformers 4.x and 5.x)."""
    from transformers import BertTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")  # atomic: private temp dir
        return BertTokenizer(str(vocab_file))


def blip_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS's ``blip_caption`` text processor (``BlipCaptionProcessor.pre_caption``,
    ``lavis/processors/blip_processors.py``): lower-case; each of ``. ! " ( ) * # : ; ~`` becomes a
    space; runs of two or more whitespace characters become one space; trailing newlines, then
    surrounding spaces are stripped; at most ``max_words`` space-separated words are kept."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


class HFBLIPEncoder(Encoder):
    """A transformers BLIP (``BlipForImageTextRetrieval``, or any module with its ``vision_model``,
    ``text_encoder``, ``vision_proj``, ``text_proj`` and ``config``); captions are tokenized with its BERT
    tokenizer and padded to ``context_length``.

    Args:
        text_attention_mask: mask padding out of the text attention (transformers' default); False
            encodes the padded ids as they are, as LAVIS's BLIP does when called without a mask.
        caption_preprocess: ``blip_caption`` (:func:`blip_caption`, applied before tokenizing) or ``none``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: object,
        image_transform: object,
        transform_id: str,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        text_attention_mask: bool = True,
        caption_preprocess: str = "none",
    ):
        super().__init__()
        if caption_preprocess not in CAPTION_PREPROCESSORS:
            raise ValueError(
                f"caption_preprocess must be one of {CAPTION_PREPROCESSORS}, got {caption_preprocess!r}"
            )
        self.text_attention_mask = bool(text_attention_mask)
        self.caption_preprocess = caption_preprocess
        self.model = model
        self._tokenizer = tokenizer
        self.image_transform = image_transform
        self.transform_id = transform_id
        cfg = model.config
        self.pad_id = int(tokenizer.pad_token_id)
        self.context_length = min(int(context_length), int(cfg.text_config.max_position_embeddings))
        self.embed_dim = int(cfg.image_text_hidden_size)
        self.token_dim = int(cfg.text_config.hidden_size)
        self.image_size = int(cfg.vision_config.image_size)
        self.num_patches = (self.image_size // int(cfg.vision_config.patch_size)) ** 2
        if len(tokenizer) > cfg.text_config.vocab_size:
            raise BackboneLoadError(
                f"tokenizer has {len(tokenizer)} tokens but the BLIP text tower only {cfg.text_config.vocab_size}"
            )

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        texts = [blip_caption(t) for t in texts] if self.caption_preprocess == "blip_caption" else list(texts)
        out = self._tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return out["input_ids"]

    def token_embedding(self) -> nn.Embedding:
        return self.model.text_encoder.embeddings.word_embeddings

    def encode_text(self, ids: Tensor) -> Tensor:
        ids = ids.to(self._device())
        mask = (ids != self.pad_id).long() if self.text_attention_mask else None
        out = self.model.text_encoder(input_ids=ids, attention_mask=mask)
        return self.model.text_proj(out.last_hidden_state[:, 0])

    def encode_image(self, pixels: Tensor, keep: Tensor | None = None) -> Tensor:
        vm = self.model.vision_model
        pixels = pixels.to(self._device())
        if keep is None:  # the library's own forward
            return self.model.vision_proj(vm(pixel_values=pixels).last_hidden_state[:, 0])
        h = vm.embeddings(pixels)  # [B, 1 + L, D], positional embeddings already added
        h = torch.cat([h[:, :1], gather_patches(h[:, 1:], keep.to(h.device))], dim=1)
        h = vm.encoder(inputs_embeds=h)
        h = h[0] if isinstance(h, tuple) else h.last_hidden_state
        return self.model.vision_proj(vm.post_layernorm(h[:, 0]))

    def vision_blocks(self) -> Sequence[nn.Module]:
        return list(self.model.vision_model.encoder.layers)

    def tower_modules(self, tower: str) -> list[nn.Module]:
        if tower == "image":
            return [self.model.vision_model, self.model.vision_proj]
        if tower != "text":
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        text = self.model.text_encoder
        layers = [
            m for layer in text.encoder.layer for m in (layer.attention, layer.intermediate, layer.output)
        ]
        return [text.embeddings, *layers, self.model.text_proj]  # not the cross-attention (ITM only)

    def _device(self) -> torch.device:
        return self.model.vision_proj.weight.device


def blip_transform(
    size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> T.Compose:
    """What ``BlipImageProcessor`` does: RGB, resize to size × size (bicubic, no crop), normalise."""
    return T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB")),
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def build_hf_blip(
    model: str,
    checkpoint: str | None = None,
    init_seed: int = 0,
    cache_dir: str | None = None,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    text_attention_mask: bool = True,
    caption_preprocess: str = "none",
    revision: str | None = None,
) -> HFBLIPEncoder:
    """Build a BLIP encoder from a hub name (``Salesforce/blip-itm-base-coco``, at ``revision``; read from
    the local cache only when the hub cannot be reached), a local directory, or a registered tiny config
    (random init, generated vocabulary). The text options are :class:`HFBLIPEncoder`'s."""
    import transformers

    if model in TINY_BLIP_CONFIGS:
        tokenizer = tiny_tokenizer()
        kwargs = TINY_BLIP_CONFIGS[model]
        text = dict(
            kwargs["text_config"],
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            sep_token_id=tokenizer.sep_token_id,
        )
        config = transformers.BlipConfig(**{**kwargs, "text_config": text})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            blip = transformers.BlipForImageTextRetrieval(config)
        size = config.vision_config.image_size
        transform, transform_id = blip_transform(size), f"blip-resize-{size}"
    else:
        try:
            hub = hub_kwargs(model, cache_dir, revision)
            blip = transformers.BlipForImageTextRetrieval.from_pretrained(model, **hub)
            tokenizer = transformers.AutoTokenizer.from_pretrained(model, **hub)
        except Exception as err:
            raise BackboneLoadError(
                f"could not load Hugging Face BLIP model {model!r}: {type(err).__name__}: {str(err).splitlines()[0]}\n"
                + weights_hint("hf", model, None, cache_dir)
            ) from err
        size = blip.config.vision_config.image_size
        try:
            proc = transformers.BlipImageProcessor.from_pretrained(model, **hub)
            size = proc.size.get("height", size)
            transform = blip_transform(size, proc.image_mean, proc.image_std)
        except OSError:  # no preprocessor_config.json next to the weights: BLIP's defaults
            transform = blip_transform(size)
        transform_id = f"hf-blip-resize{size}"
    if checkpoint:
        from zscir.backbones.open_clip_encoder import load_state_dict_file

        load_state_dict_file(blip, checkpoint)
    blip.eval()
    return HFBLIPEncoder(
        blip,
        tokenizer,
        transform,
        transform_id,
        context_length=context_length,
        text_attention_mask=text_attention_mask,
        caption_preprocess=caption_preprocess,
    )
