"""``lincir_step``: one LinCIR training step (load a batch of captions, mask their keywords, tokenise,
φ forward/backward through the frozen text tower, AdamW) with the keyword cache vs parsing every caption
with spaCy in the data loader, as the official loader does. Both load in the training process
(``num_workers=0``); the one-off cost of building the cache is reported beside the row, not in it."""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Iterator

import torch

from experiments.bench.common import interleaved, row
from zscir.data.synthetic import world
from zscir.data.text_corpora import MemorySource
from zscir.methods import build_method


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions of the synthetic shapes world (like the demo's text corpus), generated in memory."""
    rng = random.Random(seed)
    return [world.caption(world.sample_scene(rng), rng) for _ in range(n)]


def run(batch: int = 128, captions: int = 4096, reps: int = 5) -> dict:
    torch.manual_seed(0)
    texts = synthetic_captions(captions)
    with tempfile.TemporaryDirectory() as cache_dir:
        methods = {
            cache: build_method(
                {"kind": "open_clip", "model": "tiny"},
                {"name": "lincir", "keywords": {"cache": cache, "cache_dir": cache_dir}},
            ).train()
            for cache in (True, False)
        }
        start = time.perf_counter()
        datasets = {
            cache: m.text_samples.dataset([MemorySource(texts, "bench")]) for cache, m in methods.items()
        }
        build_s = time.perf_counter() - start  # the cached side parses the corpus here, once
        steps = {cache: _steps(methods[cache], datasets[cache], batch) for cache in methods}
        ours, base = interleaved(lambda: next(steps[True]), lambda: next(steps[False]), reps=reps)
    size = f"tiny CLIP text tower, batch {batch}, {captions} synthetic captions, loader in-process"
    return {
        "lincir_step": row(
            batch / ours, batch / base, "samples/s", True, size=size, cache_build_s=round(build_s, 2)
        )
    }


def _steps(method: torch.nn.Module, dataset: torch.utils.data.Dataset, batch: int) -> Iterator[None]:
    """An endless iterator whose ``next`` runs one full training step."""
    optimizer = torch.optim.AdamW(method.phi.parameters(), lr=1e-4)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    while True:
        for i in range(0, len(order) - batch + 1, batch):
            items = method.text_samples.collate([dataset[j] for j in order[i : i + batch]])
            loss = method.self_masking_loss(items["ids"], items["masked_ids"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            yield
