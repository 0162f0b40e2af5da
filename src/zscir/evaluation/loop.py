"""The one evaluation loop: every benchmark, every method, one process or many.

For each benchmark the loop encodes the gallery (each rank whole batches of it, then all-gathered; or
loaded from the gallery feature cache), turns query batches into features with the method's composition
(or the benchmark protocol's ``query_rule`` over the method's raw tower features), gathers and
de-duplicates them across ranks (:class:`~zscir.evaluation.metric.BenchmarkMetric`), and scores them.

A method reaches it through Lightning's validation/test hooks (``RetrievalMethod`` delegates to it);
:meth:`EvaluationLoop.run` drives the same steps without a Trainer (one process).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from zscir.benchmarks.base import Benchmark
from zscir.data.samplers import BatchShardSampler, batch_shard
from zscir.evaluation.datasets import GalleryDataset, QueryDataset, collate_queries
from zscir.evaluation.metric import BenchmarkMetric
from zscir.retrieval.cache import GalleryCache
from zscir.retrieval.search import normalize

log = logging.getLogger(__name__)

#: query features [B, D] from a batch {"pixels", "texts", "query_ids"}
Compose = Callable[[dict], Tensor]
#: unnormalised (image [B, D], text [B, D]) tower features of such a batch
EncodeTowers = Callable[[dict], tuple[Tensor, Tensor]]


class EvaluationLoop:
    """Evaluates a set of benchmarks; its state is one :class:`BenchmarkMetric` per benchmark.

    Args:
        benchmarks: what to evaluate, in order (the Lightning dataloader index is the position).
        image_transform: the encoder's preprocessing of one PIL image.
        image_size: side of the zero image given to text-only queries.
        batch_size: query and gallery batch size (DDP features are bitwise those of one process with it).
        num_workers: data loader workers.
        cache: gallery feature cache (None: always encode).
    """

    def __init__(
        self,
        benchmarks: list[Benchmark],
        image_transform: Callable,
        image_size: int,
        batch_size: int = 64,
        num_workers: int = 0,
        cache: GalleryCache | None = None,
    ):
        self.benchmarks = list(benchmarks)
        self.image_transform, self.image_size = image_transform, image_size
        self.batch_size, self.num_workers, self.cache = batch_size, num_workers, cache
        self.metrics = [BenchmarkMetric(b, sync_on_compute=True) for b in self.benchmarks]

    def query_loaders(self) -> list[DataLoader]:
        """One query loader per benchmark; ranks take whole single-process batches (:class:`BatchShardSampler`),
        so DDP features are bitwise those of one process; padding batches are dropped again by position in
        :class:`BenchmarkMetric`."""
        return [
            DataLoader(
                dataset,
                batch_size=self.batch_size,
                sampler=BatchShardSampler(len(dataset), self.batch_size),
                num_workers=self.num_workers,
                collate_fn=collate_queries,
                persistent_workers=self.num_workers > 0,
            )
            for dataset in (QueryDataset(b, self.image_transform, self.image_size) for b in self.benchmarks)
        ]

    @torch.no_grad()
    def encode_gallery_sharded(
        self, benchmark: Benchmark, encode: Callable[[Tensor], Tensor], module: L.LightningModule | None
    ) -> Tensor:
        """Encode the whole gallery [N, D], each rank whole batches of it (:func:`batch_shard`), then
        all-gather to every rank (through ``module``'s Trainer; without one: this process alone)."""
        trainer = module._trainer if module is not None else None
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        device = module.device if module is not None else torch.device("cpu")
        dataset = GalleryDataset(benchmark, self.image_transform)
        share = Subset(dataset, batch_shard(len(dataset), self.batch_size, rank, world, pad=False))
        loader = DataLoader(share, batch_size=self.batch_size, num_workers=self.num_workers, shuffle=False)
        context = (
            trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
        )
        index, feats = [], []
        with context:
            for batch in tqdm(
                loader,
                desc=f"gallery {benchmark.name} ({len(dataset)} images)",
                disable=rank != 0,
                leave=False,
            ):
                feats.append(encode(batch["pixels"].to(device)).float())
                index.append(batch["index"].to(device))
        index = torch.cat(index) if index else torch.empty(0, dtype=torch.long, device=device)
        if feats:
            feats = torch.cat(feats)
        else:
            feats = torch.empty(0, getattr(getattr(module, "encoder", None), "embed_dim", 0), device=device)
        if world > 1:  # shares differ in size by at most a batch: pad them for all_gather
            per_rank = max(
                len(batch_shard(len(dataset), self.batch_size, r, world, pad=False)) for r in range(world)
            )
            pad = per_rank - index.shape[0]
            index = torch.cat([index, index.new_full((pad,), -1)])
            feats = torch.cat([feats, feats.new_zeros(pad, feats.shape[1])])
            index, feats = (
                module.all_gather(index).reshape(-1),
                module.all_gather(feats).reshape(-1, feats.shape[1]),
            )
            keep = index >= 0
            index, feats = index[keep], feats[keep]
        out = torch.empty(len(dataset), feats.shape[1], device=feats.device)
        out[index] = feats
        return out

    def prepare_galleries(
        self,
        encode: Callable[[Tensor], Tensor],
        gallery_key: Callable[[Benchmark], str | None] = lambda _: None,
        module: L.LightningModule | None = None,
    ) -> None:
        """Reset every metric and give it its gallery: from the cache under ``gallery_key(benchmark)``
        (None: encode afresh), else encoded with ``encode`` (pixels [B, 3, H, W] -> [B, D]) and cached.

        Raises:
            NonFiniteFeatures: gallery features hold NaN/inf (nothing is cached then).
        """
        trainer = module._trainer if module is not None else None
        device = module.device if module is not None else torch.device("cpu")
        for benchmark, metric in zip(self.benchmarks, self.metrics):
            metric.to(device)
            metric.reset()
            key = gallery_key(benchmark) if self.cache is not None else None
            ids = [r.image_id for r in benchmark.gallery]
            feats = self.cache.load(key, ids) if key else None
            # encoding is collective: if any rank missed the cache (another run writing the entry right
            # now), every rank must encode, or the others would wait forever in all_gather
            distributed = trainer is not None and trainer.world_size > 1
            if distributed and not trainer.strategy.reduce_boolean_decision(feats is not None, all=True):
                feats = None
            if feats is None:
                feats = self.encode_gallery_sharded(benchmark, encode, module)
                metric.set_gallery(feats.to(device))  # refuses NaN/inf before they can be cached
                if key and (trainer is None or trainer.global_rank == 0):
                    self.cache.save(key, ids, feats)
            else:
                log.info("gallery features of %s loaded from the cache", benchmark.name)
                metric.set_gallery(feats.to(device))

    def query_step(
        self, batch: dict, dataloader_idx: int, compose: Compose, encode_towers: EncodeTowers | None = None
    ) -> None:
        """Query features of one batch of benchmark ``dataloader_idx`` into its metric: ``compose``, or the
        benchmark's ``query_rule`` over ``encode_towers``; caption variants (FashionIQ) are averaged as
        normalised features, then renormalised."""
        n_variants = len(batch["texts"])
        benchmark = self.benchmarks[dataloader_idx]
        query_ids = [f"{benchmark.name}:{benchmark.queries[i].query_id}" for i in batch["index"].tolist()]
        rule = benchmark.query_rule  # the protocol's composition, if it has one
        feats = 0
        for texts in batch["texts"]:
            variant = {"pixels": batch["pixels"], "texts": texts, "query_ids": query_ids}
            query = compose(variant) if rule is None else rule(*encode_towers(variant))
            feats = feats + normalize(query)
        self.metrics[dataloader_idx].update("query", batch["index"], normalize(feats / n_variants))

    def finish(self, log_metric: Callable[[str, float], None] | None = None) -> dict[str, dict]:
        """Score every benchmark: ``{benchmark name: {"metrics": {...}, "features": (query, gallery)}}``;
        each value also goes to ``log_metric("<benchmark>/<metric>", value)``. Metrics are reset.

        Raises:
            NonFiniteFeatures: query or gallery features hold NaN/inf (then nothing is returned).
        """
        results = {}
        for benchmark, metric in zip(self.benchmarks, self.metrics):
            values = metric.compute()
            results[benchmark.name] = {"metrics": values, "features": metric.features}
            if log_metric is not None:
                for name, value in values.items():
                    log_metric(f"{benchmark.name}/{name}", value)
            metric.reset()
        return results

    @torch.no_grad()
    def run(
        self,
        compose: Compose,
        encode_gallery: Callable[[Tensor], Tensor],
        encode_towers: EncodeTowers | None = None,
    ) -> dict[str, dict]:
        """The whole loop in this process, without a Trainer (what ``trainer.test`` does on one CPU)."""
        self.prepare_galleries(encode_gallery)
        for index, loader in enumerate(self.query_loaders()):
            for batch in loader:
                self.query_step(batch, index, compose, encode_towers)
        return self.finish()
