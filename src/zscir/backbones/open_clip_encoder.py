"""open_clip models (by name + pretrained tag, local checkpoint, or a registered tiny architecture)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from zscir.backbones.base import Encoder, gather_patches, trim_padding
from zscir.backbones.errors import BackboneLoadError, weights_hint

#: Small random-init architectures for tests and the synthetic shapes world (open_clip.CLIP kwargs).
TINY_ARCHITECTURES: dict[str, dict] = {
    "tiny": dict(
        embed_dim=128,
        vision_cfg=dict(image_size=64, layers=4, width=192, patch_size=8, head_width=64),
        text_cfg=dict(context_length=32, vocab_size=49408, width=128, heads=4, layers=4),
    ),
}


class OpenCLIPEncoder(Encoder):
    """An ``open_clip.CLIP`` (or ``CustomTextCLIP``) behind the :class:`Encoder` contract."""

    def __init__(self, model: nn.Module, tokenizer: object, image_transform: object, transform_id: str):
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer
        self.image_transform = image_transform
        self.transform_id = transform_id
        visual = model.visual
        if not hasattr(visual, "conv1"):
            raise BackboneLoadError(
                f"{type(visual).__name__} is not a ViT; zscir needs a ViT image tower (token dropping, Grad-CAM)"
            )
        self.embed_dim = int(visual.output_dim)
        self.token_dim = int(self.token_embedding().embedding_dim)
        self.context_length = int(getattr(tokenizer, "context_length", 77))
        self.image_size = int(visual.image_size[0])
        self.num_patches = int(visual.grid_size[0] * visual.grid_size[1])

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self._tokenizer(list(texts))

    def token_embedding(self) -> nn.Embedding:
        text = getattr(self.model, "text", self.model)
        return text.token_embedding

    def encode_text(self, ids: Tensor) -> Tensor:
        m, ids = self.model, ids.to(self._device())
        causal_eot_pooled = (
            getattr(m, "attn_mask", None) is not None and getattr(m, "text_pool_type", "") == "argmax"
        )
        if not causal_eot_pooled:  # CustomTextCLIP, SigLIP-style towers: the library's own path, untrimmed
            return m.encode_text(ids)
        # open_clip's CLIP.encode_text, on the ids trimmed after the last end-of-text token
        ids = trim_padding(ids)
        n, cast_dtype = ids.shape[1], m.transformer.get_cast_dtype()
        x = m.token_embedding(ids).to(cast_dtype) + m.positional_embedding[:n].to(cast_dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:n, :n]))
        x = open_clip.model.text_global_pool(
            x, ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None)
        )
        if m.text_projection is None:
            return x
        return m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection

    def encode_image(self, pixels: Tensor, keep: Tensor | None = None) -> Tensor:
        visual = self.model.visual
        pixels = pixels.to(self._device())
        if keep is None:
            return self.model.encode_image(pixels)
        x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, L, width]
        pos = visual.positional_embedding.to(x.dtype)
        x = gather_patches(x + pos[1:], keep.to(x.device))
        cls = (visual.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
        x = visual.ln_pre(torch.cat([cls, x], dim=1))
        x = visual.transformer(x)
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def vision_blocks(self) -> Sequence[nn.Module]:
        return list(self.model.visual.transformer.resblocks)

    def tower_modules(self, tower: str) -> list[nn.Module]:
        if tower == "image":
            return [self.model.visual]
        if tower != "text":
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        if hasattr(self.model, "text"):  # CustomTextCLIP
            return [self.model.text]
        names = ("token_embedding", "transformer", "ln_final", "text_projection")
        return [m for n in names if isinstance(m := getattr(self.model, n, None), nn.Module)]

    def _tower_loose_parameters(self, tower: str) -> list[nn.Parameter]:
        if tower != "text" or hasattr(self.model, "text"):
            return []
        names = ("positional_embedding", "text_projection")
        return [p for n in names if isinstance(p := getattr(self.model, n, None), nn.Parameter)]

    def _device(self) -> torch.device:
        return self.model.visual.conv1.weight.device


def build_open_clip(
    model: str,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    init_seed: int = 0,
    cache_dir: str | None = None,
    context_length: int | None = None,
) -> OpenCLIPEncoder:
    """Build an open_clip encoder.

    Args:
        model: an open_clip architecture name (``ViT-B-32``, ``ViT-L-14``, ``ViT-bigG-14``, ...) or one
            of :data:`TINY_ARCHITECTURES`.
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s32b_b79k``, ...) or a path to a
            weights file; ``None`` means random init (seeded by ``init_seed``).
        checkpoint: a zscir/open_clip state dict to load on top (e.g. the synthetic-world CLIP).
        cache_dir: where open_clip looks for / stores downloaded weights.
    """
    if model in TINY_ARCHITECTURES:
        if pretrained:
            raise BackboneLoadError(
                f"{model!r} is a random-init architecture; use checkpoint=... to load weights"
            )
        arch = TINY_ARCHITECTURES[model]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            clip = open_clip.CLIP(**arch)
        image_size = arch["vision_cfg"]["image_size"]
        transform = open_clip.image_transform(image_size, is_train=False)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=arch["text_cfg"]["context_length"])
        transform_id = f"clip-resize-crop-{image_size}"
    else:
        if model not in open_clip.list_models():
            raise BackboneLoadError(
                f"unknown open_clip model {model!r}; known: {', '.join(open_clip.list_models()[:20])}, ..."
            )
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                clip, _, transform = open_clip.create_model_and_transforms(
                    model, pretrained=pretrained, cache_dir=cache_dir
                )
        except Exception as err:
            raise BackboneLoadError(
                f"could not load open_clip model {model!r} with pretrained={pretrained!r}: {type(err).__name__}: {err}\n"
                + weights_hint("open_clip", model, pretrained, cache_dir)
            ) from err
        tokenizer = open_clip.get_tokenizer(
            model, **({"context_length": context_length} if context_length else {})
        )
        transform_id = f"open_clip-{model}-val"
    if checkpoint:
        load_state_dict_file(clip, checkpoint)
    clip.eval()
    return OpenCLIPEncoder(clip, tokenizer, transform, transform_id)


def load_state_dict_file(module: nn.Module, path: str) -> None:
    """Load a state dict saved by ``torch.save`` (optionally under a ``state_dict`` key) into ``module``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise BackboneLoadError(f"backbone checkpoint {str(file)!r} does not exist")
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneLoadError(
            f"{file} does not match the architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
