"""PLI — "Pretrain like Your Inference: Masked Tuning Improves Zero-Shot Composed Image Retrieval"
(Chen & Lai; official code https://github.com/Chen-Junyang-cn/PLI, summarised in ``docs/methods.md``, PLI).

PLI fine-tunes the dual encoder itself so that its training task looks like composed retrieval. From an
image–caption pair it builds the triplet ⟨masked image, caption, image⟩:

* query  = f_img(image with most patch tokens *dropped*) + f_txt(caption),
* target = f_img(full image), the same image tower, with gradients,
* loss   = cross-entropy of query · targetᵀ over the batch (the other images are the negatives).

Defaults follow the official code, not the paper text (which speaks of averaging and cosine similarity):
raw *unnormalised* features, τ = 1, one direction (query → target). Normalised features, a fixed or
learnable temperature and the symmetric loss are options. At inference the query is
``normalize(normalize(f_txt) + w · normalize(f_img))`` with ``w = 1 − mask_ratio`` unless overridden, and
the gallery is the (normalised) image features — the ``sum`` baseline's formula on the tuned weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zscir.backbones import random_keep
from zscir.methods.base import MethodConfig, OptimConfig, RetrievalMethod, lr_lambda
from zscir.methods.losses import info_nce
from zscir.retrieval.search import normalize

log = logging.getLogger(__name__)

TUNE_CHOICES = ("both", "image", "text")
NORMALIZE_CHOICES = ("none", "target", "both")


@dataclass
class PLIConfig(MethodConfig):
    #: fraction of patch tokens dropped from the query view; README: 0.75 for CLIP, 0.5 for BLIP
    mask_ratio: float = 0.75
    #: inference weight of the normalised reference-image feature; None = 1 − mask_ratio
    img_weight: float | None = None
    #: which towers train: both (official default), image or text (the other stays frozen, in eval mode)
    tune: str = "both"
    #: L2-normalise none (official CLIP), the target only (official BLIP), or both (cosine logits)
    normalize: str = "none"
    #: logits are (query · targetᵀ) / temperature; the official code uses 1.0
    temperature: float = 1.0
    #: learn log(1/τ) from ``temperature`` (scale clamped at 100, as CLIP)
    learnable_temperature: bool = False
    #: also the target → query direction, averaged (the official code has only query → target)
    symmetric: bool = False
    #: under DDP, score each query against the targets of every rank (all_gather with gradients), as the
    #: official DataParallel code's loss saw the whole batch; False: each rank's own batch only
    gather_negatives: bool = True
    #: official schedule: LinearLR from ``warmup_start_factor``·lr to lr over this many epochs
    #: (constant within an epoch); 0 disables it. ``optim.warmup_steps`` is a per-step warm-up on top.
    warmup_epochs: int = 5
    warmup_start_factor: float = 0.01
    #: seed of the token-dropping masks (drawn per batch from (mask_seed, epoch, batch index))
    mask_seed: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=5e-5))


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patch tokens kept in the masked view: ``int(L · (1 − r))``, as the official ``random_masking``."""
    return int(num_patches * (1 - mask_ratio))


def distinct_random_keep(
    batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None
) -> Tensor:
    """[batch, int(L·(1−r))] sorted patch indices, a uniformly random subset per row, no two rows equal.

    Each row is drawn as in the official code (argsort of uniform noise); a row that repeats an
    earlier row is drawn again until every row is distinct, so identical masks within a batch are
    impossible rather than merely unlikely (they are likely for small ``L``: 6 subsets when L = 4).
    """
    keep_n = num_kept(num_patches, mask_ratio)
    if math.comb(num_patches, keep_n) < batch:
        raise ValueError(
            f"cannot draw {batch} distinct subsets of {keep_n} out of {num_patches} patches "
            f"(only {math.comb(num_patches, keep_n)} exist); lower the batch or change mask_ratio"
        )
    keep = random_keep(batch, num_patches, mask_ratio, generator=generator)
    while True:
        _, inverse = torch.unique(keep, dim=0, return_inverse=True)
        first = torch.full((batch,), batch, dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(batch), reduce="amin"
        )
        repeated = first[inverse] != torch.arange(batch)  # a row equal to an earlier row
        if not repeated.any():
            return keep
        keep[repeated] = random_keep(int(repeated.sum()), num_patches, mask_ratio, generator=generator)


def pli_loss(
    query: Tensor,
    target: Tensor,
    scale: Tensor | float = 1.0,
    normalize: str = "none",
    symmetric: bool = False,
    gather_negatives: bool = False,
) -> Tensor:
    """Cross-entropy of ``scale · query · targetᵀ`` [B, B] with the diagonal as the labels.

    ``normalize``: ``none`` (official CLIP: raw features), ``target`` (official BLIP: only the target is
    normalised), ``both`` (cosine similarity). Computed in float32 (features may come from bf16 autocast).
    ``gather_negatives``: under DDP, the targets of every rank are candidates (see
    :func:`zscir.methods.losses.info_nce`); one process computes the same either way.
    """
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, got {normalize!r}")
    query, target = query.float(), target.float()
    if normalize == "both":
        query = F.normalize(query, dim=-1)
    if normalize in ("both", "target"):
        target = F.normalize(target, dim=-1)
    return info_nce(query, target, scale, symmetric=symmetric, gather_negatives=gather_negatives)


class PLI(RetrievalMethod):
    """Masked tuning of the image and/or text tower; inference = weighted sum of normalised features."""

    Config = PLIConfig
    frozen_towers: tuple[str, ...] = ()  # decided per instance by ``tune``
    composes_from_towers = True

    def __init__(self, backbone: dict, config: dict):
        super().__init__(backbone, config)
        c = self.cfg
        if c.tune not in TUNE_CHOICES:
            raise ValueError(f"tune must be one of {TUNE_CHOICES}, got {c.tune!r}")
        if c.normalize not in NORMALIZE_CHOICES:
            raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, got {c.normalize!r}")
        if not 0.0 < c.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {c.mask_ratio}")
        if num_kept(self.encoder.num_patches, c.mask_ratio) < 1:
            raise ValueError(f"mask_ratio {c.mask_ratio} keeps no patch of {self.encoder.num_patches}")
        if c.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {c.temperature}")
        self.frozen_towers = {"both": (), "image": ("text",), "text": ("image",)}[c.tune]
        for tower in self.frozen_towers:
            self.encoder.set_tower_trainable(tower, False)
        if c.learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / c.temperature)))

    @property
    def img_weight(self) -> float:
        """Inference weight of the image feature: ``img_weight``, else 1 − mask_ratio (official README)."""
        return 1 - self.cfg.mask_ratio if self.cfg.img_weight is None else self.cfg.img_weight

    # ---- inference ----------------------------------------------------------------------------
    def compose(self, batch: dict) -> Tensor:
        text = normalize(self.encoder.encode_text(self.encoder.tokenize(batch["texts"])))
        image = normalize(self.encoder.encode_image(batch["pixels"]))
        return normalize(text + self.img_weight * image)

    # ---- training -----------------------------------------------------------------------------
    def draw_keep(self, batch: int, batch_idx: int, epoch: int = 0, world: int = 1, rank: int = 0) -> Tensor:
        """This rank's masks for one batch: [batch, int(L·(1−r))] patch indices.

        Every rank draws the masks of the *global* batch (world × batch rows, all distinct) from the
        same seed (mask_seed, epoch, batch_idx) and takes its own slice, so no two samples of the global
        batch share a mask, the draw does not depend on the global RNG state, and a resumed run draws
        the same masks.
        """
        seed = (self.cfg.mask_seed * 1_000_003 + epoch) * 1_000_003 + batch_idx
        generator = torch.Generator().manual_seed(seed % (2**63))
        keep = distinct_random_keep(world * batch, self.encoder.num_patches, self.cfg.mask_ratio, generator)
        return keep[rank * batch : (rank + 1) * batch]

    def logit_scale_value(self) -> Tensor | float:
        if self.cfg.learnable_temperature:
            return self.logit_scale.exp().clamp(max=100)
        return 1.0 / self.cfg.temperature

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        pixels = batch["pixels"]
        trainer = self._trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        epoch = self.current_epoch if trainer is not None else 0
        keep = self.draw_keep(pixels.shape[0], batch_idx, epoch, world, rank).to(pixels.device)
        masked = self.encoder.encode_image(pixels, keep=keep)
        text = self.encoder.encode_text(self.encoder.tokenize(batch["caption"]).to(pixels.device))
        target = self.encoder.encode_image(pixels)
        scale = self.logit_scale_value()
        c = self.cfg
        loss = pli_loss(masked + text, target, scale, c.normalize, c.symmetric, c.gather_negatives)
        self.log("train/loss", loss, prog_bar=True)
        if self.cfg.learnable_temperature:
            self.log("train/logit_scale", scale)
        return loss

    def configure_optimizers(self) -> dict:
        config = super().configure_optimizers()  # AdamW + the per-step schedule of ``optim``
        c, o = self.cfg, self.cfg.optim
        if c.warmup_epochs <= 0:
            return config
        trainer = self.trainer
        if 0 < trainer.max_epochs <= c.warmup_epochs:
            log.warning(
                "PLI warm-up lasts %d epochs but training stops after %d: the learning rate never reaches %g",
                c.warmup_epochs,
                trainer.max_epochs,
                o.lr,
            )
        per_step = lr_lambda(o.scheduler, o.warmup_steps, max(1, int(trainer.estimated_stepping_batches)))

        def factor(step: int) -> float:
            # the epoch from the step count (not trainer.current_epoch, which lags one step at a boundary)
            batches = trainer.num_training_batches
            per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 0
            epoch = step // per_epoch if per_epoch > 0 else 0
            return per_step(step) * epoch_warmup(epoch, c.warmup_epochs, c.warmup_start_factor)

        optimizer = config["optimizer"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def epoch_warmup(epoch: int, warmup_epochs: int, start_factor: float) -> float:
    """``torch.optim.lr_scheduler.LinearLR(start_factor, total_iters=warmup_epochs)`` stepped per epoch,
    the official schedule (its later MultiStep decay at epochs 35/45 never triggers in 5–10 epochs)."""
    if warmup_epochs <= 0:
        return 1.0
    return start_factor + (1 - start_factor) * min(epoch, warmup_epochs) / warmup_epochs
