"""``framework_overhead``: one training epoch of PLI through a Lightning ``Trainer`` (zscir's
``RetrievalMethod``: hooks, logging, optimiser and schedule from ``configure_optimizers``) vs a bare
PyTorch loop doing the same math (same masks, loss, AdamW) on the same data loader. Tiny CLIP, CPU.
A fresh ``Trainer`` per epoch, so its set-up is counted against us."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from experiments.bench.common import compare, timed_row
from zscir.methods import build_method
from zscir.methods.pli import pli_loss

CAPTIONS = ("a large red circle", "two small blue squares", "a green triangle left of a cross")


class ImageCaptions(Dataset):
    """Random pixels + captions held in memory, so both sides read exactly the same batches."""

    def __init__(self, n: int, size: int):
        self.pixels = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.pixels[i], "caption": CAPTIONS[i % len(CAPTIONS)]}


def build_pli() -> torch.nn.Module:
    return build_method(
        {"kind": "open_clip", "model": "tiny"}, {"kind": "pli", "warmup_epochs": 0, "optim": {"lr": 1e-6}}
    )


def lightning_epoch(method: torch.nn.Module, loader: DataLoader) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(method, train_dataloaders=loader)


def bare_epoch(method: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader) -> None:
    method.train()
    enc, c = method.encoder, method.cfg
    for batch_idx, batch in enumerate(loader):
        pixels = batch["pixels"]
        keep = method.draw_keep(pixels.shape[0], batch_idx)
        masked = enc.encode_image(pixels, keep=keep)
        text = enc.encode_text(enc.tokenize(batch["caption"]))
        target = enc.encode_image(pixels)
        loss = pli_loss(masked + text, target, 1.0 / c.temperature, c.normalize, c.symmetric)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run(samples: int = 512, batch: int = 32, reps: int = 5) -> dict:
    torch.manual_seed(0)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    ours_method, bare_method = build_pli(), build_pli()
    loader = DataLoader(
        ImageCaptions(samples, ours_method.encoder.image_size), batch_size=batch, num_workers=0
    )
    o = ours_method.cfg.optim
    optimizer = torch.optim.AdamW(
        bare_method.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps
    )
    timing = compare(
        lambda: lightning_epoch(ours_method, loader),
        lambda: bare_epoch(bare_method, optimizer, loader),
        reps=reps,
    )
    return {
        "framework_overhead": timed_row(
            timing,
            "samples/s",
            baseline_is="a bare PyTorch loop doing the same math on the same loader (zscir's own)",
            equal=None,
            per_call=samples,
            size=f"PLI on the tiny CLIP, one epoch of {samples} samples, batch {batch}, CPU",
        )
    }
