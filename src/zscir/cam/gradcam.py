"""Grad-CAM of a CLIP image tower for a word: where in the image is "a photo of a {noun}"?

The map is the ``grad-cam`` package's :class:`~pytorch_grad_cam.GradCAM` with the usual ViT recipe:
the target layer is the first LayerNorm of a vision block (``ln_1`` in open_clip, ``layer_norm1`` in
Hugging Face; by default the last block), the reshape transform drops the class token and lays the
patch tokens out on the patch grid, and the target of sample *i* is the cosine similarity between its
image embedding and the normalised text embedding of its noun's prompt. Grad-CAM then weights each
channel by its spatially averaged gradient, sums, applies ReLU and min–max normalises to [0, 1].

Two things make it cheap enough to run inside a training step:

* **one backward pass for the whole batch.** The per-sample targets are summed before ``backward``; a
  ViT in eval mode has no cross-sample interaction, so sample *i*'s gradient is exactly its own
  (``grad_cams(..., batch_size=1)`` is the one-image-at-a-time reference, and a test checks both agree);
* **a backward pass through one block only.** A forward pre-hook turns the target block's input into a
  fresh leaf that requires grad, so autograd records nothing for the frozen blocks before it and the
  backward pass stops there; no gradient ever reaches the (frozen) weights' ``.grad``.

Maps are returned on the **patch grid** ([B, grid_h, grid_w]): that is what Grad-CAM computes, what
token masking needs, and what the on-disk cache stores (one float per patch). :func:`upsample_cams`
gives the pixel map exactly as ``GradCAM`` itself returns it (bilinear resize, then min–max again).

Cost per image (first epoch; later epochs read the cache, see :mod:`zscir.cam.cache`): one forward of
the image tower (no autograd graph before the target block) plus a backward through the last block,
the pooling and the projection, roughly 1.1–1.3 image-tower forwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from torch import Tensor, nn

from zscir.backbones.base import Encoder


@dataclass(frozen=True)
class CamSpec:
    """Everything besides the backbone and the image that decides a CAM (part of the cache key).

    Attributes:
        prompt: text whose embedding is the Grad-CAM target; ``{noun}`` is replaced by the noun.
        baseline_prompt: optional text whose unit embedding is subtracted from the prompt's, making the
            target ``cos(image, prompt) - cos(image, baseline)``. CLIP's Grad-CAM tends to light up the
            background ("opposite visualisation", CLIP Surgery, Li et al. 2023); removing what any
            "a photo" shares sharpens the map on the object. None: the plain prompt (the paper's reading).
        block: index of the vision block whose first LayerNorm is the target layer (``-1`` = last).
        negate: explain the negated target (Selvaraju et al.'s counterfactual Grad-CAM: what lowers the
            similarity). Where CLIP's map is inverted (the background explains the prompt), the
            counterfactual map is the one that sits on the object.
        autocast: keep the caller's autocast (e.g. bf16) inside the CAM pass; False computes in fp32,
            so a map does not depend on the training precision.
    """

    prompt: str = "a photo of a {noun}"
    baseline_prompt: str | None = None
    block: int = -1
    autocast: bool = False
    negate: bool = False


def target_layer(encoder: Encoder, block: int = -1) -> nn.Module:
    """The first LayerNorm of vision block ``block`` (the Grad-CAM target for ViTs)."""
    layer = encoder.vision_blocks()[block]
    for name in ("ln_1", "layer_norm1"):  # open_clip, Hugging Face CLIP
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    raise TypeError(f"{type(layer).__name__} has no ln_1/layer_norm1; cannot place the Grad-CAM target layer")


def vit_reshape_transform(grid: tuple[int, int]) -> Callable[[Tensor], Tensor]:
    """[B, 1 + L, C] token activations (or gradients) -> [B, C, grid_h, grid_w], class token dropped."""
    gh, gw = grid

    def reshape(tokens: Tensor) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[1] != 1 + gh * gw:
            raise ValueError(f"expected [B, 1 + {gh * gw}, C] tokens, got {tuple(tokens.shape)}")
        patches = tokens[:, 1:].float()  # grad-cam goes through numpy, which has no bfloat16
        return patches.reshape(tokens.shape[0], gh, gw, -1).permute(0, 3, 1, 2)

    return reshape


class SimilarityTarget:
    """Grad-CAM target: ``normalize(image embedding) · v`` for a text vector ``v`` [D] (a unit prompt
    embedding: the cosine similarity; or a difference of two, see ``CamSpec.baseline_prompt``)."""

    def __init__(self, text_feature: Tensor):
        self.text_feature = text_feature

    def __call__(self, image_feature: Tensor) -> Tensor:
        return F.normalize(image_feature.float(), dim=-1) @ self.text_feature.float()


class _GridGradCAM(GradCAM):
    """GradCAM whose maps stay on the patch grid (grad-cam otherwise resizes them to the input size)."""

    def __init__(self, grid: tuple[int, int], **kwargs: object):
        super().__init__(**kwargs)
        self.grid = grid

    def get_target_width_height(self, input_tensor: Tensor) -> tuple[int, int]:
        return self.grid[1], self.grid[0]  # cv2 order (width, height)


class _ImageTower(nn.Module):
    """``pixels -> encode_image(pixels)`` for grad-cam, which calls ``model.eval()`` and ``model.zero_grad()``
    on what it is given: the encoder is held outside the module tree so neither touches it."""

    def __init__(self, encoder: Encoder, device: torch.device):
        super().__init__()
        self._encoder = (encoder,)
        self._device_anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)

    def forward(self, pixels: Tensor) -> Tensor:
        return self._encoder[0].encode_image(pixels)


@contextlib.contextmanager
def _graph_starts_at(block: nn.Module) -> Iterator[None]:
    """Within the block, ``block``'s input is a detached leaf that requires grad: the autograd graph (and
    so the backward pass) covers only ``block`` and what follows it."""

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else "q_x"
        return args, {**kwargs, key: kwargs[key].detach().requires_grad_(True)}

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def prompt_features(encoder: Encoder, nouns: Sequence[str], prompt: str = CamSpec.prompt) -> Tensor:
    """Unit-norm text embeddings [N, D] of ``prompt`` filled with each noun (the Grad-CAM targets)."""
    texts = [prompt.format(noun=n) for n in nouns]
    return F.normalize(encoder.encode_text(encoder.tokenize(texts)).float(), dim=-1)


def grad_cams(
    encoder: Encoder,
    pixels: Tensor,
    text_features: Tensor,
    block: int = -1,
    autocast: bool = False,
    batch_size: int | None = None,
) -> Tensor:
    """Grad-CAM maps on the patch grid, [B, grid_h, grid_w] float32 in [0, 1] (max 1 unless all zero).

    Args:
        pixels: [B, 3, H, W] transformed images.
        text_features: [B, D] unit text embeddings, one target per image.
        block: the vision block whose ``ln_1`` is the target layer.
        autocast: keep an enclosing autocast region active (default: compute in fp32).
        batch_size: images per backward pass; None = the whole batch in one pass, 1 = one at a time.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("Grad-CAM needs autograd; it cannot run inside torch.inference_mode()")
    if text_features.shape[0] != pixels.shape[0]:
        raise ValueError(f"{pixels.shape[0]} images but {text_features.shape[0]} text targets")
    if pixels.shape[0] == 0:
        return torch.zeros(0, *encoder.grid_size)
    step = pixels.shape[0] if batch_size is None else batch_size
    device = next(encoder.parameters()).device
    tower = _ImageTower(encoder, device)
    blocks = encoder.vision_blocks()
    precision = (
        contextlib.nullcontext() if autocast else torch.autocast(device_type=device.type, enabled=False)
    )
    # grad-cam's own context manager swallows IndexError, so its hooks are released by hand instead
    cam = _GridGradCAM(
        encoder.grid_size,
        model=tower,
        target_layers=[target_layer(encoder, block)],
        reshape_transform=vit_reshape_transform(encoder.grid_size),
    )
    maps = []
    try:
        with torch.enable_grad(), precision, _graph_starts_at(blocks[block]):
            for lo in range(0, pixels.shape[0], step):
                chunk = pixels[lo : lo + step].to(device)
                chunk = chunk if autocast else chunk.float()
                targets = [SimilarityTarget(t) for t in text_features[lo : lo + step].to(device)]
                maps.append(torch.from_numpy(np.ascontiguousarray(cam(input_tensor=chunk, targets=targets))))
    finally:
        cam.activations_and_grads.release()
        cam.outputs = None  # drop the retained graph now
    return torch.cat(maps).float()


def upsample_cams(grid_maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Grid maps [B, h, w] -> pixel maps [B, H, W] in [0, 1], as ``GradCAM`` returns them at input size:
    bilinear resize (half-pixel centres, like ``cv2.resize``), then min–max normalisation again."""
    up = F.interpolate(grid_maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return minmax(up)


def minmax(maps: Tensor) -> Tensor:
    """Per-map ``(m - min) / (1e-7 + max - min)``: grad-cam's ``scale_cam_image`` normalisation."""
    flat = maps.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (1e-7 + flat.max(dim=1, keepdim=True).values)
    return flat.view_as(maps)
