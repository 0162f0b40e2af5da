"""Pic2Word (Saito et al., "Pic2Word: Mapping Pictures to Words for Zero-shot Composed Image Retrieval",
CVPR 2023; official code google-research/composed_image_retrieval).

CLIP stays frozen (eval mode, image features without gradients); only a small mapping network trains. It
turns an image feature into one token embedding, the pseudo-word, and is trained on unlabelled images
alone (captions are loaded but unused): "a photo of $" with ``$`` ← mapping(image feature) is encoded by
the frozen text tower, and its L2-normalised feature must find its own image among the batch's images and
vice versa (symmetric cross-entropy at CLIP's own, frozen logit scale; 100 for the OpenAI weights). Under
DDP the images and texts of every rank are the negatives, as in the official code.

The mapping (:class:`Img2Text`) is the official ``IM2TEXT``: 2 × [Linear(d → 512), Dropout(0.1), ReLU] then
Linear(512 → token width), 768 → 512 → 512 → 768 on ViT-L/14, with the official parameter names, so the
released checkpoint (``state_dict_img2text``, keys prefixed ``module.``) loads by path
(``method.checkpoint``, :func:`load_img2text_checkpoint`).

**``$`` and ``*``.** The official code writes the pseudo-word as ``*`` and puts the image token there by
splicing the token sequence; zscir writes ``$`` (token 259) and replaces the placeholder's embedding
(:meth:`~zscir.backbones.base.Encoder.encode_text_with_pseudo`). The two give the same text feature:
the placeholder's own embedding never reaches the transformer (it is overwritten), both symbols are
single BPE tokens that leave their space-separated neighbours' tokens unchanged, and the position, the
sequence length and the end-of-text pooling are identical. At training the official code inserts the token
before the end-of-text of "a photo of" (``encode_text_img``), which is the sequence of "a photo of *" with
``*`` replaced. tests/parity/test_pic2word_official.py checks both against transcriptions of the official splices
on the same weights. (One difference: a caption that itself contains ``$`` would have that ``$`` replaced
too, where the official code replaces only the ``*`` of its template.)

**Inference prompts.** ``prompt=pic2word`` (default): "a photo of $ , {caption}", the official template of
CIRR and FashionIQ; FashionIQ's official query text is one caption order, "{cap2} and {cap1}" without
stripping, which is the FashionIQ benchmark's ``protocol=pic2word`` (benchmark rules stay with the
benchmark; its metric keys read ``pic2word/...``). ``prompt=shared``: "a photo of $ that {caption}", the
prompt of SEARLE, LinCIR and CAM-TI, for side-by-side tables under the official protocols.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zscir.methods.base import MethodConfig, OptimConfig, RetrievalMethod, lr_lambda
from zscir.methods.inversion import DEFAULT_TEMPLATE, encode_with_template
from zscir.methods.losses import info_nce
from zscir.text.placeholder import isolate

log = logging.getLogger(__name__)

#: inference templates by ``prompt``: Pic2Word's own (official src/data.py:111, :129, :228) and the
#: shared protocol's
PROMPTS = {"pic2word": "a photo of $ , {caption}", "shared": DEFAULT_TEMPLATE}
#: the training text (official src/trainer.py:95 tokenises "a photo of" and inserts the token before EOT)
TRAIN_PROMPT = "a photo of $"


@dataclass
class Pic2WordConfig(MethodConfig):
    #: hidden width and number of [Linear, Dropout, ReLU] blocks of the mapping (official --middle-dim, --n-layer)
    middle_dim: int = 512
    n_layer: int = 2
    #: the mapping's dropout (official IM2TEXT default; its --droprate argument is never passed)
    dropout: float = 0.1
    #: inference template: pic2word ("a photo of $ , {caption}") or shared ("a photo of $ that {caption}")
    prompt: str = "pic2word"
    #: the loss's logit scale; None: exp of the backbone's own (frozen) logit_scale, as coded
    logit_scale: float | None = None
    #: under DDP, every rank's images and texts are negatives (the official default; --skip-aggregate off)
    gather_negatives: bool = True
    #: a released Pic2Word checkpoint (``state_dict_img2text``) to start from / evaluate; None: random init
    checkpoint: str | None = None
    #: AdamW as the official README's command (lr 1e-4, wd 0.1, betas/eps of src/params.py for ViTs), cosine
    #: decay after 10k warm-up steps, stepped per iteration; no weight decay on biases
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=1e-4, weight_decay=0.1, betas=[0.9, 0.98], eps=1e-6, scheduler="cosine", warmup_steps=10_000
        )
    )


class Img2Text(nn.Module):
    """The official ``IM2TEXT`` (model/model.py:27-45): ``n_layer`` × [Linear, Dropout, ReLU] to
    ``middle_dim``, then ``fc_out`` Linear(middle_dim → token_dim). Parameter names are the official ones
    (``layers.{i}.0``, ``fc_out``), so released weights load as they are.

    Args:
        embed_dim: input width (the joint embedding, 768 on ViT-L/14).
        token_dim: output width (the text tower's token embeddings, 768 on ViT-L/14).
    """

    def __init__(
        self, embed_dim: int, token_dim: int, middle_dim: int = 512, n_layer: int = 2, dropout: float = 0.1
    ):
        super().__init__()
        widths = [embed_dim] + [middle_dim] * n_layer
        self.layers = nn.Sequential(
            *(
                nn.Sequential(nn.Linear(a, b), nn.Dropout(dropout), nn.ReLU())
                for a, b in itertools.pairwise(widths)
            )
        )
        self.fc_out = nn.Linear(widths[-1], token_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Image features [B, embed_dim] (unnormalised, as the official code feeds them) -> tokens [B, token_dim]."""
        return self.fc_out(self.layers(x))


def load_img2text_checkpoint(module: Img2Text, path: str | Path) -> None:
    """Load a released Pic2Word checkpoint: a ``torch.save`` dict whose ``state_dict_img2text`` holds the
    mapping's weights, keys prefixed ``module.`` when saved from DDP (official src/main.py:225-233).

    Raises:
        FileNotFoundError: no such file.
        KeyError: the file has no ``state_dict_img2text``.
        ValueError: its weights do not fit ``module`` (another backbone width, ``middle_dim`` or ``n_layer``).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"Pic2Word checkpoint {str(file)!r} does not exist (the released file is linked from the official "
            "README, google-research/composed_image_retrieval)"
        )
    # the file also holds CLIP's state dict and the optimiser state: plain tensors and dicts
    saved = torch.load(file, map_location="cpu", weights_only=True)
    if "state_dict_img2text" not in saved:
        raise KeyError(
            f"{file} has no 'state_dict_img2text' (keys: {sorted(saved)[:8]}); is it a Pic2Word checkpoint?"
        )
    state = {k.removeprefix("module."): v for k, v in saved["state_dict_img2text"].items()}
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"{file}: the mapping's weights do not fit this backbone / method.middle_dim / method.n_layer: {err}"
        ) from err


def pic2word_loss(
    image: Tensor, text: Tensor, scale: Tensor | float, gather_negatives: bool = True
) -> Tensor:
    """Symmetric cross-entropy of ``scale · n(image) · n(text)ᵀ``, ``n`` = L2 normalisation, in float32
    (official ``get_loss_img2text``, src/trainer.py:102-156).

    Args:
        image: [B, D] image features (frozen tower).
        text: [B, D] features of "a photo of $" with each row's pseudo-word.
        gather_negatives: under DDP, every rank's rows are negatives; the returned per-rank values average
            to the global-batch loss (:func:`zscir.methods.losses.info_nce`). The official code computes
            the same loss value, but its all-gathered copies carry no gradient, so after DDP's averaging its
            gradient is the global one divided by the number of ranks (tests/test_pic2word.py); Adam is
            invariant to that constant up to its epsilon.
    """
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    return info_nce(image, text, scale, symmetric=True, gather_negatives=gather_negatives)


def backbone_logit_scale(encoder: nn.Module) -> float:
    """exp of the backbone's learned ``logit_scale`` (open_clip and transformers CLIP keep it on the model).

    Raises:
        ValueError: the backbone has none (set ``method.logit_scale``).
    """
    param = getattr(getattr(encoder, "model", None), "logit_scale", None)
    if not isinstance(param, Tensor) or param.numel() != 1:
        raise ValueError(
            f"backbone {type(encoder).__name__} has no logit_scale to use: set method.logit_scale (CLIP's is 100)"
        )
    return float(param.detach().float().exp())


class Pic2Word(RetrievalMethod):
    """Frozen CLIP + the trainable mapping image feature -> pseudo-word token."""

    Config = Pic2WordConfig
    frozen_towers = ("image", "text")
    data_kind = "image_caption"

    def __init__(self, backbone: dict, config: dict):
        super().__init__(backbone, config)
        c = self.cfg
        if c.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {sorted(PROMPTS)}, got {c.prompt!r}")
        self.img2text = Img2Text(
            self.encoder.embed_dim, self.encoder.token_dim, c.middle_dim, c.n_layer, c.dropout
        )
        if c.checkpoint:
            load_img2text_checkpoint(self.img2text, c.checkpoint)
            log.info("loaded the Pic2Word mapping from %s", c.checkpoint)
        self.logit_scale = c.logit_scale if c.logit_scale is not None else backbone_logit_scale(self.encoder)

    @property
    def template(self) -> str:
        return PROMPTS[self.cfg.prompt]

    def attach_benchmarks(self, benchmarks: list, *args: object, **kwargs: object) -> None:
        for b in benchmarks:
            if self.cfg.prompt == "pic2word" and b.kind == "fashioniq" and b.protocol != "pic2word":
                log.info(
                    "%s: Pic2Word's own FashionIQ query text is one caption order ('{cap2} and {cap1}'), "
                    "the benchmark's protocol=pic2word; under protocol=%s both orders are averaged",
                    b.name,
                    b.protocol,
                )
        super().attach_benchmarks(benchmarks, *args, **kwargs)

    # ---- training -------------------------------------------------------------------------------
    def loss(self, pixels: Tensor) -> Tensor:
        """The Pic2Word loss of a batch of images [B, 3, H, W]."""
        with torch.no_grad():
            image = self.encoder.encode_image(pixels)
        ids = self.encoder.tokenize([isolate(TRAIN_PROMPT)] * image.shape[0]).to(image.device)
        text = self.encoder.encode_text_with_pseudo(ids, self.img2text(image))
        return pic2word_loss(image, text, self.logit_scale, self.cfg.gather_negatives)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.loss(batch["pixels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["pixels"].shape[0])
        return loss

    def configure_optimizers(self) -> dict:
        """AdamW with no weight decay on 1-d parameters (the mapping's biases: the official rule excludes
        names with bn/ln/bias/logit_scale, src/main.py:127-145), and the per-step schedule of ``optim``
        (cosine after linear warm-up = the official ``cosine_lr``, third_party/open_clip/scheduler.py)."""
        o = self.cfg.optim
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        ]
        kwargs = {"fused": o.fused} if o.fused is not None else {}
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kwargs)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o.scheduler, o.warmup_steps, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- retrieval ------------------------------------------------------------------------------
    def pseudo_tokens(self, pixels: Tensor) -> Tensor:
        """The pseudo-word of each reference image [B, token_dim]."""
        return self.img2text(self.encoder.encode_image(pixels))

    def compose(self, batch: dict) -> Tensor:
        return encode_with_template(
            self.encoder,
            self.pseudo_tokens(batch["pixels"]),
            batch["texts"],
            self.template,
            self.missing_placeholders,
            batch.get("query_ids"),
        )
