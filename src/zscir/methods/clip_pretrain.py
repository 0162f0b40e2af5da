"""Contrastive image–text pre-training (CLIP): how the synthetic world gets its backbone.

Symmetric InfoNCE over the batch with a learnable logit scale (clamped at 100, as CLIP does). After
training the encoder's weights can be exported as a plain state dict (``export_backbone``) that a
backbone config loads with ``checkpoint=``.

Under DDP, ``gather_negatives`` (default on) scores each rank's pairs against the pairs of every rank
(:func:`zscir.methods.losses.clip_loss`), so ``W`` processes × batch ``B`` train
exactly like 1 process × batch ``W·B``. Turned off, each rank's loss uses only its local ``B - 1``
negatives (cheaper, but a different objective). Single-process runs are the same either way.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from zscir.methods.base import MethodConfig, OptimConfig, RetrievalMethod
from zscir.methods.losses import clip_loss
from zscir.retrieval.search import normalize
from zscir.utils.io import atomic_write

log = logging.getLogger(__name__)


@dataclass
class CLIPPretrainConfig(MethodConfig):
    init_temperature: float = 0.07
    #: under DDP, contrast against the negatives of every rank (all_gather with gradients)
    gather_negatives: bool = True
    #: where to write the trained encoder's state dict (None: nowhere)
    export_backbone: str | None = None
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=5e-4, weight_decay=0.1, betas=[0.9, 0.98], eps=1e-6, scheduler="cosine", warmup_steps=50
        )
    )


class CLIPPretrain(RetrievalMethod):
    """Train both towers with the CLIP loss; queries at evaluation are captions alone (caption→image)."""

    Config = CLIPPretrainConfig
    frozen_towers = ()

    def __init__(self, backbone: dict, config: dict):
        super().__init__(backbone, config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / self.cfg.init_temperature)))

    def compose(self, batch: dict) -> Tensor:
        return self.encoder.encode_text(self.encoder.tokenize(batch["texts"]))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        image = normalize(self.encoder.encode_image(batch["pixels"]))
        text = normalize(self.encoder.encode_text(self.encoder.tokenize(batch["caption"]).to(self.device)))
        scale = self.logit_scale.exp().clamp(max=100)
        loss = clip_loss(image, text, scale, gather_negatives=self.cfg.gather_negatives)
        # with gathered negatives, the mean over ranks of ``loss`` is the global-batch loss
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/logit_scale", scale)
        return loss

    def on_fit_end(self) -> None:
        if self.cfg.export_backbone and self.global_rank == 0:
            state = {k: v.detach().cpu() for k, v in self.encoder.model.state_dict().items()}
            atomic_write(self.cfg.export_backbone, lambda f: torch.save(state, f))
            log.info("exported the trained backbone to %s", self.cfg.export_backbone)
