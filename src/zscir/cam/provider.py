"""CAMs for a training batch of (image, noun) pairs: cache look-ups, then one Grad-CAM pass for the misses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from zscir.backbones.base import Encoder
from zscir.cam.cache import CamCache, pixel_stats
from zscir.cam.gradcam import CamSpec, grad_cams, prompt_features


class NounCams:
    """Patch-grid CAMs [B, grid_h, grid_w] of each image for its noun.

    Args:
        encoder: the (frozen) encoder whose image tower is explained.
        spec: prompt, baseline prompt, target block, precision.
        cache: optional on-disk cache; used only when image ids are given.
        batch_size: images per Grad-CAM backward pass (None: all misses in one pass; 1: one at a time).
    """

    def __init__(
        self,
        encoder: Encoder,
        spec: CamSpec | None = None,
        cache: CamCache | None = None,
        batch_size: int | None = None,
        max_memo: int = 100_000,
    ):
        self.encoder, self.spec, self.cache = encoder, spec or CamSpec(), cache
        self.batch_size, self.max_memo = batch_size, max_memo
        self._targets: dict[str, Tensor] = {}  # noun -> Grad-CAM target vector (the text tower is frozen)
        self.computed = 0  # maps computed by Grad-CAM (not read from the cache)

    def targets(self, nouns: Sequence[str]) -> Tensor:
        """[N, D] target vectors: the unit prompt embedding, minus the baseline prompt's if one is set,
        negated for the counterfactual map."""
        todo = list(dict.fromkeys(n for n in nouns if n not in self._targets))
        if todo:
            if len(self._targets) + len(todo) > self.max_memo:
                self._targets.clear()
            feats = prompt_features(self.encoder, todo, self.spec.prompt)
            if self.spec.baseline_prompt is not None:
                feats = feats - prompt_features(self.encoder, [self.spec.baseline_prompt])
            if self.spec.negate:
                feats = -feats
            self._targets.update(zip(todo, feats))
        return torch.stack([self._targets[n] for n in nouns])

    def __call__(
        self, pixels: Tensor, nouns: Sequence[str], image_ids: Sequence[str] | None = None
    ) -> Tensor:
        if len(nouns) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(nouns)} nouns")
        maps: list[Tensor | None] = [None] * len(nouns)
        stats = None
        if self.cache is not None and image_ids is not None:
            stats = pixel_stats(pixels)
            maps = [self.cache.get(i, n, s) for i, n, s in zip(image_ids, nouns, stats)]
        todo = [k for k, m in enumerate(maps) if m is None]
        if todo:
            fresh = grad_cams(
                self.encoder,
                pixels[todo],
                self.targets([nouns[k] for k in todo]),
                block=self.spec.block,
                autocast=self.spec.autocast,
                batch_size=self.batch_size,
            )
            self.computed += len(todo)
            for k, grid in zip(todo, fresh):
                maps[k] = grid
                if stats is not None:
                    self.cache.put(image_ids[k], nouns[k], grid, stats[k])
        if not maps:
            return torch.zeros(0, *self.encoder.grid_size)
        return torch.stack(maps)
