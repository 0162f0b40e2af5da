"""The shared base of every method: the retrieval contract.

A method implements :meth:`RetrievalMethod.compose` (query features from reference images and
caption texts) and, if it trains, :meth:`training_step`; the base holds what every method shares:
the gallery encoder, tower freezing, the optimiser and schedule, and checkpoint hygiene. Evaluation —
gallery encoding (sharded over ranks, cached on disk when the image tower is unchanged), query encoding,
gathering and de-duplicating across ranks, scoring — is :class:`zscir.evaluation.EvaluationLoop`; the
Lightning validation/test hooks here only delegate to it and log ``val/<benchmark>/<metric>``.

A benchmark protocol may prescribe the query composition itself (GeneCIS under ``protocol="pli"``:
``normalize(0.5·f_img + 0.5·f_txt)`` of the unnormalised tower features, ``Benchmark.query_rule``). The
rule stays with the benchmark; the loop asks the method only for its raw tower features
(:meth:`RetrievalMethod.encode_towers`) and applies the rule in place of :meth:`~RetrievalMethod.compose`.
Only methods whose query is built from their own towers (``composes_from_towers``: PLI, the sum
baseline) accept such a benchmark; for the others (a textual-inversion network, CAM masking) the
rule would score something the method never computes, so they are refused at attach time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from omegaconf import MISSING, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from zscir.backbones import Encoder, backbone_fingerprint, build_encoder
from zscir.benchmarks.base import Benchmark
from zscir.data.loaders import TrainingSamples
from zscir.evaluation import EvaluationLoop
from zscir.retrieval.cache import GalleryCache, cache_key
from zscir.retrieval.search import LIKELY_CAUSE, NonFiniteFeatures
from zscir.text.placeholder import MissingPlaceholders

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (``constant``, ``linear`` or ``cosine`` decay after warm-up)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "constant"
    warmup_steps: int = 0
    fused: bool | None = None


@dataclass
class MethodConfig:
    """Keys every method config has; subclasses add their hyper-parameters. ``kind`` selects the method
    (a key of ``zscir.methods.METHODS``), as ``kind`` selects a backbone's or a benchmark's class."""

    kind: str = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)


def renamed_name_message(value: object) -> str:
    """What a user who still selects a method with ``name`` is told: the key is now ``kind``."""
    return (
        f"method.name was renamed to method.kind (the key that selects a backbone, benchmark or method "
        f"alike): write method.kind={value}, or {{'kind': {value!r}}} in Python, and drop name (on the "
        f"command line, method={value} selects that method with its own config file)"
    )


def check_method_keys(config: Mapping[str, Any]) -> None:
    """Refuse a method config that still selects its method with ``name`` (renamed to ``kind``); without
    this the old key would only be an unknown key, and a config without ``kind`` a missing value.

    Raises:
        ValueError: the config has ``name``; the message says to write ``kind``.
    """
    if "name" in config:
        raise ValueError(renamed_name_message(config["name"]))


def parse_config(schema: type, config: dict | Any) -> Any:
    """Validate ``config`` against a dataclass ``schema``: unknown keys and wrong types fail by name."""
    merged = OmegaConf.merge(
        OmegaConf.structured(schema),
        OmegaConf.create(dict(config)) if not OmegaConf.is_config(config) else config,
    )
    return OmegaConf.to_object(merged)


def nonfinite_cause(module: nn.Module, precision: str | None) -> str:
    """The likely cause of NaN/inf features from ``module``, for :class:`NonFiniteFeatures`: weights
    holding NaN/inf (a broken checkpoint or weights file), else a reduced ``precision`` (fp16/bf16
    overflow; ``None`` = unknown), else the method's own computation or its inputs."""
    bad = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    # buffers may hold -inf by design (attention masks): only NaN marks them broken
    bad += [name for name, b in module.named_buffers() if b.is_floating_point() and bool(b.isnan().any())]
    if bad:
        return (
            f"likely cause: the checkpoint (broken weights: {len(bad)} weight tensor(s) hold NaN/inf, e.g. "
            f"{bad[:3]}); load a checkpoint or backbone weights file with finite weights"
        )
    if precision is None:
        return LIKELY_CAUSE
    if "16" in precision:
        return (
            f"likely cause: precision (fp16/bf16 overflow under trainer.precision={precision}; the weights "
            "are finite); evaluate with trainer.precision=32-true"
        )
    return (
        f"not the usual causes (the weights are finite, trainer.precision={precision} is no fp16/bf16): "
        "the method's compose / encode_gallery or its inputs produced them"
    )


def explains_nonfinite(step: Callable) -> Callable:
    """Decorate an evaluation step of a :class:`RetrievalMethod`: a :class:`NonFiniteFeatures` raised
    inside gets the cause :func:`nonfinite_cause` finds in this method's weights and precision."""

    @functools.wraps(step)
    def wrapper(self: RetrievalMethod, *args: Any, **kwargs: Any) -> Any:
        try:
            return step(self, *args, **kwargs)
        except NonFiniteFeatures as err:
            precision = str(self.trainer.precision) if self._trainer is not None else None
            raise err.with_cause(nonfinite_cause(self, precision)) from err

    return wrapper


class RetrievalMethod(L.LightningModule):
    """Base LightningModule for zero-shot composed image retrieval methods.

    Args:
        backbone: the backbone config (``build_encoder`` kwargs).
        config: the method config, validated against :attr:`Config`.
    """

    Config: type = MethodConfig
    #: towers the method never trains; kept frozen and in eval mode, and left out of checkpoints
    frozen_towers: tuple[str, ...] = ("image", "text")
    #: whether the query is a composition of this method's own image and text tower features (PLI, the sum
    #: baseline): only then can a benchmark protocol's ``query_rule`` stand in for :meth:`compose`
    composes_from_towers: bool = False

    def __init__(self, backbone: dict, config: dict):
        super().__init__()
        self.save_hyperparameters()
        check_method_keys(config)
        self.cfg = parse_config(self.Config, config)
        self.backbone_cfg = dict(backbone)
        self.encoder: Encoder = build_encoder(**self.backbone_cfg)
        for tower in self.frozen_towers:
            self.encoder.set_tower_trainable(tower, False)
        towers = {id(p) for t in ("image", "text") for p in self.encoder.tower_parameters(t)}
        for (
            p
        ) in self.encoder.parameters():  # e.g. the library's own logit_scale: methods own their temperature
            if id(p) not in towers:
                p.requires_grad_(False)
        #: the evaluation loop over the attached benchmarks (none until :meth:`attach_benchmarks`)
        self.evaluation = EvaluationLoop([], self.encoder.image_transform, self.encoder.image_size)
        #: identifies weights loaded from a checkpoint (part of the gallery cache key)
        self.weights_tag = ""
        #: set once this process has trained the image tower: its gallery features are then never cached
        self.image_tower_trained = False
        #: {benchmark name: {"metrics": ..., "features": (query, gallery)}} after each evaluation
        self.eval_results: dict[str, dict] = {}
        #: composed prompts that lost their pseudo-word, reported once per evaluation
        self.missing_placeholders = MissingPlaceholders()

    # ---- the retrieval contract ---------------------------------------------------------------
    def compose(self, batch: dict) -> Tensor:
        """Query features [B, D] from ``batch["pixels"]`` (reference images) and ``batch["texts"]``
        (``batch["query_ids"]``, when present, names the rows for diagnostics)."""
        raise NotImplementedError

    def encode_gallery(self, pixels: Tensor) -> Tensor:
        """Gallery features [B, D]; the image tower by default."""
        return self.encoder.encode_image(pixels)

    def encode_towers(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Unnormalised (image [B, D], text [B, D]) tower features of ``batch["pixels"]`` and the raw
        captions ``batch["texts"]``: what a benchmark's ``query_rule`` composes (``composes_from_towers``)."""
        return self.encoder.encode_image(batch["pixels"]), self.encoder.encode_text(
            self.encoder.tokenize(batch["texts"])
        )

    def training_samples(self) -> TrainingSamples | None:
        """The method's own training samples for the ``data`` corpus (:class:`~zscir.data.loaders.TrainingSamples`),
        or None for the corpus's plain samples (image-caption pairs, captions)."""
        return None

    @property
    def trains(self) -> bool:
        """Whether the method has anything to train (zero-shot baselines do not)."""
        return any(p.requires_grad for p in self.parameters())

    # ---- training plumbing --------------------------------------------------------------------
    def train(self, mode: bool = True) -> RetrievalMethod:
        super().train(mode)
        for tower in self.frozen_towers:  # Lightning calls train() on everything; frozen towers stay in eval
            for module in self.encoder.tower_modules(tower):
                module.eval()
        return self

    def on_fit_start(self) -> None:
        self.train()  # Lightning keeps modules in the mode it finds them; trainable parts must train
        if any(p.requires_grad for p in self.encoder.tower_parameters("image")):
            self.image_tower_trained = True  # from now on, gallery features are never taken from a cache

    def configure_optimizers(self) -> dict:
        o = self.cfg.optim
        params = [p for p in self.parameters() if p.requires_grad]
        kwargs = {"fused": o.fused} if o.fused is not None else {}
        optimizer = torch.optim.AdamW(
            params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, **kwargs
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = lr_lambda(o.scheduler, o.warmup_steps, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave frozen backbone weights out: they are rebuilt from the backbone config on load."""
        frozen = {n for n, p in self.named_parameters() if not p.requires_grad and n.startswith("encoder.")}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["zscir"] = {
            "method": self.cfg.kind,
            "backbone": self.backbone_cfg.get("name"),
            "backbone_fingerprint": backbone_fingerprint(self.backbone_cfg),
            "omitted": sorted(frozen),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get("zscir", {})
        if info.get("method", self.cfg.kind) != self.cfg.kind:
            raise ValueError(
                f"checkpoint was trained with method {info['method']!r}, not {self.cfg.kind!r}: "
                f"pass method={info['method']} (or a checkpoint of {self.cfg.kind})"
            )
        ours = backbone_fingerprint(self.backbone_cfg)
        # checkpoints written before the fingerprint used nanoseconds hold the whole-second form
        known = (ours, backbone_fingerprint(self.backbone_cfg, whole_seconds=True))
        if info.get("backbone_fingerprint", ours) not in known:
            theirs = info.get("backbone") or "another backbone"
            raise ValueError(
                f"checkpoint was trained on backbone {theirs!r} (weights fingerprint "
                f"{info['backbone_fingerprint']}), but this run uses {self.backbone_cfg.get('name')!r} "
                f"(fingerprint {ours}); pass the backbone config it was trained with "
                f"(backbone={theirs} with the same weights file, init_seed and checkpoint)"
            )
        own = self.state_dict()
        for name in info.get("omitted", []):
            checkpoint["state_dict"].setdefault(name, own[name])

    # ---- evaluation: Lightning's hooks delegate to the one loop (zscir.evaluation) ---------------
    def attach_benchmarks(
        self,
        benchmarks: list[Benchmark],
        batch_size: int = 64,
        num_workers: int = 0,
        cache: GalleryCache | None = None,
    ) -> None:
        """Benchmarks evaluated by ``trainer.validate``/``test`` and after each training epoch.

        Raises:
            ValueError: a benchmark's protocol composes the queries itself (``query_rule``) and this
                method's query is not built from its towers (``composes_from_towers`` is False).
        """
        ruled = [b for b in benchmarks if b.query_rule is not None]
        if ruled and not self.composes_from_towers:
            raise ValueError(
                f"benchmark {ruled[0].name!r} (protocol {ruled[0].protocol!r}) builds every query itself from "
                f"the image and text towers' features, but {type(self).__name__} does not compose its query "
                "from its towers, so that protocol cannot score it; set benchmark.protocol=official"
            )
        self.evaluation = EvaluationLoop(
            benchmarks, self.encoder.image_transform, self.encoder.image_size, batch_size, num_workers, cache
        )

    @property
    def benchmarks(self) -> list[Benchmark]:
        """The attached benchmarks (:meth:`attach_benchmarks`)."""
        return self.evaluation.benchmarks

    def feature_precision(self, under_trainer: bool = True) -> str:
        """The numeric precision features are computed in, for the keys of feature caches (bf16 and fp32
        features differ): the autocast dtype (None: off) inside the attached Trainer's forward context when
        ``under_trainer`` and one is attached, else around the caller; and the dtype of the encoder's
        weights (cast by ``trainer.precision=bf16-true``). Equal strings mean equal arithmetic."""
        param = next(self.encoder.parameters(), None)
        device = param.device.type if param is not None else "cpu"
        context = contextlib.nullcontext()
        if under_trainer and self._trainer is not None:
            context = self._trainer.precision_plugin.forward_context()
        with context:
            autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return f"autocast {autocast}, weights {param.dtype if param is not None else None}"

    def gallery_key(self, benchmark: Benchmark) -> str | None:
        """Cache key of a benchmark's gallery features, or None when they must be encoded afresh
        (image-tower weights changed by training in this process)."""
        if self.image_tower_trained:
            return None
        return cache_key(
            backbone=backbone_fingerprint(self.backbone_cfg),
            weights=self.weights_tag,
            encoder=type(self).encode_gallery.__qualname__,
            benchmark=benchmark.identity(),
            transform=self.encoder.transform_id,
            precision=self.feature_precision(),
        )

    def val_dataloader(self) -> list[DataLoader]:
        return self.evaluation.query_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self.evaluation.query_loaders()

    @explains_nonfinite
    def _prepare_galleries(self) -> None:
        self.evaluation.prepare_galleries(self.encode_gallery, self.gallery_key, self)

    def _query_step(self, batch: dict, dataloader_idx: int) -> None:
        self.evaluation.query_step(batch, dataloader_idx, self.compose, self.encode_towers)

    @explains_nonfinite  # a refused compute leaves no metrics and no features: nothing can be written
    def _finish_eval(self, stage: str) -> None:
        if warning := self.missing_placeholders.report():
            log.warning("%s (%s, this process)", warning, stage)
        self.eval_results = {}  # stays empty when finish refuses non-finite features
        self.eval_results = self.evaluation.finish(
            lambda name, value: self.log(f"{stage}/{name}", value, sync_dist=True)
        )

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._prepare_galleries()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.trainer.sanity_checking:
            self._query_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._finish_eval("val")

    def on_test_epoch_start(self) -> None:
        self._prepare_galleries()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._query_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):  # noqa: ANN201
    """Multiplier of the base learning rate at each optimizer step."""
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"scheduler must be constant, linear or cosine, got {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
