"""Hugging Face ``CLIPModel`` (hub name or local directory) behind the :class:`Encoder` contract."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn
from torchvision import transforms as T

from zscir.backbones.base import Encoder, gather_patches, trim_padding
from zscir.backbones.errors import BackboneLoadError, hub_reachable, weights_hint

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Random-init HF CLIP configs for tests (``transformers.CLIPConfig`` kwargs).
TINY_HF_CONFIGS: dict[str, dict] = {
    "tiny": dict(
        projection_dim=64,
        text_config=dict(
            vocab_size=49408,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
        ),
    ),
}


def _pooled(out: object) -> Tensor:
    """transformers 5 returns a ModelOutput from ``get_*_features``; 4.x returned the tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


class HFCLIPEncoder(Encoder):
    """A ``transformers.CLIPModel``; tokenised with the CLIP BPE tokenizer (same vocabulary, zero padding,
    as the official LinCIR evaluation does with ``clip.tokenize``)."""

    def __init__(self, model: nn.Module, image_transform: object, transform_id: str):
        super().__init__()
        self.model = model
        cfg = model.config
        if cfg.text_config.vocab_size != 49408:
            raise BackboneLoadError(
                f"HF CLIP text vocab size {cfg.text_config.vocab_size} is not the CLIP BPE vocabulary (49408)"
            )
        self.context_length = int(cfg.text_config.max_position_embeddings)
        self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)
        self.image_transform = image_transform
        self.transform_id = transform_id
        self.embed_dim = int(cfg.projection_dim)
        self.token_dim = int(cfg.text_config.hidden_size)
        self.image_size = int(cfg.vision_config.image_size)
        self.num_patches = (self.image_size // int(cfg.vision_config.patch_size)) ** 2

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self._tokenizer(list(texts))

    def token_embedding(self) -> nn.Embedding:
        return self.model.text_model.embeddings.token_embedding

    def encode_text(self, ids: Tensor) -> Tensor:
        # the text tower is causal and pooled at the first end-of-text token: padding after it is dead weight
        return _pooled(self.model.get_text_features(input_ids=trim_padding(ids.to(self._device()))))

    def encode_image(self, pixels: Tensor, keep: Tensor | None = None) -> Tensor:
        pixels = pixels.to(self._device())
        if keep is None:
            return _pooled(self.model.get_image_features(pixel_values=pixels))
        vm = self.model.vision_model
        h = vm.embeddings(pixels)  # [B, 1 + L, D], positional embeddings already added
        h = torch.cat([h[:, :1], gather_patches(h[:, 1:], keep.to(h.device))], dim=1)
        h = vm.encoder(inputs_embeds=vm.pre_layrnorm(h))
        h = h[0] if isinstance(h, tuple) else h.last_hidden_state
        return self.model.visual_projection(vm.post_layernorm(h[:, 0]))

    def vision_blocks(self) -> Sequence[nn.Module]:
        return list(self.model.vision_model.encoder.layers)

    def tower_modules(self, tower: str) -> list[nn.Module]:
        if tower == "image":
            return [self.model.vision_model, self.model.visual_projection]
        if tower == "text":
            return [self.model.text_model, self.model.text_projection]
        raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")

    def _device(self) -> torch.device:
        return self.model.visual_projection.weight.device


def clip_eval_transform(
    resize: int, crop: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> T.Compose:
    """Resize the shortest edge (bicubic), centre-crop, normalise: what ``CLIPImageProcessor`` does."""
    return T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB")),
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def build_hf_clip(
    model: str,
    checkpoint: str | None = None,
    init_seed: int = 0,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> HFCLIPEncoder:
    """Build a HF CLIP encoder from a hub name (at ``revision``: branch, tag or commit; None: the default
    branch), a local directory, or a registered tiny config. A hub name is read from the local cache only
    when the hub cannot be reached (:func:`~zscir.backbones.errors.hub_reachable`).

    Raises:
        BackboneLoadError: the weights cannot be found or loaded (with how to get them offline).
    """
    import transformers

    if model in TINY_HF_CONFIGS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            clip = transformers.CLIPModel(transformers.CLIPConfig(**TINY_HF_CONFIGS[model]))
        size = clip.config.vision_config.image_size
        transform, transform_id = clip_eval_transform(size, size), f"clip-resize-crop-{size}"
    else:
        try:
            hub = hub_kwargs(model, cache_dir, revision)
            clip = transformers.CLIPModel.from_pretrained(model, **hub)
        except Exception as err:
            raise BackboneLoadError(
                f"could not load Hugging Face CLIP model {model!r}: {type(err).__name__}: {str(err).splitlines()[0]}\n"
                + weights_hint("hf", model, None, cache_dir)
            ) from err
        try:
            proc = transformers.CLIPImageProcessor.from_pretrained(model, **hub)
            resize = proc.size.get("shortest_edge", clip.config.vision_config.image_size)
            crop = proc.crop_size.get("height", clip.config.vision_config.image_size)
            transform = clip_eval_transform(resize, crop, proc.image_mean, proc.image_std)
        except OSError:  # no preprocessor_config.json next to the weights: CLIP defaults
            size = clip.config.vision_config.image_size
            resize = crop = size
            transform = clip_eval_transform(size, size)
        transform_id = f"hf-clip-resize{resize}-crop{crop}"
    if checkpoint:
        from zscir.backbones.open_clip_encoder import load_state_dict_file

        load_state_dict_file(clip, checkpoint)
    clip.eval()
    return HFCLIPEncoder(clip, transform, transform_id)


def hub_kwargs(model: str, cache_dir: str | None, revision: str | None) -> dict:
    """``from_pretrained`` arguments: the cache, the revision, and ``local_files_only`` for a hub name when
    the hub cannot be reached (a local directory never touches the hub)."""
    local = is_local_dir(model) or not hub_reachable()
    return {"cache_dir": cache_dir, "revision": revision, "local_files_only": local}


def is_local_dir(model: str) -> bool:
    return Path(model).expanduser().is_dir()
