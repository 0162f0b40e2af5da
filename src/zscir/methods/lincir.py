"""LinCIR (Gu et al., CVPR 2024): language-only training of a projection φ by self-masking.

Training, from captions alone: ``z`` = text feature of a caption; the caption's keywords are replaced by
``$`` (:mod:`zscir.text.keywords`); φ maps ``z + s·u·ε`` (``u ~ U(0, 1)`` per sample, ``ε ~ N(0, I)``) to
a token embedding that fills every ``$``; the loss is the MSE between the re-encoded masked caption and
``z``. Only φ trains. At test time φ maps the reference *image* feature into "a photo of $ that
{caption}". Defaults follow the official code (https://github.com/navervision/lincir; ``docs/methods.md``, LinCIR): unnormalised
features and loss, noise scale 1, φ dropout 0.5, AdamW 1e-4 / 0.01, constant schedule; EMA of φ optional.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zscir.data.self_masking import KeywordOptions, SelfMasking
from zscir.methods.base import MethodConfig, RetrievalMethod
from zscir.methods.inversion import DEFAULT_TEMPLATE, Phi, encode_with_template
from zscir.text.keywords import FALLBACK_PROMPT, clip_bpe

log = logging.getLogger(__name__)


@dataclass
class LinCIRConfig(MethodConfig):
    #: φ's dropout (after each hidden GELU) and hidden width = phi_hidden_mult × embed dim
    phi_dropout: float = 0.5
    phi_hidden_mult: int = 4
    #: s in z + s·u·ε
    noise_scale: float = 1.0
    #: L2-normalise φ's input (the noisy text feature in training, the image feature at inference):
    #: the official --l2_normalize, off by default
    normalize_input: bool = False
    #: MSE between L2-normalised features instead of the raw ones (the official code: raw)
    normalize_loss: bool = False
    #: inference prompt; ``$`` is φ(image feature), ``{caption}`` the modification text
    template: str = DEFAULT_TEMPLATE
    #: training text for a masked caption that lost every ``$`` to truncation
    fallback_prompt: str = FALLBACK_PROMPT
    #: evaluate with an exponential moving average of φ (decay min(ema_decay, (1+t)/(10+t)), as coded)
    ema: bool = False
    ema_decay: float = 0.9999
    keywords: KeywordOptions = field(default_factory=KeywordOptions)


def add_noise(z: Tensor, scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """``z + scale · u · ε``: one ``u ~ U(0, 1)`` per row, ``ε ~ N(0, I)`` per element.

    Drawn in the official order (``u`` then ``ε``), so with the same seed the noise is the official one.
    """
    u = torch.rand(z.shape[0], 1, device=z.device, dtype=z.dtype, generator=generator)
    eps = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
    return z + scale * u * eps


class LinCIR(RetrievalMethod):
    """Self-masking projection: trains φ on text, composes queries with φ(image)."""

    Config = LinCIRConfig
    frozen_towers = ("image", "text")

    def __init__(self, backbone: dict, config: dict):
        super().__init__(backbone, config)
        c, enc = self.cfg, self.encoder
        self.phi = Phi(enc.embed_dim, enc.token_dim, hidden_mult=c.phi_hidden_mult, dropout=c.phi_dropout)
        self.phi_ema: nn.Module | None = None
        if c.ema:
            self.phi_ema = copy.deepcopy(self.phi).requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        tokenizer = clip_bpe(enc.context_length)
        probe = ["a photo of $ that is red", "$"]
        if not torch.equal(tokenizer(probe), enc.tokenize(probe).cpu()):
            raise ValueError(
                f"LinCIR tokenises training captions with the CLIP BPE; backbone {self.backbone_cfg.get('name')!r} "
                "tokenises differently"
            )
        #: the training samples this method makes from a text corpus (:meth:`training_samples`)
        self.text_samples = SelfMasking(
            c.keywords, enc.context_length, enc.placeholder_id, c.fallback_prompt, tokenizer
        )

    def training_samples(self) -> SelfMasking:
        """Self-masked captions (LinCIR's own pipeline) from a ``data.kind=text`` corpus."""
        return self.text_samples

    # ---- training -------------------------------------------------------------------------------
    def self_masking_loss(self, ids: Tensor, masked_ids: Tensor) -> Tensor:
        """MSE between the masked captions re-encoded with φ(noisy z) in every ``$`` and z itself."""
        with torch.no_grad():
            z = self.encoder.encode_text(ids).float()
        z_in = add_noise(z, self.cfg.noise_scale)
        if self.cfg.normalize_input:
            z_in = F.normalize(z_in, dim=-1)
        z_hat = self.encoder.encode_text_with_pseudo(masked_ids, self.phi(z_in)).float()
        if self.cfg.normalize_loss:
            z_hat, z = F.normalize(z_hat, dim=-1), F.normalize(z, dim=-1)
        return F.mse_loss(z_hat, z)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if "masked_ids" not in batch:
            raise ValueError(
                "LinCIR trains on text corpora (data.kind=text, e.g. data=synthetic_text); this batch has "
                f"keys {sorted(batch)}"
            )
        loss = self.self_masking_loss(batch["ids"].to(self.device), batch["masked_ids"].to(self.device))
        size = len(batch["ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        # the official "preproc_rate": share of captions that kept at least one masked keyword
        self.log("train/masked_rate", 1.0 - batch["fell_back"].float().mean(), batch_size=size)
        return loss

    def configure_optimizers(self) -> dict:
        if self.trainer.estimated_stepping_batches == float("inf"):
            raise ValueError(
                "a streaming corpus has no length: set trainer.max_steps (LinCIR trains by steps)"
            )
        return super().configure_optimizers()

    def on_train_batch_end(self, outputs: object, batch: dict, batch_idx: int) -> None:
        """After each optimizer step, move the EMA of φ towards φ (the official ``EMAModel.step``:
        decay min(ema_decay, (1 + t) / (10 + t)) at optimizer step t)."""
        step = self.trainer.global_step
        if self.phi_ema is None or step <= int(self.ema_updates):  # no step yet (gradient accumulation)
            return
        self.ema_updates.fill_(step)
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, p in zip(self.phi_ema.parameters(), self.phi.parameters()):
                ema.lerp_(p.detach(), 1.0 - decay)

    # ---- retrieval ------------------------------------------------------------------------------
    @property
    def phi_for_eval(self) -> nn.Module:
        return self.phi_ema if self.phi_ema is not None else self.phi

    def pseudo_tokens(self, pixels: Tensor) -> Tensor:
        """φ(image feature) [B, token_dim]: the pseudo-word of each reference image."""
        feats = self.encoder.encode_image(pixels)
        if self.cfg.normalize_input:
            feats = F.normalize(feats.float(), dim=-1)
        return self.phi_for_eval(feats)

    def compose(self, batch: dict) -> Tensor:
        pseudo = self.pseudo_tokens(batch["pixels"])
        return encode_with_template(
            self.encoder,
            pseudo,
            batch["texts"],
            self.cfg.template,
            self.missing_placeholders,
            batch.get("query_ids"),
        )
