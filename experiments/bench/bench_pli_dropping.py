"""``pli_dropping``: PLI's masked view encoded by *dropping* 75 % of the patch tokens
(``Encoder.encode_image(keep=...)``) vs zeroing the masked patches' pixels and encoding every token.
``pli_dropping_step``: the whole training step (masked view + full-image target + caption, backward,
AdamW) both ways.

The baseline of those two rows is zscir's own alternative (zeroed pixels), which **no peer runs**: the
official PLI code drops tokens too. Tiny CLIP (32-token text context), CPU.

``peer_pli_step`` (headline): the same training step vs a transcription of the official one
(Chen-Junyang-cn/PLI ``trainers/pretrainer.py:85-116`` ``mask_forword``: masked view by
``models/image_encoders/clip_image_encoder.py:38-98`` — per-sample ``argsort`` of uniform noise, kept
tokens gathered, class token prepended, transformer —, the caption through the CLIP text tower over its
full 77-token context, the unmasked target image, loss on ``masked + text`` vs the target), at equal batch
and precision (fp32, as ``clip_image_encoder.py:14`` casts the model). Both sides run the same tiny CLIP
with a 77-token context on the same pixels, captions of CC3M-like length and the same AdamW; the step's
gain is the text tower run over the batch's own length. Equality: the first step's loss from identical
weights and the same noise (atol 1e-5).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from experiments.bench.common import TINY77, compare, timed_row
from zscir.backbones import build_encoder, random_keep

ZEROED = "zscir's own encoder on pixels with the masked patches zeroed (no peer does this)"


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

    t_view = compare(lambda: view(True), lambda: view(False), reps=reps)
    t_step = compare(lambda: step(True), lambda: step(False), reps=reps)
    size = f"tiny CLIP (ViT 4x192, patch {patch}, {encoder.image_size}px), batch {batch}, {int(mask_ratio * 100)} % dropped"
    return {
        "peer_pli_step": peer_step_row(batch, mask_ratio, reps),
        "pli_dropping": timed_row(
            t_view, "samples/s", baseline_is=ZEROED, equal=None, per_call=batch, size=size
        ),
        "pli_dropping_step": timed_row(
            t_step, "samples/s", baseline_is=ZEROED, equal=None, per_call=batch, size=size
        ),
    }


def official_masked_view(visual: torch.nn.Module, x: torch.Tensor, noise: torch.Tensor, mask_ratio: float):
    """PLI ``clip_image_encoder.py:38-98`` on an open_clip ``VisionTransformer`` (same module names as
    OpenAI CLIP's; open_clip's transformer takes [N, L, D], so the LND permutes are left out)."""
    x = visual.conv1(x)  # :67
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # :68-69
    x = x + visual.positional_embedding[1:, :].unsqueeze(0)  # :71
    _, length, d = x.shape  # random_masking, :44-55
    ids_keep = torch.argsort(noise, dim=1)[:, : int(length * (1 - mask_ratio))]
    x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    cls = visual.class_embedding.to(x.dtype) + visual.positional_embedding[:1, :].unsqueeze(0)  # :82
    x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)  # :83-84
    x = visual.ln_pre(x)  # :85
    x = visual.transformer(x)  # :88-90
    x = visual.ln_post(x[:, 0, :])  # :92
    return x @ visual.proj if visual.proj is not None else x  # :94-95


def peer_step_row(batch: int, mask_ratio: float, reps: int) -> dict:
    from experiments.bench.bench_lincir_step import mixed_captions

    torch.manual_seed(0)
    ours_enc = build_encoder(**TINY77).train()
    peer_enc = copy.deepcopy(ours_enc)
    pixels = torch.randn(batch, 3, ours_enc.image_size, ours_enc.image_size)
    ids = ours_enc.tokenize(mixed_captions(batch, long_share=0.0))  # [B, 77]
    labels = torch.arange(batch)
    opts = {e: torch.optim.AdamW(e.parameters(), lr=1e-6) for e in (ours_enc, peer_enc)}

    def ours(noise: torch.Tensor | None = None, update: bool = True) -> torch.Tensor:
        noise = torch.rand(batch, ours_enc.num_patches) if noise is None else noise
        keep = noise.argsort(dim=1)[:, : int(ours_enc.num_patches * (1 - mask_ratio))].sort(dim=1).values
        query = ours_enc.encode_image(pixels, keep=keep) + ours_enc.encode_text(ids)
        loss = F.cross_entropy(query @ ours_enc.encode_image(pixels).T, labels)
        return _update(loss, opts[ours_enc], update)

    def peer(noise: torch.Tensor | None = None, update: bool = True) -> torch.Tensor:
        m = peer_enc.model
        noise = torch.rand(batch, peer_enc.num_patches) if noise is None else noise  # :47
        masked = official_masked_view(m.visual, pixels, noise, mask_ratio)  # pretrainer.py:88
        text = m.encode_text(ids)  # pretrainer.py:91, all 77 positions
        target = m.encode_image(pixels)  # pretrainer.py:92
        loss = F.cross_entropy((masked + text) @ target.T, labels)  # :103-115, identity compositor
        return _update(loss, opts[peer_enc], update)

    noise = torch.rand(batch, ours_enc.num_patches, generator=torch.Generator().manual_seed(1))
    equal = bool(torch.allclose(ours(noise, update=False), peer(noise, update=False), atol=1e-5, rtol=0))
    timing = compare(ours, peer, reps=reps)
    return timed_row(
        timing,
        "samples/s",
        baseline_is="Chen-Junyang-cn/PLI trainers/pretrainer.py:85-116 + clip_image_encoder.py:38-98, transcribed",
        equal=equal,
        per_call=batch,
        size=f"tiny CLIP (77-token context), batch {batch}, {int(mask_ratio * 100)} % dropped, fp32",
    )


def _update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, update: bool) -> torch.Tensor:
    if update:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()
