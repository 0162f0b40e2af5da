"""SEARLE (Baldrati et al., "Zero-Shot Composed Image Retrieval with Textual Inversion", ICCV 2023):
``searle`` distils optimisation-based textual inversion into a network φ; ``searle_oti`` runs the
optimisation itself for every query at test time.

Both keep CLIP frozen and read two language inputs (:mod:`zscir.data.concepts`): a concept vocabulary,
ranked against each image (:func:`~zscir.methods.oti.associate`), and sentences about each concept
that regularise the pseudo-word towards behaving like a word.

``searle_oti``: the reference image's pseudo-token is found by OTI (:mod:`zscir.methods.oti`).

``searle``: φ (:class:`~zscir.methods.inversion.Phi`) maps an image feature to a token. It is trained on
an image corpus (captions unused) with

    λ_distil · NT-Xent(OTI tokens, φ(x); τ) + λ_gpt · (1 − cos(f(p with φ(x)), f(p)))

where the OTI tokens of the corpus images are the distillation targets, computed once and cached on
disk (:class:`~zscir.methods.oti.OTICache`), and ``p`` is a random phrase of one of the image's top-150
concepts with *every* occurrence of the concept replaced by `` $ ``. NT-Xent is symmetric over the 2B
normalised tokens (self-pairs excluded; under DDP every rank's tokens are negatives). Defaults are the
official code's (``src/train_phi.py``): λ 1 and 0.75, τ 0.25, AdamW 1e-4 / 0.01, φ dropout 0.5.

Inference (both): "a photo of $ that {caption}" with the token injected at the *first* ``$`` only, as
SEARLE's ``encode_with_pseudo_tokens`` does. SEARLE's numbers come with the ``targetpad`` preprocessing
(``backbone.transform=targetpad``). A released φ (``SEARLE_ViT-B32.pt``/``SEARLE_ViT-L14.pt``, key
``Phi``) loads by path with ``phi_checkpoint``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import Tensor

from zscir.backbones import Encoder, backbone_fingerprint
from zscir.data.concepts import Concepts
from zscir.methods.base import MethodConfig, RetrievalMethod
from zscir.methods.inversion import DEFAULT_TEMPLATE, Phi, encode_with_template
from zscir.methods.losses import nt_xent
from zscir.methods.oti import (
    SLOT,
    OTICache,
    OTIConfig,
    associate,
    cache_namespace,
    concept_embeddings,
    optimise_tokens,
    phrase_pool,
    usable_top,
)
from zscir.utils.io import file_stamp

log = logging.getLogger(__name__)


@dataclass
class SearleOTIConfig(MethodConfig):
    #: concept vocabulary: a CSV with a DisplayName column (Open Images' oidv7-class-descriptions.csv)
    vocabulary: str = MISSING
    #: pickled {concept: [phrase, ...]} (SEARLE's concept_to_phrases.pkl)
    phrases: str = MISSING
    oti: OTIConfig = field(default_factory=OTIConfig)
    #: inference prompt; ``$`` is the image's pseudo-token, ``{caption}`` the modification text
    template: str = DEFAULT_TEMPLATE
    #: which ``$`` receives the token: first (SEARLE) | all
    injection: str = "first"
    #: concept prompts encoded per forward pass when embedding the vocabulary
    concept_batch_size: int = 1024


@dataclass
class SearleConfig(SearleOTIConfig):
    lambda_distil: float = 1.0
    lambda_gpt: float = 0.75
    #: NT-Xent temperature
    temperature: float = 0.25
    #: the phrase loss draws a concept among the image's top_k_concepts
    top_k_concepts: int = 150
    phi_hidden_mult: int = 4
    phi_dropout: float = 0.5
    #: a released SEARLE φ (a file holding {"Phi": state dict}) loaded at construction (null: none)
    phi_checkpoint: str | None = None
    #: on-disk cache of the distillation targets (null: OTI recomputed at every step)
    oti_cache_dir: str | None = None


def phrase_loss(
    encoder: Encoder, originals: list[str], slotted: list[str], tokens: Tensor, occurrences: str = "first"
) -> Tensor:
    """Mean over rows of ``1 − cos(f(slotted with token), f(original))``: the phrase regularisation of
    φ's tokens [B, token_dim] (``src/train_phi.py`` lines 180-191, ``nn.CosineEmbeddingLoss`` with
    target 1); the original phrases are encoded without gradient."""
    with torch.no_grad():
        reference = encoder.encode_text(encoder.tokenize(originals).to(tokens.device))
    ids = encoder.tokenize(slotted).to(tokens.device)
    with_token = encoder.encode_text_with_pseudo(ids, tokens, occurrences=occurrences)
    return (1 - F.cosine_similarity(with_token.float(), reference.float(), dim=-1)).mean()


def load_phi_checkpoint(phi: Phi, path: str | Path) -> None:
    """Load a released SEARLE φ (``torch.save({"Phi": state_dict, ...})``, layers named ``layers.*``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no ``Phi`` entry, or its shapes do not fit this backbone's φ.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"φ checkpoint {file} does not exist; SEARLE's are released as SEARLE_ViT-B32.pt / SEARLE_ViT-L14.pt "
            "(github.com/miccunifi/SEARLE, release 'weights')"
        )
    saved = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "Phi" not in saved:
        keys = sorted(saved)[:5] if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{file}: expected a dict with a 'Phi' state dict (SEARLE's format), got {keys}")
    state = {k.replace("layers.", "net.", 1): v for k, v in saved["Phi"].items()}
    try:
        phi.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"{file} does not fit this backbone's φ (embed → token widths): {err}. SEARLE_ViT-B32.pt goes "
            "with backbone=clip_vit_b32, SEARLE_ViT-L14.pt with clip_vit_l14"
        ) from err


class SearleOTI(RetrievalMethod):
    """Frozen CLIP; each query's reference image is inverted by OTI at test time (nothing to train)."""

    Config = SearleOTIConfig

    def __init__(self, backbone: dict, config: dict):
        super().__init__(backbone, config)
        c = self.cfg
        if c.injection not in ("first", "all"):
            raise ValueError(f"injection must be 'first' or 'all', got {c.injection!r}")
        self.concepts = Concepts.load(c.vocabulary, c.phrases)
        self._concept_feats: Tensor | None = None
        self._memo: tuple[Tensor, Tensor] | None = None

    def concept_features(self) -> Tensor:
        """The vocabulary's template-ensembled features [V, D] (computed once, in float32)."""
        if self._concept_feats is None or self._concept_feats.device != self.device:
            with torch.autocast(self.device.type, enabled=False):
                self._concept_feats = concept_embeddings(
                    self.encoder, self.concepts.names, self.cfg.concept_batch_size
                )
        return self._concept_feats

    def invert_by_oti(self, image_feats: Tensor, keys: list[str]) -> Tensor:
        """OTI tokens [B, token_dim] of images with features ``image_feats`` [B, D]; ``keys`` seed them."""
        k = self.cfg.oti.top_k
        ranked = associate(image_feats, self.concept_features(), k).tolist()
        pools = [phrase_pool(self.concepts, usable_top(r, self.concepts, k)) for r in ranked]
        return optimise_tokens(self.encoder, image_feats, pools, keys, self.cfg.oti)

    def pseudo_tokens(self, batch: dict) -> Tensor:
        pixels = batch["pixels"]
        if self._memo is not None and self._memo[0] is pixels:  # caption variants of one batch (FashionIQ)
            return self._memo[1]
        keys = [str(q) for q in batch.get("query_ids") or range(pixels.shape[0])]
        tokens = self.invert_by_oti(self.encoder.encode_image(pixels), keys)
        self._memo = (pixels, tokens)
        return tokens

    def compose(self, batch: dict) -> Tensor:
        return encode_with_template(
            self.encoder,
            self.pseudo_tokens(batch),
            batch["texts"],
            self.cfg.template,
            self.missing_placeholders,
            batch.get("query_ids"),
            occurrences=self.cfg.injection,
        )

    def on_test_epoch_end(self) -> None:
        self._memo = None
        super().on_test_epoch_end()


class Searle(SearleOTI):
    """Frozen CLIP + φ distilled from cached OTI tokens of an image corpus."""

    Config = SearleConfig
    data_kind = "image_caption"

    def __init__(self, backbone: dict, config: dict):
        super().__init__(backbone, config)
        c, enc = self.cfg, self.encoder
        self.phi = Phi(enc.embed_dim, enc.token_dim, hidden_mult=c.phi_hidden_mult, dropout=c.phi_dropout)
        if c.phi_checkpoint:
            load_phi_checkpoint(self.phi, c.phi_checkpoint)
        #: what decides a token besides the image and the numeric precision (added at use: a Trainer's
        #: precision is known only once it runs this method)
        self._oti_cache_parts = dict(
            backbone=backbone_fingerprint(self.backbone_cfg),
            transform=enc.transform_id,
            oti=c.oti,
            concepts=[str(Path(p).expanduser().resolve()) for p in (c.vocabulary, c.phrases)],
            concept_files=[file_stamp(Path(p).expanduser()) for p in (c.vocabulary, c.phrases)],
        )
        self._oti_cache: OTICache | None = None
        self._warned_no_keys = False

    @property
    def oti_cache(self) -> OTICache | None:
        """The OTI-target cache of this config at the current numeric precision (None without
        ``oti_cache_dir``): bf16 and fp32 OTI give different tokens, so each has its own namespace."""
        if not self.cfg.oti_cache_dir:
            return None
        namespace = cache_namespace(**self._oti_cache_parts, precision=self.feature_precision())
        if self._oti_cache is None or self._oti_cache.root.name != namespace:
            self._oti_cache = OTICache(self.cfg.oti_cache_dir, namespace)
        return self._oti_cache

    # ---- inference ------------------------------------------------------------------------------
    def pseudo_tokens(self, batch: dict) -> Tensor:
        return self.phi(self.encoder.encode_image(batch["pixels"]).float())

    # ---- training -------------------------------------------------------------------------------
    def oti_targets(self, image_feats: Tensor, keys: list[str], stamps: list[str] | None) -> Tensor:
        """The OTI tokens [B, token_dim] of a batch's images: from the cache where it holds them, the
        others computed now (and stored). Without ``stamps`` nothing is cached."""
        cache = self.oti_cache if stamps is not None else None
        found = [cache.get(k, s) if cache else None for k, s in zip(keys, stamps or keys)]
        missing = [i for i, t in enumerate(found) if t is None]
        if missing:
            tokens = self.invert_by_oti(image_feats[missing], [keys[i] for i in missing])
            for i, token in zip(missing, tokens):
                found[i] = token
                if cache:
                    cache.put(keys[i], stamps[i], token)
        return torch.stack([t.to(image_feats.device) for t in found])

    def _keys(self, batch: dict) -> tuple[list[str], list[str] | None]:
        if "key" in batch:
            return [str(k) for k in batch["key"]], [
                str(s) for s in batch["stamp"]
            ] if "stamp" in batch else None
        if not self._warned_no_keys:
            log.warning("training batches carry no 'key': OTI targets are seeded by position and not cached")
            self._warned_no_keys = True
        return [str(int(i)) for i in batch["index"]], None

    def phrase_pairs(self, ranked: list[list[int]]) -> tuple[list[str], list[str]]:
        """Per image a random phrase of a random usable concept among its top ``top_k_concepts``, and the
        phrase with every occurrence of the concept replaced by `` $ `` (``src/train_phi.py``)."""
        originals, slotted = [], []
        for r in ranked:
            concept = random.choice(usable_top(r, self.concepts, self.cfg.top_k_concepts))
            phrase = random.choice(self.concepts.phrases[concept])
            originals.append(phrase)
            slotted.append(phrase.replace(concept, SLOT))
        return originals, slotted

    def losses(self, batch: dict) -> dict[str, Tensor]:
        """The distillation and phrase losses of one batch, and their weighted sum ``loss``."""
        c = self.cfg
        with torch.no_grad():
            feats = self.encoder.encode_image(batch["pixels"]).float()
        keys, stamps = self._keys(batch)
        ranked = associate(feats, self.concept_features(), c.top_k_concepts).tolist()
        targets = self.oti_targets(feats, keys, stamps)
        predicted = self.phi(feats)
        out = {"distil": nt_xent(targets, predicted, c.temperature)}
        originals, slotted = self.phrase_pairs(ranked)
        out["gpt"] = phrase_loss(self.encoder, originals, slotted, predicted, c.injection)
        out["loss"] = c.lambda_distil * out["distil"] + c.lambda_gpt * out["gpt"]
        return out

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if "pixels" not in batch:
            raise ValueError(
                "SEARLE trains on images (data.kind=image_caption, e.g. data=synthetic or data=imagenet_images); "
                f"this batch has keys {sorted(batch)}"
            )
        terms = self.losses(batch)
        size = batch["pixels"].shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=size)
        self.log("train/distil", terms["distil"], batch_size=size)
        self.log("train/gpt", terms["gpt"], batch_size=size)
        cache = self.oti_cache
        if cache is not None and cache.hits + cache.misses:
            self.log("train/oti_cache_hit_rate", cache.hits / (cache.hits + cache.misses), batch_size=size)
        return terms["loss"]
