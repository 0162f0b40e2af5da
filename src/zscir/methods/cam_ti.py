"""CAM-masked textual inversion (Zhang et al., "Zero-shot Composed Image Retrieval Considering
Query-target Relationship Leveraging Masked Image-text Pairs", arXiv 2406.18836, ICIP 2024).

CLIP stays frozen; only φ (the SEARLE/LinCIR MLP, :class:`~zscir.methods.inversion.Phi`) trains, on
ordinary image–caption pairs turned into composed-retrieval-like queries:

1. one noun of the caption is chosen (spaCy POS, :class:`~zscir.text.nouns.NounSelector`) and replaced by
   the pseudo-word ``$``: "a big $ on the left";
2. the image is masked with the noun's Grad-CAM (target "a photo of a {noun}") thresholded at τ:
   ``mask_region=background`` hides what the CAM does not cover, ``object`` hides the noun's region;
3. ``$`` ← φ(feature of the masked image); the composed query is the masked caption with that token;
4. query-target loss: in-batch contrastive loss between composed queries and the *full* images'
   features; original loss: the textual-inversion loss between "a photo of $" with ``$`` ← φ(full
   image) and the full images (Pic2Word's loss);
   total = λ · query-target + original. A caption without a noun, whose ``$`` lies beyond the text
   context, or whose masked image shows nothing takes part in the original loss only; each reason is
   logged as a share of the batch (``noun_fraction``, ``truncated_fraction``, ``blank_fraction``) and
   their total as ``dropped_fraction``.

Inference is SEARLE/LinCIR's: "a photo of $ that {caption}" with ``$`` ← φ(reference image).
There is no official code; every choice the paper leaves open is an option of :class:`CamTIConfig`
(see the README's CAM-TI section).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from zscir.backbones import backbone_fingerprint
from zscir.cam import CamCache, CamSpec, NounCams, cache_namespace, masked_features
from zscir.cam.gradcam import upsample_cams
from zscir.cam.grid import GridRow, denormalize, save_cam_grid
from zscir.cam.masks import MODES, REGIONS, visible
from zscir.methods.base import MethodConfig, RetrievalMethod
from zscir.methods.inversion import DEFAULT_TEMPLATE, Phi, encode_with_template
from zscir.methods.losses import contrastive_loss
from zscir.text.nouns import SAMPLING, NounChoice, NounSelector
from zscir.text.placeholder import fit_prompts, isolate, remove_placeholders, require_placeholders

log = logging.getLogger(__name__)


@dataclass
class CamTIConfig(MethodConfig):
    # ---- loss: total = lam * query_target + original
    lam: float = 1.0
    #: softmax temperature of both contrastive losses (Pic2Word's is CLIP's logit scale 100, i.e. 0.01)
    temperature: float = 0.01
    #: query->image and image->query cross-entropy (Pic2Word); False: query->image only (PLI)
    symmetric: bool = True
    #: under DDP: images and queries of every rank are candidates (all_gather with gradients); W x B == 1 x W*B
    gather_negatives: bool = True
    # ---- image masking
    tau: float = 0.3
    #: background: hide CAM < tau (the noun's region stays); object: hide CAM >= tau
    mask_region: str = "background"
    #: pixels: hidden pixels = normalisation mean; tokens: hidden patch tokens dropped
    mask_mode: str = "pixels"
    # ---- noun choice
    noun_pos: list[str] = field(default_factory=lambda: ["NOUN"])
    exclude_nouns: list[str] = field(default_factory=list)
    #: fixed: one draw per image (cache-friendly); random: a new draw at every step
    noun_sampling: str = "fixed"
    mask_all_occurrences: bool = False
    spacy_model: str | None = None
    noun_seed: int = 0
    # ---- prompts
    #: the training query around the masked caption ({caption} already holds the "$")
    query_template: str = "{caption}"
    original_template: str = "a photo of $"
    #: inference prompt
    template: str = DEFAULT_TEMPLATE
    # ---- Grad-CAM
    cam_prompt: str = "a photo of a {noun}"
    cam_baseline_prompt: str | None = None
    cam_block: int = -1
    #: counterfactual Grad-CAM (explain the negated similarity); see CamSpec.negate
    cam_negate: bool = False
    cam_autocast: bool = False
    #: images per Grad-CAM backward pass: null = the whole batch at once, 1 = one image at a time
    cam_batch_size: int | None = None
    #: on-disk CAM cache folder (null: no cache)
    cam_cache_dir: str | None = None
    #: draw this many samples of the first training batch to cam_grid_path (0: none)
    cam_grid: int = 0
    #: where the grid goes; null = <run dir>/cam_grid.png
    cam_grid_path: str | None = None
    # ---- phi
    phi_hidden_mult: int = 4
    phi_dropout: float = 0.5
    #: L2-normalise image features before phi (SEARLE/LinCIR/Pic2Word feed them unnormalised)
    normalize_phi_input: bool = False


class CamTI(RetrievalMethod):
    """Frozen CLIP + trainable φ, trained with CAM-masked image–caption pairs."""

    Config = CamTIConfig

    def __init__(self, backbone: dict, config: dict):
        super().__init__(backbone, config)
        c = self.cfg
        if c.mask_region not in REGIONS:
            raise ValueError(f"mask_region must be one of {REGIONS}, got {c.mask_region!r}")
        if c.mask_mode not in MODES:
            raise ValueError(f"mask_mode must be one of {MODES}, got {c.mask_mode!r}")
        if c.noun_sampling not in SAMPLING:
            raise ValueError(f"noun_sampling must be one of {SAMPLING}, got {c.noun_sampling!r}")
        if not 0.0 <= c.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {c.tau}")
        if "{caption}" not in c.query_template:
            raise ValueError("query_template must contain {caption} (the masked caption)")
        if "$" not in c.original_template or "{caption}" not in c.template or "$" not in c.template:
            raise ValueError("original_template needs '$'; template needs '$' and '{caption}'")
        self.phi = Phi(
            self.encoder.embed_dim,
            self.encoder.token_dim,
            hidden_mult=c.phi_hidden_mult,
            dropout=c.phi_dropout,
        )
        self.nouns = NounSelector(
            pos=c.noun_pos,
            exclude=c.exclude_nouns,
            sampling=c.noun_sampling,
            all_occurrences=c.mask_all_occurrences,
            spacy_model=c.spacy_model,
            seed=c.noun_seed,
        )
        spec = CamSpec(
            prompt=c.cam_prompt,
            baseline_prompt=c.cam_baseline_prompt,
            block=c.cam_block,
            autocast=c.cam_autocast,
            negate=c.cam_negate,
        )
        self.cams = NounCams(self.encoder, spec, batch_size=c.cam_batch_size)
        self._cam_cache_parts = dict(
            backbone=backbone_fingerprint(self.backbone_cfg), transform=self.encoder.transform_id, spec=spec
        )
        self.use_cam_cache()
        self._warned_no_keys = False

    def use_cam_cache(self) -> None:
        """Point ``self.cams`` at the CAM cache of this config at the current numeric precision (none without
        ``cam_cache_dir``). With ``cam_autocast`` the maps follow the Trainer's precision (bf16 and fp32 maps
        differ); without it they are computed in fp32 and only the weights' dtype matters."""
        if not self.cfg.cam_cache_dir:
            return
        if self.cfg.cam_autocast:
            precision = self.feature_precision()
        else:
            precision = f"autocast None, weights {next(self.encoder.parameters()).dtype}"
        namespace = cache_namespace(**self._cam_cache_parts, precision=precision)
        if self.cams.cache is None or self.cams.cache.root.name != namespace:
            self.cams.cache = CamCache(self.cfg.cam_cache_dir, namespace)

    # ---- inference ------------------------------------------------------------------------------
    def invert(self, image_features: Tensor) -> Tensor:
        """φ(image features) -> pseudo-word token embeddings [B, token_dim]."""
        x = F.normalize(image_features, dim=-1) if self.cfg.normalize_phi_input else image_features
        return self.phi(x)

    def compose(self, batch: dict) -> Tensor:
        pseudo = self.invert(self.encoder.encode_image(batch["pixels"]))
        return encode_with_template(
            self.encoder,
            pseudo,
            batch["texts"],
            self.cfg.template,
            self.missing_placeholders,
            batch.get("query_ids"),
        )

    # ---- training -------------------------------------------------------------------------------
    def _image_ids(self, batch: dict) -> tuple[list[str], bool]:
        """Stable per-sample ids (the corpus key) and whether they are real ids (usable as cache keys)."""
        if "key" in batch:
            return [str(k) for k in batch["key"]], True
        if not self._warned_no_keys and self.cams.cache is not None:
            log.warning("training batches carry no 'key'; the CAM cache is not used")
            self._warned_no_keys = True
        return [str(int(i)) for i in batch["index"]], False

    def choose_nouns(self, batch: dict) -> list[NounChoice | None]:
        captions = [remove_placeholders(c) for c in batch["caption"]]
        ids, _ = self._image_ids(batch)
        return self.nouns.select(captions, ids)

    def losses(self, batch: dict) -> dict[str, Tensor]:
        """All loss terms and diagnostics for one image–caption batch (what ``training_step`` optimises)."""
        c = self.cfg
        self.use_cam_cache()  # a Trainer's precision is known only once it runs this method
        pixels = batch["pixels"]
        choices = self.choose_nouns(batch)
        ids, real_ids = self._image_ids(batch)
        with torch.no_grad():
            full = self.encoder.encode_image(pixels)
        labels = torch.arange(full.shape[0], device=full.device)

        ids_orig = self.encoder.tokenize([isolate(c.original_template)] * full.shape[0]).to(full.device)
        original = self.encoder.encode_text_with_pseudo(ids_orig, self.invert(full))
        out = {"original": self.contrastive(original, full, labels)}

        # every row that does not reach the query-target loss is counted, by reason, as a share of the batch
        zero, size = full.new_zeros((), dtype=torch.float32), full.shape[0]
        rows = [i for i, ch in enumerate(choices) if ch is not None]
        out["noun_fraction"] = zero + len(rows) / size  # before any row is dropped
        out["truncated_fraction"] = zero
        if rows:  # a "$" beyond the context length leaves nothing for the pseudo-word to fill
            texts, tokens = fit_prompts(
                self.encoder.tokenize, c.query_template, [choices[i].masked_caption for i in rows]
            )
            has_slot = require_placeholders(self.encoder.tokenize, texts, tokens, self.encoder.placeholder_id)
            out["truncated_fraction"] = zero + (~has_slot).sum().item() / size
            rows = [r for r, ok in zip(rows, has_slot.tolist()) if ok]
            tokens = tokens[has_slot].to(full.device)
        if rows:
            grid = self.cams(
                pixels[rows], [choices[i].noun for i in rows], [ids[i] for i in rows] if real_ids else None
            )
            with torch.no_grad():
                masked, kept = masked_features(
                    self.encoder, pixels[rows], grid, c.tau, c.mask_region, c.mask_mode
                )
            out["visible_fraction"] = kept.mean()
            # a flat CAM (no evidence for the noun) hides the whole image under mask_region=background: such
            # a query has nothing for phi to read, so it only takes part in the original loss
            seen = kept > 0
            out["blank_fraction"] = zero + (~seen).float().sum() / size
            rows = [r for r, ok in zip(rows, seen.tolist()) if ok]
            tokens, masked = tokens[seen], masked[seen]
        if rows:
            query = self.encoder.encode_text_with_pseudo(tokens, self.invert(masked))
            rows_t = torch.tensor(rows, device=full.device)
            out["query_target"] = self.contrastive(query, full, rows_t)
        elif (
            c.gather_negatives and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            # the gather is a collective: a rank without queries joins it (and its backward) with none
            empty = full.new_zeros(0, full.shape[1], requires_grad=True)
            out["query_target"] = self.contrastive(empty, full, labels[:0])
        else:
            out["query_target"] = zero
        out.setdefault("visible_fraction", zero)
        out.setdefault("blank_fraction", zero)
        out["dropped_fraction"] = zero + 1.0 - len(rows) / size  # no noun, truncated or blank
        out["loss"] = c.lam * out["query_target"] + out["original"]
        return out

    def contrastive(self, queries: Tensor, images: Tensor, labels: Tensor) -> Tensor:
        """Both loss terms' InfoNCE (:func:`~zscir.methods.losses.contrastive_loss`) with this config."""
        c = self.cfg
        return contrastive_loss(queries, images, labels, c.temperature, c.symmetric, c.gather_negatives)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms = self.losses(batch)
        size = batch["pixels"].shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=size)
        for name in (
            "query_target",
            "original",
            "noun_fraction",
            "visible_fraction",
            "blank_fraction",
            "truncated_fraction",
            "dropped_fraction",
        ):
            self.log(f"train/{name}", terms[name], batch_size=size)
        cache = self.cams.cache
        if cache is not None and cache.hits + cache.misses:
            self.log("train/cam_cache_hit_rate", cache.hits / (cache.hits + cache.misses), batch_size=size)
        return terms["loss"]

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self.cfg.cam_grid > 0 and batch_idx == 0 and self.current_epoch == 0 and self.global_rank == 0:
            path = Path(self.cfg.cam_grid_path or Path(self.trainer.default_root_dir) / "cam_grid.png")
            self.write_cam_grid(batch, path, self.cfg.cam_grid)

    def cam_grid_rows(self, batch: dict, n: int) -> list[GridRow]:
        """The first ``n`` samples of an image–caption batch, as CAM-TI sees them in training."""
        c = self.cfg
        n = min(n, batch["pixels"].shape[0])
        sub = {k: v[:n] for k, v in batch.items() if k in ("pixels", "caption", "key", "index")}
        self.use_cam_cache()
        choices = self.choose_nouns(sub)
        ids, real = self._image_ids(sub)
        rows = [i for i, ch in enumerate(choices) if ch is not None]
        pixels = sub["pixels"]
        maps = {}
        if rows:
            grid = self.cams(
                pixels[rows], [choices[i].noun for i in rows], [ids[i] for i in rows] if real else None
            )
            up = upsample_cams(grid, tuple(pixels.shape[-2:]))
            maps = {r: m for r, m in zip(rows, up)}
        out = []
        for i in range(n):
            caption, ch = remove_placeholders(sub["caption"][i]), choices[i]
            image = denormalize(pixels[i], self.encoder.image_transform)
            if ch is None:
                out.append(GridRow(image, None, None, caption, None, "no noun: original loss only"))
                continue
            if c.mask_mode == "tokens":  # whole patches, decided on the patch grid
                gh, gw = self.encoder.grid_size
                patch_keep = visible(grid[rows.index(i)], c.tau, c.mask_region)
                keep = patch_keep.repeat_interleave(pixels.shape[-2] // gh, 0).repeat_interleave(
                    pixels.shape[-1] // gw, 1
                )
            else:
                keep = visible(maps[i], c.tau, c.mask_region)
            masked = denormalize(
                pixels[i] * keep.to(pixels.device, pixels.dtype), self.encoder.image_transform
            )
            note = f"{ch.noun!r}: tau {c.tau}, {c.mask_region} hidden ({c.mask_mode}), {100 * keep.float().mean():.0f} % visible"
            out.append(GridRow(image, maps[i].cpu().numpy(), masked, caption, (ch.start, ch.end), note))
        return out

    def write_cam_grid(self, batch: dict, path: str | Path, n: int) -> Path:
        """A PNG of the first ``n`` samples of ``batch``: image, CAM heat map, masked image, caption."""
        c = self.cfg
        rows = self.cam_grid_rows(batch, n)
        title = f"CAM-TI: {'counterfactual ' if c.cam_negate else ''}Grad-CAM of '{c.cam_prompt}' (block {c.cam_block}), tau {c.tau}, {c.mask_region} hidden"
        save_cam_grid(rows, path, title)
        log.info("wrote the CAM grid of %d samples to %s", len(rows), path)
        return Path(path)
