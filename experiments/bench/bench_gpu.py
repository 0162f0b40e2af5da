"""GPU rows (run by ``make bench`` only where CUDA is present; ``null`` otherwise). Both sides of every row
run on the same device, in the same process, in order-swapped rounds, with their peak GPU memory
(``torch.cuda.max_memory_allocated`` over one call each, ``*_peak_mib``).

* ``gpu_pli_step``: a PLI training step on ViT-L/14, batch 64, 75 % of the masked view's patches dropped,
  both in fp32 (the official precision: ``clip_image_encoder.py:14`` casts CLIP to fp32): zscir vs the
  transcribed official step (``bench_pli_dropping.official_masked_view``; Chen-Junyang-cn/PLI
  ``trainers/pretrainer.py:85-116``, text tower over all 77 positions). Equality: first-step loss, atol 1e-4.
* ``gpu_pli_bf16``: zscir's step under bf16 autocast with fused AdamW vs the same official fp32 step —
  a precision the official code does not offer, so the row says what bf16 buys, not a like-for-like
  comparison; MFU = counted FLOPs per step / step time / the GPU's dense bf16 peak.
* ``gpu_cam_batch``: Grad-CAM for a batch of 32, ViT-L/14: zscir's ``grad_cams`` (+ upsampling) vs
  ``pytorch_grad_cam.GradCAM`` called on the batch as documented (``bench_cam.peer_cams``). Equality:
  every pixel map, atol 1e-4.
* ``gpu_lincir``: a LinCIR φ step through the frozen ViT-bigG-14 text tower, batch 512 of mixed-length
  captions (``bench_lincir_step.mixed_captions``), both in the official precision (navervision/lincir
  ``train_phi.py:143-149``: text tower weights in fp16, φ in fp32 under ``accelerate``'s fp16 autocast
  with a grad scaler): zscir (the tower over the batch's own length) vs the official step
  (``train_phi.py:228-250``: all 77 positions). Equality: the loss of one batch without noise, atol 1e-3.

Random-init weights: speed does not depend on them. ``run(..., device="cpu", pli_model="tiny77", ...)``
runs the same code on the tiny CLIP (the bench smoke test does), so the GPU path is exercised without a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from experiments.bench.bench_cam import peer_cams
from experiments.bench.bench_lincir_step import full_context, mixed_captions
from experiments.bench.bench_pli_dropping import official_masked_view
from experiments.bench.common import TINY77, compare, same, timed_row
from zscir.backbones import build_encoder
from zscir.cam import grad_cams, prompt_features
from zscir.cam.gradcam import upsample_cams
from zscir.methods import build_method

#: dense bf16 tensor-core peak, FLOP/s, by substring of ``torch.cuda.get_device_name``
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
#: the rows :func:`run` returns and their units (``make bench`` writes them as null rows without a GPU)
ROWS = {
    "gpu_pli_step": "samples/s",
    "gpu_pli_bf16": "samples/s",
    "gpu_cam_batch": "images/s",
    "gpu_lincir": "samples/s",
}
PLI_PEER = (
    "Chen-Junyang-cn/PLI trainers/pretrainer.py:85-116 + clip_image_encoder.py:38-98, fp32, transcribed"
)


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device sync, so wall time covers the queued kernels."""

    def call() -> object:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return call


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak GPU memory (MiB) allocated during one call of ``fn``; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _backbone(model: str) -> dict:
    return TINY77 if model == "tiny77" else {"kind": "open_clip", "model": model}


def pli_rows(model: str, device: torch.device, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    ours_enc = build_encoder(**_backbone(model)).to(device).train()
    peer_enc = copy.deepcopy(ours_enc)
    pixels = torch.randn(batch, 3, ours_enc.image_size, ours_enc.image_size, device=device)
    ids = ours_enc.tokenize(mixed_captions(batch, long_share=0.0)).to(device)
    labels = torch.arange(batch, device=device)
    n_keep = int(ours_enc.num_patches * 0.25)
    fused = device.type == "cuda"
    opt = {
        "fp32": torch.optim.AdamW(ours_enc.parameters(), lr=1e-6, weight_decay=5e-5),
        "bf16": torch.optim.AdamW(ours_enc.parameters(), lr=1e-6, weight_decay=5e-5, fused=fused),
        "peer": torch.optim.AdamW(peer_enc.parameters(), lr=1e-6, weight_decay=5e-5),
    }

    def noise_for(noise: torch.Tensor | None) -> torch.Tensor:
        return torch.rand(batch, ours_enc.num_patches, device=device) if noise is None else noise

    def ours(bf16: bool, noise: torch.Tensor | None = None, update: bool = True) -> torch.Tensor:
        keep = noise_for(noise).argsort(dim=1)[:, :n_keep].sort(dim=1).values
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            query = ours_enc.encode_image(pixels, keep=keep) + ours_enc.encode_text(ids)
            loss = F.cross_entropy((query @ ours_enc.encode_image(pixels).T).float(), labels)
        return _update(loss, opt["bf16" if bf16 else "fp32"], update)

    def peer(noise: torch.Tensor | None = None, update: bool = True) -> torch.Tensor:
        m = peer_enc.model
        masked = official_masked_view(m.visual, pixels, noise_for(noise), 0.75)
        loss = F.cross_entropy((masked + m.encode_text(ids)) @ m.encode_image(pixels).T, labels)
        return _update(loss, opt["peer"], update)

    noise = torch.rand(batch, ours_enc.num_patches, device=device, generator=None)
    equal = same(ours(False, noise, update=False), peer(noise, update=False), atol=1e-4)
    with FlopCounterMode(display=False) as counter:
        ours(True)
    flops = counter.get_total_flops()
    fns = {
        k: synced(f, device)
        for k, f in {"fp32": lambda: ours(False), "bf16": lambda: ours(True), "peer": peer}.items()
    }
    mem = {k: peak_mib(f, device) for k, f in fns.items()}
    t32 = compare(fns["fp32"], fns["peer"], reps=reps)
    t16 = compare(fns["bf16"], fns["peer"], reps=reps)
    peak = peak_flops(device)
    size = f"open_clip {model} random init, batch {batch}, 75 % dropped, on {device}"
    return {
        "gpu_pli_step": timed_row(
            t32,
            "samples/s",
            baseline_is=PLI_PEER,
            equal=equal,
            per_call=batch,
            size=size + ", both fp32",
            ours_peak_mib=mem["fp32"],
            baseline_peak_mib=mem["peer"],
        ),
        "gpu_pli_bf16": timed_row(
            t16,
            "samples/s",
            baseline_is=PLI_PEER + " (ours in bf16: precisions differ)",
            equal=None,
            per_call=batch,
            size=size + ", ours bf16 autocast + fused AdamW",
            ours_peak_mib=mem["bf16"],
            baseline_peak_mib=mem["peer"],
            mfu=round(flops / t16["ours"]["median"] / peak, 3) if peak else None,
            flops_per_step=flops,
        ),
    }


def cam_row(model: str, device: torch.device, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    encoder = build_encoder(**_backbone(model)).to(device).eval().requires_grad_(False)
    trainable = copy.deepcopy(encoder).requires_grad_(True)
    pixels = torch.randn(batch, 3, encoder.image_size, encoder.image_size, device=device)
    targets = prompt_features(encoder, ["circle", "square", "triangle", "cross"] * (batch // 4 + 1))[:batch]
    size_hw = (encoder.image_size, encoder.image_size)

    def ours() -> torch.Tensor:
        return upsample_cams(grad_cams(encoder, pixels, targets), size_hw).cpu()

    def peer() -> torch.Tensor:
        return peer_cams(trainable, pixels, targets)

    equal = same(ours(), peer(), atol=1e-4)
    fo, fp = synced(ours, device), synced(peer, device)
    mem = {"ours": peak_mib(fo, device), "peer": peak_mib(fp, device)}
    timing = compare(fo, fp, reps=reps)
    return timed_row(
        timing,
        "images/s",
        baseline_is="pytorch_grad_cam.GradCAM called on the batch as documented, trainable weights",
        equal=equal,
        per_call=batch,
        size=f"open_clip {model}, batch {batch}, on {device}",
        ours_peak_mib=mem["ours"],
        baseline_peak_mib=mem["peer"],
    )


def lincir_row(model: str, device: torch.device, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache_dir:
        methods = {
            side: build_method(_backbone(model), {"kind": "lincir", "keywords": {"cache_dir": cache_dir}}).to(
                device
            )
            for side in ("ours", "peer")
        }
        samples = methods["ours"].text_samples
        from zscir.data.text_corpora import MemorySource

        dataset = samples.dataset([MemorySource(mixed_captions(batch), "gpu")])
        items = samples.collate([dataset[i] for i in range(batch)])
        ids, masked = items["ids"].to(device), items["masked_ids"].to(device)
        state = {}
        for side, m in methods.items():
            m.encoder.half()  # train_phi.py:147: the frozen towers in fp16 weights; φ stays fp32
            m.phi.float()
            m.train()
            state[side] = (
                torch.optim.AdamW(m.phi.parameters(), lr=1e-4, weight_decay=0.01),
                torch.amp.GradScaler(device.type),
            )

        def step(side: str, update: bool = True) -> torch.Tensor:
            m, (optimizer, scaler) = methods[side], state[side]
            context = contextlib.nullcontext() if side == "ours" else full_context()
            with context, torch.autocast(device.type, dtype=torch.float16):
                loss = m.self_masking_loss(ids, masked)
            if update:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            return loss.detach().float()

        for m in methods.values():
            m.eval()  # φ dropout off for the equality check
        methods["peer"].phi.load_state_dict(methods["ours"].phi.state_dict())
        torch.manual_seed(1)
        a = step("ours", update=False)
        torch.manual_seed(1)
        b = step("peer", update=False)
        equal = same(a, b, atol=1e-3)
        for m in methods.values():
            m.train()
        fo, fp = synced(lambda: step("ours"), device), synced(lambda: step("peer"), device)
        mem = {"ours": peak_mib(fo, device), "peer": peak_mib(fp, device)}
        timing = compare(fo, fp, reps=reps)
    return timed_row(
        timing,
        "samples/s",
        baseline_is="navervision/lincir train_phi.py:143-149 + :228-250 (fp16 tower, fp16 autocast + grad scaler, 77 tokens), transcribed",
        equal=equal,
        per_call=batch,
        size=f"open_clip {model} text tower, batch {batch} mixed-length captions, fp16, on {device}",
        ours_peak_mib=mem["ours"],
        baseline_peak_mib=mem["peer"],
    )


def _update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, update: bool) -> torch.Tensor:
    if update:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach().float()


def run(
    device: str = "cuda",
    pli_model: str = "ViT-L-14",
    lincir_model: str = "ViT-bigG-14",
    pli_batch: int = 64,
    cam_batch: int = 32,
    lincir_batch: int = 512,
    reps: int = 5,
) -> dict:
    dev = torch.device(device)
    return {
        **pli_rows(pli_model, dev, pli_batch, reps),
        "gpu_cam_batch": cam_row(pli_model, dev, cam_batch, reps),
        "gpu_lincir": lincir_row(lincir_model, dev, lincir_batch, reps),
    }
