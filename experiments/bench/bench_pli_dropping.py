"""``pli_dropping``: PLI's masked view encoded by *dropping* 75 % of the patch tokens
(``Encoder.encode_image(keep=...)``) vs zeroing the masked patches' pixels and encoding every token.
Also the whole training step (masked view + full-image target + caption, backward, AdamW) both ways."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from experiments.bench.common import interleaved, row
from zscir.backbones import build_encoder, random_keep


def zero_masked_patches(pixels: torch.Tensor, keep: torch.Tensor, patch: int) -> torch.Tensor:
    """Pixels with every patch not in ``keep`` set to 0 (the normalised mean)."""
    b, _, h, w = pixels.shape
    grid = w // patch
    mask = torch.zeros(b, (h // patch) * grid, dtype=pixels.dtype)
    mask.scatter_(1, keep, 1.0)
    mask = mask.view(b, 1, h // patch, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return pixels * mask


def run(batch: int = 64, mask_ratio: float = 0.75, reps: int = 5) -> dict:
    torch.manual_seed(0)
    encoder = build_encoder(kind="open_clip", model="tiny").train()
    patch = encoder.image_size // encoder.grid_size[0]
    pixels = torch.randn(batch, 3, encoder.image_size, encoder.image_size)
    keep = random_keep(batch, encoder.num_patches, mask_ratio, generator=torch.Generator().manual_seed(0))
    zeroed = zero_masked_patches(pixels, keep, patch)
    ids = encoder.tokenize(["a large red circle on the left and a small blue square"] * batch)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-6)

    def view(dropping: bool) -> None:
        feats = encoder.encode_image(pixels, keep=keep) if dropping else encoder.encode_image(zeroed)
        feats.sum().backward()
        encoder.zero_grad(set_to_none=True)

    def step(dropping: bool) -> None:
        masked = encoder.encode_image(pixels, keep=keep) if dropping else encoder.encode_image(zeroed)
        query = masked + encoder.encode_text(ids)
        target = encoder.encode_image(pixels)
        loss = F.cross_entropy(query @ target.T, torch.arange(batch))  # PLI's loss as coded (τ = 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    v_ours, v_base = interleaved(lambda: view(True), lambda: view(False), reps=reps)
    s_ours, s_base = interleaved(lambda: step(True), lambda: step(False), reps=reps)
    size = f"tiny CLIP (ViT 4x192, patch {patch}, {encoder.image_size}px), batch {batch}, {int(mask_ratio * 100)} % dropped"
    return {
        "pli_dropping": row(batch / v_ours, batch / v_base, "samples/s", True, size=size),
        "pli_dropping_step": row(batch / s_ours, batch / s_base, "samples/s", True, size=size),
    }
