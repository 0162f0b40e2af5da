"""GPU rows (run by ``make bench`` only where CUDA is present; ``null`` otherwise).

* ``gpu_pli_bf16``: a PLI training step on ViT-L/14 (75 % of the masked view's patches dropped, caption,
  full-image target, in-batch cross-entropy, AdamW) with bf16 autocast and fused AdamW vs the official
  recipe's fp32 step; MFU = counted FLOPs per step / step time / the GPU's dense bf16 peak.
* ``gpu_cam_batch``: Grad-CAM for a batch in one backward pass vs one image at a time, ViT-L/14.
* ``gpu_lincir``: a LinCIR step (φ through the frozen ViT-bigG-14 text tower, batch 512, bf16) in
  samples/s vs the paper's figure, 20k steps × 512 in 48 min on 8 A100 ≈ 444 samples/s per GPU.

Random-init weights: speed does not depend on them. ``run(..., device="cpu", model="tiny")`` runs the
same code on the tiny CLIP (the bench smoke test does), so the GPU path is exercised without a GPU.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from experiments.bench.common import interleaved, row
from zscir.backbones import build_encoder, random_keep
from zscir.cam import grad_cams, prompt_features
from zscir.methods import build_method

#: dense bf16 tensor-core peak, FLOP/s, by substring of ``torch.cuda.get_device_name``
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
#: the rows :func:`run` returns and their units (``make bench`` writes them as null rows without a GPU)
ROWS = {"gpu_pli_bf16": "samples/s", "gpu_cam_batch": "images/s", "gpu_lincir": "samples/s"}
PAPER_LINCIR_SAMPLES_PER_S = 20_000 * 512 / (48 * 60) / 8  # ≈ 444 per GPU


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a device sync, so wall time covers the queued kernels."""

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return call


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def pli_step_bench(model: str, device: torch.device, batch: int, reps: int) -> dict:
    encoder = build_encoder(kind="open_clip", model=model).to(device).train()
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, encoder.image_size, encoder.image_size, generator=gen).to(device)
    keep = random_keep(batch, encoder.num_patches, 0.75, generator=gen).to(device)
    ids = encoder.tokenize(["a large red circle on the left and a small blue square"] * batch).to(device)
    labels = torch.arange(batch, device=device)
    params = list(encoder.parameters())
    optimizers = {
        True: torch.optim.AdamW(params, lr=1e-6, weight_decay=5e-5, fused=device.type == "cuda"),
        False: torch.optim.AdamW(params, lr=1e-6, weight_decay=5e-5),
    }

    def step(bf16: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            query = encoder.encode_image(pixels, keep=keep) + encoder.encode_text(ids)
            target = encoder.encode_image(pixels)
            loss = F.cross_entropy((query @ target.T).float(), labels)  # PLI's loss as coded (τ = 1)
        loss.backward()
        optimizers[bf16].step()
        optimizers[bf16].zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step(True)
    flops = counter.get_total_flops()
    ours, base = interleaved(
        synced(lambda: step(True), device), synced(lambda: step(False), device), reps=reps
    )
    peak = peak_flops(device)
    return row(
        batch / ours,
        batch / base,
        "samples/s",
        True,
        size=f"open_clip {model} random init, batch {batch}, 75 % dropped, on {device}",
        mfu=round(flops / ours / peak, 3) if peak else None,
        flops_per_step=flops,
    )


def cam_batch_bench(model: str, device: torch.device, batch: int, reps: int) -> dict:
    encoder = build_encoder(kind="open_clip", model=model).to(device).eval().requires_grad_(False)
    pixels = torch.randn(batch, 3, encoder.image_size, encoder.image_size).to(device)
    targets = prompt_features(encoder, ["circle", "square", "triangle", "cross"] * (batch // 4 + 1))[:batch]
    ours, base = interleaved(
        synced(lambda: grad_cams(encoder, pixels, targets), device),
        synced(lambda: grad_cams(encoder, pixels, targets, batch_size=1), device),
        reps=reps,
    )
    return row(
        batch / ours, batch / base, "images/s", True, size=f"open_clip {model}, batch {batch}, on {device}"
    )


def lincir_bench(model: str, device: torch.device, batch: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as cache_dir:
        method = build_method(
            {"kind": "open_clip", "model": model},
            {"name": "lincir", "keywords": {"cache_dir": cache_dir}},
        ).to(device)
        method.train()
        optimizer = torch.optim.AdamW(
            method.phi.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda"
        )
        # LinCIR's masked captions: keywords replaced by "$"
        ids = method.encoder.tokenize(["a photo of a red dress with long sleeves on a wooden floor"] * batch)
        masked = method.encoder.tokenize(["$ of $ with $ on $"] * batch)
        ids, masked = ids.to(device), masked.to(device)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = method.self_masking_loss(ids, masked)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        ours, _ = interleaved(synced(step, device), lambda: None, reps=reps)
    return row(
        batch / ours,
        PAPER_LINCIR_SAMPLES_PER_S,
        "samples/s",
        True,
        size=f"open_clip {model} text tower, batch {batch}, bf16, on {device}; baseline = the paper's 444/s/GPU",
    )


def run(
    device: str = "cuda",
    pli_model: str = "ViT-L-14",
    lincir_model: str = "ViT-bigG-14",
    pli_batch: int = 64,
    cam_batch: int = 32,
    lincir_batch: int = 512,
    reps: int = 5,
) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    return {
        "gpu_pli_bf16": pli_step_bench(pli_model, dev, pli_batch, reps),
        "gpu_cam_batch": cam_batch_bench(pli_model, dev, cam_batch, reps),
        "gpu_lincir": lincir_bench(lincir_model, dev, lincir_batch, reps),
    }
