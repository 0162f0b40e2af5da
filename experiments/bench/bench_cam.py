"""``cam_batch``: Grad-CAM maps for a whole batch in one backward pass vs one image at a time (the same
code with ``batch_size=1``). ``cam_cache``: a second epoch's CAMs read from the on-disk cache vs computed
again. Both on the tiny CLIP, with the noun's prompt embedding as the target, as in CAM-TI training."""

from __future__ import annotations

import tempfile

import torch

from experiments.bench.common import interleaved, row
from zscir.backbones import build_encoder
from zscir.cam import CamCache, CamSpec, NounCams, grad_cams, prompt_features

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

    b_ours, b_base = interleaved(
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

        c_ours, c_base = interleaved(lambda: second_epoch(cached), lambda: second_epoch(fresh), reps=reps)
        if cached.computed != filled:
            raise RuntimeError("the cached epoch recomputed CAMs; the cache did not hit")

    model = f"tiny CLIP (ViT {len(encoder.vision_blocks())} blocks, grid {encoder.grid_size[0]}x{encoder.grid_size[1]}, {size}px)"
    n = batch * batches
    return {
        "cam_batch": row(batch / b_ours, batch / b_base, "images/s", True, size=f"{model}, batch {batch}"),
        "cam_cache": row(
            n / c_ours, n / c_base, "images/s", True, size=f"{model}, epoch of {batches} x {batch} images"
        ),
    }
