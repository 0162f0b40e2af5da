"""open_clip models (by name + pretrained tag, local checkpoint, or a registered tiny architecture)."""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from zscir.backbones.base import Encoder, gather_patches, trim_padding
from zscir.backbones.errors import BackboneLoadError, hub_cache_only, hub_reachable, weights_hint

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
    quick_gelu: bool | None = None,
) -> OpenCLIPEncoder:
    """Build an open_clip encoder.

    Args:
        model: an open_clip architecture name (``ViT-B-32``, ``ViT-L-14``, ``ViT-bigG-14``, ...) or one
            of :data:`TINY_ARCHITECTURES`.
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s32b_b79k``, ...) or a path to a
            weights file; ``None`` means random init (seeded by ``init_seed``).
        checkpoint: a zscir/open_clip state dict to load on top (e.g. the synthetic-world CLIP).
        cache_dir: where open_clip looks for / stores downloaded weights.
        context_length: the tokenizer's context length (default: the model's).
        quick_gelu: the MLP activation the weights were trained with (``True``: QuickGELU, as OpenAI's
            CLIP weights; ``False``: GELU). ``None`` follows the pretrained tag's metadata, or, without a
            tag (a weights file, random init), the architecture's own config (``*-quickgelu`` names).

    Raises:
        BackboneLoadError: unknown model, weights not found, or an activation that contradicts the
            pretrained tag (open_clip would only warn, and the features would silently be off).
    """
    if model in TINY_ARCHITECTURES:
        if pretrained:
            raise BackboneLoadError(
                f"{model!r} is a random-init architecture; use checkpoint=... to load weights"
            )
        arch = TINY_ARCHITECTURES[model]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            clip = open_clip.CLIP(**arch, quick_gelu=bool(quick_gelu))
        image_size = arch["vision_cfg"]["image_size"]
        transform = open_clip.image_transform(image_size, is_train=False)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=arch["text_cfg"]["context_length"])
        transform_id = f"clip-resize-crop-{image_size}"
    else:
        # hf-hub:<repo> and local-dir:<dir> carry their own config; other names must be built in
        schema = model.startswith(("hf-hub:", "local-dir:"))
        if not schema and model not in open_clip.list_models():
            raise BackboneLoadError(
                f"unknown open_clip model {model!r}; known: {', '.join(open_clip.list_models()[:20])}, ... "
                "(or hf-hub:<repo> / local-dir:<dir> for a model with its own open_clip_config.json)"
            )
        # a pretrained tag or a hub model may download: from the cache only when the hub is unreachable
        from_hub = model.startswith("hf-hub:") or bool(
            pretrained and not os.path.exists(os.path.expanduser(pretrained))
        )
        cache_only = from_hub and not hub_reachable()
        with hub_cache_only(cache_only):
            activation = (
                {} if schema and quick_gelu is None else _activation_kwargs(model, pretrained, quick_gelu)
            )
        # OpenAI's released files are TorchScript archives, which open_clip's weights-only load refuses:
        # build the architecture, then load their weights like a checkpoint
        archive = pretrained if pretrained and is_torchscript_archive(pretrained) else None
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # a mismatch the checks above missed must not pass as a warning
                warnings.filterwarnings("error", message=".*QuickGELU mismatch")
                torch.manual_seed(init_seed)
                with hub_cache_only(cache_only):
                    clip, _, transform = open_clip.create_model_and_transforms(
                        model, pretrained=None if archive else pretrained, cache_dir=cache_dir, **activation
                    )
        except Exception as err:
            raise BackboneLoadError(
                f"could not load open_clip model {model!r} with pretrained={pretrained!r}: {type(err).__name__}: {err}\n"
                + (
                    "Set backbone.quick_gelu to the activation the weights were trained with."
                    if "QuickGELU" in str(err)
                    else weights_hint("open_clip", model, pretrained, cache_dir)
                )
            ) from err
        with hub_cache_only(cache_only):
            tokenizer = open_clip.get_tokenizer(
                model, **({"context_length": context_length} if context_length else {})
            )
        transform_id = f"open_clip-{model}-val"
        if archive:
            load_state_dict_file(clip, archive)
    if checkpoint:
        load_state_dict_file(clip, checkpoint)
    clip.eval()
    return OpenCLIPEncoder(clip, tokenizer, transform, transform_id)


def _activation_kwargs(model: str, pretrained: str | None, quick_gelu: bool | None) -> dict:
    """``create_model_and_transforms`` arguments that give ``model`` the activation its weights need.

    open_clip's ``ViT-B-32``/``ViT-L-14`` configs use GELU while OpenAI's weights (tag ``openai``) were
    trained with QuickGELU; open_clip records the right one per tag (``quick_gelu`` in the pretrained
    config) but only warns on a mismatch.
    """
    arch_quick = bool(open_clip.get_model_config(model).get("quick_gelu", False))
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
    if tag_cfg:
        tag_quick = bool(tag_cfg.get("quick_gelu", False))
        if quick_gelu is not None and bool(quick_gelu) != tag_quick:
            raise BackboneLoadError(
                f"backbone.quick_gelu={quick_gelu} contradicts the pretrained tag {pretrained!r} of {model!r}, "
                f"whose weights were trained with {'QuickGELU' if tag_quick else 'GELU'}: set "
                f"backbone.quick_gelu={str(tag_quick).lower()} (or null to follow the tag)"
            )
        if arch_quick and not tag_quick:
            base = model.removesuffix("-quickgelu")
            raise BackboneLoadError(
                f"{model!r} uses QuickGELU but the weights of tag {pretrained!r} were trained with GELU: "
                f"use backbone.model={base}"
            )
        quick_gelu = tag_quick
    if quick_gelu is None or bool(quick_gelu) == arch_quick:
        return {}
    # force_quick_gelu only switches it on; an explicit model kwarg overrides the config either way
    return {"force_quick_gelu": True} if quick_gelu else {"quick_gelu": False}


def load_state_dict_file(module: nn.Module, path: str) -> None:
    """Load a weights file saved by ``torch.save`` into ``module``, strictly.

    Accepted variants: a TorchScript archive (OpenAI's released CLIP files); the state dict itself or wrapped under ``state_dict`` or ``model`` (open_clip's
    training checkpoints, many repositories' own); keys with a uniform ``module.`` prefix (saved from a
    DistributedDataParallel wrapper); and entries for buffers ``module`` does not persist (e.g. the
    ``position_ids`` that transformers < 4.31 saved in CLIP/BLIP state dicts). Anything else missing or
    unexpected is an architecture mismatch.

    Raises:
        BackboneLoadError: no such file, or keys/shapes that do not fit ``module`` (counts and examples).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise BackboneLoadError(f"backbone checkpoint {str(file)!r} does not exist")
    if is_torchscript_archive(file):
        state = torch.jit.load(file, map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):  # ints in OpenAI's archives
            state.pop(key, None)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise BackboneLoadError(f"{file} holds a {type(state).__name__}, not a state dict")
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    own = module.state_dict()
    if (
        state
        and all(k.startswith("module.") for k in state)
        and not any(k.startswith("module.") for k in own)
    ):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    not_persisted = {name for name, _ in module.named_buffers()} - set(own)
    state = {k: v for k, v in state.items() if k not in not_persisted}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same keys, different shapes
        raise BackboneLoadError(f"{file} does not match the architecture: {err}") from err
    if missing or unexpected:
        raise BackboneLoadError(
            f"{file} does not match the architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with compiled code and a ``constants.pkl``),
    as opposed to a ``torch.save`` file, which ``torch.load(weights_only=True)`` reads."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
