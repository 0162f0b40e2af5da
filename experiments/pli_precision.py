"""PLI in fp32 vs bf16 autocast: the loss and one AdamW update on one fixed batch.

    PYTHONPATH=src python experiments/pli_precision.py                    # CLIP ViT-B/32 shape, random weights
    PYTHONPATH=src python experiments/pli_precision.py --backbone tiny    # the test-suite backbone (seconds)

The official PLI code trains in float32 (CLIP cast with ``.float()``, no autocast) with raw features and
temperature 1, so its logits are large and small relative errors in the features become large absolute
errors in the logits. This script runs zscir's PLI ``training_step`` twice from the same weights on the same
batch and masks, once in fp32 and once under ``torch.autocast(cpu, bfloat16)`` (what Lightning's
``bf16-mixed`` does), then one ``AdamW`` step (lr, weight decay from the PLI defaults), and prints JSON:
the two losses, the logits' scale, and how the gradients and the parameter updates differ.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
import warnings

import torch

from zscir.methods import build_method

BACKBONES = {
    "b32": {"name": "clip_vit_b32_random", "kind": "open_clip", "model": "ViT-B-32", "pretrained": None},
    "tiny": {"name": "tiny", "kind": "open_clip", "model": "tiny"},
}
CAPTIONS = [
    "a dog running on the beach",
    "two red cars parked next to a building",
    "a bowl of soup with a spoon",
    "a man riding a bicycle down a hill",
    "a small bird sitting on a branch",
    "a kitchen with white cabinets and a window",
    "a plate of pasta with tomato sauce",
    "a cat sleeping on a sofa",
]


def one_step(method: torch.nn.Module, batch: dict, bf16: bool, lr: float, weight_decay: float) -> dict:
    """Loss, logits, gradients and the AdamW update of one training step of ``method`` (changed in place)."""
    method.train()
    params = [p for p in method.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten().double() for p in params])
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with context:
        loss = method.training_step(batch, 0)
    loss.backward()
    grads = torch.cat([p.grad.flatten().double() for p in params])
    torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay).step()
    after = torch.cat([p.detach().flatten().double() for p in params])
    return {"loss": loss.item(), "params": before, "grads": grads, "update": after - before}


def logits_of(method: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The fp32 training logits query · targetᵀ (temperature 1), with the masks of batch 0."""
    with torch.no_grad():
        pixels = batch["pixels"]
        keep = method.draw_keep(pixels.shape[0], 0)
        enc = method.encoder
        query = enc.encode_image(pixels, keep=keep) + enc.encode_text(enc.tokenize(batch["caption"]))
        return query @ enc.encode_image(pixels).T


def measure(backbone: str = "b32", batch_size: int = 32, seed: int = 0) -> dict:
    """fp32 vs bf16 autocast on one batch (see the module docstring); returns the numbers printed."""
    torch.manual_seed(seed)
    method = build_method(BACKBONES[backbone], {"kind": "pli"})
    o = method.cfg.optim
    size = method.encoder.image_size
    batch = {
        "pixels": torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed)),
        "caption": [CAPTIONS[i % len(CAPTIONS)] + f" number {i}" for i in range(batch_size)],
    }
    logits = logits_of(method, batch)
    runs, seconds = {}, {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        start = time.perf_counter()
        runs[name] = one_step(copy.deepcopy(method), batch, bf16, o.lr, o.weight_decay)
        seconds[name] = round(time.perf_counter() - start, 1)
    a, b = runs["fp32"], runs["bf16"]

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).norm() / y.norm())

    def cos(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(x, y, dim=0))

    moved = a["update"] != 0
    return {
        "backbone": backbone,
        "batch": batch_size,
        "lr": o.lr,
        "weight_decay": o.weight_decay,
        "trainable_params": int(a["params"].numel()),
        "logits_fp32": {
            "max_abs": float(logits.abs().max()),
            "diagonal_mean": float(logits.diagonal().mean()),
            "row_std_mean": float(logits.std(dim=1).mean()),
        },
        "loss": {"fp32": a["loss"], "bf16": b["loss"], "abs_diff": abs(a["loss"] - b["loss"])},
        "grad": {"rel_diff": rel(b["grads"], a["grads"]), "cosine": cos(b["grads"], a["grads"])},
        "update": {
            "rel_param_change_fp32": float(a["update"].norm() / a["params"].norm()),
            "rel_param_change_bf16": float(b["update"].norm() / b["params"].norm()),
            "rel_diff": rel(b["update"], a["update"]),
            "cosine": cos(b["update"], a["update"]),
            "sign_flip_fraction": float(
                (torch.sign(b["update"]) != torch.sign(a["update"]))[moved].double().mean()
            ),
        },
        "seconds": seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="b32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step called without a Trainer
    print(json.dumps(measure(args.backbone, args.batch, args.seed), indent=2))
