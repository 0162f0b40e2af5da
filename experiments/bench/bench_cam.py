"""Grad-CAM for CAM-TI, tiny CLIP, the noun's prompt embedding as the target (as in CAM-TI training).

Rows:

* ``peer_cam_batch`` (headline): zscir's ``grad_cams`` (one backward pass per batch that starts at the
  target block, frozen weights, maps kept on the patch grid, then ``upsample_cams`` to pixels) vs the
  ``grad-cam`` package used the documented way: ``pytorch_grad_cam.GradCAM(model, target_layers,
  reshape_transform)`` called on the whole batch, the model's weights trainable as loaded (so the
  backward runs through the whole tower, weight gradients included), maps returned at the input size.
  Equality: every pixel map, atol 1e-5.
* ``cam_batch``: vs zscir's own path one image at a time (``batch_size=1``).
* ``cam_cache``: a second epoch's CAMs read from the on-disk cache vs computed again (zscir both sides;
  no peer caches CAMs).
"""

from __future__ import annotations

import copy
import tempfile

import torch
from pytorch_grad_cam import GradCAM

from experiments.bench.common import compare, same, timed_row
from zscir.backbones import build_encoder
from zscir.cam import CamCache, CamSpec, NounCams, grad_cams, prompt_features
from zscir.cam.gradcam import SimilarityTarget, target_layer, upsample_cams, vit_reshape_transform


class ImageTower(torch.nn.Module):
    """pixels -> image embedding: the model grad-cam is given."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_image(pixels)


def peer_cams(encoder: torch.nn.Module, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``pytorch_grad_cam.GradCAM`` as its README shows it (context manager, one call per batch)."""
    with GradCAM(
        model=ImageTower(encoder),
        target_layers=[target_layer(encoder)],
        reshape_transform=vit_reshape_transform(encoder.grid_size),
    ) as cam:
        return torch.from_numpy(cam(input_tensor=pixels, targets=[SimilarityTarget(t) for t in targets]))


NOUNS = ("circle", "square", "triangle", "cross", "diamond")


def run(batch: int = 64, batches: int = 4, reps: int = 5) -> dict:
    torch.manual_seed(0)
    encoder = build_encoder(kind="open_clip", model="tiny").eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    size = encoder.image_size
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    nouns = [NOUNS[i % len(NOUNS)] for i in range(batch)]
    targets = prompt_features(encoder, nouns)

    trainable = copy.deepcopy(encoder).requires_grad_(True)  # weights as loaded: trainable
    size_hw = (size, size)

    def ours() -> torch.Tensor:
        return upsample_cams(grad_cams(encoder, pixels, targets), size_hw)

    equal_peer = same(ours(), peer_cams(trainable, pixels, targets), atol=1e-5)
    equal_own = same(
        grad_cams(encoder, pixels, targets), grad_cams(encoder, pixels, targets, batch_size=1), atol=1e-5
    )
    t_peer = compare(ours, lambda: peer_cams(trainable, pixels, targets), reps=reps)
    t_own = compare(
        lambda: grad_cams(encoder, pixels, targets),
        lambda: grad_cams(encoder, pixels, targets, batch_size=1),
        reps=reps,
    )

    # an "epoch" of `batches` batches, each image with its id and noun
    epoch = [
        (torch.randn(batch, 3, size, size, generator=gen), [f"img{k}_{i}" for i in range(batch)])
        for k in range(batches)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cached = NounCams(encoder, CamSpec(), cache=CamCache(tmp, "bench"))
        fresh = NounCams(encoder, CamSpec())
        for px, ids in epoch:  # the first epoch fills the cache
            cached(px, nouns, ids)
        filled = cached.computed

        def second_epoch(cams: NounCams) -> None:
            for px, ids in epoch:
                cams(px, nouns, ids)

        t_cache = compare(
            lambda: second_epoch(cached), lambda: second_epoch(fresh), reps=reps, ours_repeat=20
        )
        if cached.computed != filled:
            raise RuntimeError("the cached epoch recomputed CAMs; the cache did not hit")

    model = f"tiny CLIP (ViT {len(encoder.vision_blocks())} blocks, grid {encoder.grid_size[0]}x{encoder.grid_size[1]}, {size}px)"
    n = batch * batches
    return {
        "peer_cam_batch": timed_row(
            t_peer,
            "images/s",
            baseline_is="pytorch_grad_cam.GradCAM called on the batch as documented, trainable weights",
            equal=equal_peer,
            per_call=batch,
            size=f"{model}, batch {batch}",
        ),
        "cam_batch": timed_row(
            t_own,
            "images/s",
            baseline_is="zscir's own grad_cams one image at a time (batch_size=1)",
            equal=equal_own,
            per_call=batch,
            size=f"{model}, batch {batch}",
        ),
        "cam_cache": timed_row(
            t_cache,
            "images/s",
            baseline_is="zscir's own grad_cams recomputing the epoch (no peer caches CAMs)",
            equal=None,
            per_call=n,
            size=f"{model}, epoch of {batches} x {batch} images",
        ),
    }
