"""The shared base of every method: one retrieval contract and one evaluation loop.

A method implements :meth:`RetrievalMethod.compose` (query features from reference images and
caption texts) and, if it trains, :meth:`training_step`. Everything about evaluation — gallery
encoding (sharded over ranks, cached on disk when the image tower is unchanged), query encoding
through Lightning's validation/test loops, gathering and de-duplicating across ranks, scoring,
logging ``val/<benchmark>/<metric>`` — lives here, so no method re-implements it.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from omegaconf import MISSING, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from zscir.backbones import Encoder, backbone_fingerprint, build_encoder
from zscir.data.benchmarks.base import Benchmark
from zscir.data.eval_data import GalleryDataset, QueryDataset, collate_queries
from zscir.data.samplers import BatchShardSampler, batch_shard
from zscir.metrics.modules import BenchmarkMetric
from zscir.retrieval.cache import GalleryCache, cache_key
from zscir.retrieval.search import LIKELY_CAUSE, NonFiniteFeatures, normalize
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
    """Keys every method config has; subclasses add their hyper-parameters."""

    name: str = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)


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
        self.benchmarks: list[Benchmark] = []
        self.eval_batch_size, self.eval_workers = 64, 0
        self.gallery_cache: GalleryCache | None = None
        #: identifies weights loaded from a checkpoint (part of the gallery cache key)
        self.weights_tag = ""
        #: set once this process has trained the image tower: its gallery features are then never cached
        self.image_tower_trained = False
        self._metrics: list[BenchmarkMetric] = []
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
            "method": self.cfg.name,
            "backbone": self.backbone_cfg.get("name"),
            "backbone_fingerprint": backbone_fingerprint(self.backbone_cfg),
            "omitted": sorted(frozen),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get("zscir", {})
        if info.get("method", self.cfg.name) != self.cfg.name:
            raise ValueError(
                f"checkpoint was trained with method {info['method']!r}, not {self.cfg.name!r}: "
                f"pass method={info['method']} (or a checkpoint of {self.cfg.name})"
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

    # ---- evaluation plumbing ------------------------------------------------------------------
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
        self.benchmarks = list(benchmarks)
        self.eval_batch_size, self.eval_workers, self.gallery_cache = batch_size, num_workers, cache
        self._metrics = [BenchmarkMetric(b, sync_on_compute=True) for b in self.benchmarks]

    def _query_loaders(self) -> list[DataLoader]:
        # ranks take whole single-process batches (BatchShardSampler), so DDP features are bitwise those
        # of one process; padding batches are dropped again by position in BenchmarkMetric
        return [
            DataLoader(
                dataset,
                batch_size=self.eval_batch_size,
                sampler=BatchShardSampler(len(dataset), self.eval_batch_size),
                num_workers=self.eval_workers,
                collate_fn=collate_queries,
                persistent_workers=self.eval_workers > 0,
            )
            for dataset in (
                QueryDataset(b, self.encoder.image_transform, self.encoder.image_size)
                for b in self.benchmarks
            )
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._query_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._query_loaders()

    def _gallery_key(self, benchmark: Benchmark) -> str | None:
        """Cache key of a benchmark's gallery features, or None when they must be encoded afresh
        (no cache, or image-tower weights changed by training in this process)."""
        if self.gallery_cache is None or self.image_tower_trained:
            return None
        return cache_key(
            backbone=backbone_fingerprint(self.backbone_cfg),
            weights=self.weights_tag,
            encoder=type(self).encode_gallery.__qualname__,
            benchmark=benchmark.identity(),
            transform=self.encoder.transform_id,
        )

    @torch.no_grad()
    def _encode_gallery_sharded(self, benchmark: Benchmark) -> Tensor:
        """Encode the whole gallery, each rank whole batches of it (:func:`batch_shard`), then all-gather
        to every rank."""
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        dataset = GalleryDataset(benchmark, self.encoder.image_transform)
        share = Subset(dataset, batch_shard(len(dataset), self.eval_batch_size, rank, world, pad=False))
        loader = DataLoader(
            share, batch_size=self.eval_batch_size, num_workers=self.eval_workers, shuffle=False
        )
        context = (
            self.trainer.precision_plugin.forward_context()
            if self._trainer is not None
            else contextlib.nullcontext()
        )
        index, feats = [], []
        with context:
            for batch in tqdm(
                loader,
                desc=f"gallery {benchmark.name} ({len(dataset)} images)",
                disable=rank != 0,
                leave=False,
            ):
                feats.append(self.encode_gallery(batch["pixels"].to(self.device)).float())
                index.append(batch["index"].to(self.device))
        index = torch.cat(index) if index else torch.empty(0, dtype=torch.long, device=self.device)
        feats = torch.cat(feats) if feats else torch.empty(0, self.encoder.embed_dim, device=self.device)
        if world > 1:  # shares differ in size by at most a batch: pad them for all_gather
            per_rank = max(
                len(batch_shard(len(dataset), self.eval_batch_size, r, world, pad=False))
                for r in range(world)
            )
            pad = per_rank - index.shape[0]
            index = torch.cat([index, index.new_full((pad,), -1)])
            feats = torch.cat([feats, feats.new_zeros(pad, feats.shape[1])])
            index, feats = (
                self.all_gather(index).reshape(-1),
                self.all_gather(feats).reshape(-1, feats.shape[1]),
            )
            keep = index >= 0
            index, feats = index[keep], feats[keep]
        out = torch.empty(len(dataset), feats.shape[1], device=feats.device)
        out[index] = feats
        return out

    @explains_nonfinite
    def _prepare_galleries(self) -> None:
        for benchmark, metric in zip(self.benchmarks, self._metrics):
            metric.to(self.device)
            metric.reset()
            key = self._gallery_key(benchmark)
            ids = [r.image_id for r in benchmark.gallery]
            feats = self.gallery_cache.load(key, ids) if key else None
            # encoding is collective: if any rank missed the cache (another run writing the entry right
            # now), every rank must encode, or the others would wait forever in all_gather
            distributed = self._trainer is not None and self.trainer.world_size > 1
            if distributed and not self.trainer.strategy.reduce_boolean_decision(feats is not None, all=True):
                feats = None
            if feats is None:
                feats = self._encode_gallery_sharded(benchmark)
                metric.set_gallery(feats.to(self.device))  # refuses NaN/inf before they can be cached
                if key and self.global_rank == 0:
                    self.gallery_cache.save(key, ids, feats)
            else:
                log.info("gallery features of %s loaded from the cache", benchmark.name)
                metric.set_gallery(feats.to(self.device))

    def _query_step(self, batch: dict, dataloader_idx: int) -> None:
        n_variants = len(batch["texts"])
        benchmark = self.benchmarks[dataloader_idx]
        query_ids = [f"{benchmark.name}:{benchmark.queries[i].query_id}" for i in batch["index"].tolist()]
        rule = benchmark.query_rule  # the protocol's composition, if it has one
        feats = 0
        for texts in batch["texts"]:  # caption variants: average of normalised features (FashionIQ)
            variant = {"pixels": batch["pixels"], "texts": texts, "query_ids": query_ids}
            query = self.compose(variant) if rule is None else rule(*self.encode_towers(variant))
            feats = feats + normalize(query)
        self._metrics[dataloader_idx].update("query", batch["index"], normalize(feats / n_variants))

    @explains_nonfinite  # a refused compute leaves no metrics and no features: nothing can be written
    def _finish_eval(self, stage: str) -> None:
        if warning := self.missing_placeholders.report():
            log.warning("%s (%s, this process)", warning, stage)
        self.eval_results = {}
        for benchmark, metric in zip(self.benchmarks, self._metrics):
            values = metric.compute()
            self.eval_results[benchmark.name] = {"metrics": values, "features": metric.features}
            for name, value in values.items():
                self.log(f"{stage}/{benchmark.name}/{name}", value, sync_dist=True)
            metric.reset()

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
