"""A training DataLoader whose order is a pure function of (seed, epoch, rank) and that resumes mid-epoch.

Why not the stock ``RandomSampler``/``DistributedSampler``: a ``RandomSampler`` with a generator draws
each epoch's permutation from the generator's running state, so a resumed run (fresh generator) repeats
epoch 0's order; and neither knows how many batches of the interrupted epoch were already trained on.

:class:`ResumableDataLoader` fixes both:

* epoch ``e`` visits ``randperm(n, seed + e)``, truncated to a multiple of the world size and split
  by stride over ranks (rank ``r`` takes positions ``r, r + W, ...``). With ``W`` processes × batch ``B``,
  global batch ``j`` is exactly the set that 1 process × batch ``W·B`` sees as its batch ``j``;
* :meth:`ResumableDataLoader.position` (saved with each checkpoint by ``zscir.cli.callbacks.ResumeState``)
  records the epoch and how many of its batches were handed out; after :meth:`ResumableDataLoader.resume`
  the next iteration skips exactly those batches (they are never loaded from disk) and continues with
  the next one. (Lightning's own stateful-loader hook is not enough: Lightning 2.6 never applies it
  when ``configure_optimizers`` asks for ``estimated_stepping_batches``, as ours does.)
* iteration starts lazily, at the first ``next()``: by then Lightning has called ``set_epoch``, so even
  with worker processes (which prefetch indices when the iterator is created) the epoch is right.

Length buckets (``lengths`` + ``bucket_batches``, for text corpora): each window of ``bucket_batches``
global batches of the epoch's permutation is sorted by sample length and cut into batches, which are
visited in a random order drawn from (seed, epoch); a trailing partial batch stays last. A text tower
that runs over the batch's longest caption then runs over similar lengths, instead of one long caption
setting the width of a batch of short ones. Every sample is still visited once per epoch and each
sample's loss is unchanged; only which samples share a batch changes. The buckets are formed from global
batches before the split over ranks, so the equivalence above still holds.

Worker processes are seeded per epoch from (seed, epoch); random augmentations inside workers are
therefore reproducible per epoch, but after a mid-epoch resume they restart that epoch's worker streams.
zscir's training transforms are deterministic, so this does not affect its runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableSampler(DistributedSampler):
    """Per-epoch permutation of ``range(n)``, strided over ranks, with an optional one-shot skip.

    It subclasses ``DistributedSampler`` only so that Lightning keeps it instead of substituting its own;
    rank and world size are read from the process group when iteration starts (the loader is built before
    Lightning creates the group).
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        bucket_batches: int = 0,
    ):
        self.size, self.shuffle, self.seed = int(size), bool(shuffle), int(seed)
        if lengths is not None and len(lengths) != self.size:
            raise ValueError(f"{len(lengths)} lengths for {self.size} samples")
        self.lengths = None if lengths is None or bucket_batches <= 0 else torch.as_tensor(lengths)
        self.batch_size, self.bucket_batches = int(batch_size), int(bucket_batches)
        self.epoch = 0
        #: (epoch, n): skip the first n samples of this rank's share when ``epoch`` is next iterated
        self.resume_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample indices for ``epoch``, in visiting order (nothing skipped)."""
        rank, world = _world()
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.size)
        usable = self.size - self.size % world  # every rank gets the same count; no sample twice
        order = order[:usable]
        if self.lengths is not None:
            order = bucket_by_length(
                order, self.lengths, self.batch_size * world, self.bucket_batches, self.seed + epoch
            )
        return order[rank::world].tolist()

    def skipped(self) -> int:
        """How many samples the next iteration skips (non-zero only when resuming that epoch)."""
        return self.resume_at[1] if self.resume_at and self.resume_at[0] == self.epoch else 0

    def __iter__(self) -> Iterator[int]:
        skip, self.resume_at = self.skipped(), None
        return iter(self.indices(self.epoch)[skip:])

    def __len__(self) -> int:
        return self.size // _world()[1]


def bucket_by_length(order: Tensor, lengths: Tensor, batch: int, window_batches: int, seed: int) -> Tensor:
    """``order`` [n] regrouped so that each batch of ``batch`` consecutive entries holds samples of similar
    ``lengths`` (indexed by sample): every window of ``window_batches`` full batches is sorted by length
    (stable), cut into batches, and its batches are put in a random order drawn from ``seed``. Entries
    after the last full batch stay last, in their order. Returns a permutation of ``order``."""
    n_full = len(order) // batch * batch
    gen = torch.Generator().manual_seed(seed)
    window = batch * max(1, window_batches)
    parts = []
    for start in range(0, n_full, window):
        w = order[start : min(start + window, n_full)]
        w = w[torch.argsort(lengths[w], stable=True)].view(-1, batch)
        parts.append(w[torch.randperm(len(w), generator=gen)].flatten())
    parts.append(order[n_full:])
    return torch.cat(parts)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that resumes exactly where a checkpoint left it;
    ``lengths`` (one per sample) with ``bucket_batches`` > 0 turns on length buckets (module docstring)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        lengths: Sequence[int] | None = None,
        bucket_batches: int = 0,
        **kwargs: Any,
    ):
        self.seed = int(seed)
        sampler = ResumableSampler(len(dataset), shuffle, seed, lengths, batch_size, bucket_batches)
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            generator=torch.Generator(),
            **kwargs,
        )
        self.batches_out = 0  # batches of the current epoch handed to the training loop

    def __iter__(self) -> Iterator:
        return self._epoch_batches()

    def _epoch_batches(self) -> Iterator:
        # Runs at the first next(), after Lightning's set_epoch(); see the module docstring.
        sampler: ResumableSampler = self.sampler
        self.batches_out = sampler.skipped() // self.batch_size
        self.generator.manual_seed(self.seed * 100_003 + sampler.epoch)  # worker seeds: f(seed, epoch)
        for batch in super().__iter__():
            self.batches_out += 1
            yield batch

    # ---- resume ------------------------------------------------------------------------------------
    def position(self) -> dict[str, int]:
        """Where training is in the data: epoch, batches of it handed out, and what that depends on."""
        return {
            "epoch": self.sampler.epoch,
            "batches": self.batches_out,
            "batch_size": int(self.batch_size),
            "world_size": _world()[1],
            "dataset_size": len(self.dataset),
            "seed": self.seed,
        }

    def resume(self, state: dict[str, int]) -> None:
        """Arrange for the next iteration of epoch ``state["epoch"]`` to continue after its last trained
        batch (a position taken at the end of an epoch leaves the next epoch untouched).

        Raises:
            ValueError: the checkpoint was written with another batch size, world size, dataset size or
                seed: the remaining batches of its epoch cannot be reproduced.
        """
        now = self.position()
        changed = {
            k: (state.get(k), now[k])
            for k in ("batch_size", "world_size", "dataset_size", "seed")
            if state.get(k) != now[k]
        }
        if changed and state["batches"] < len(self):
            details = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise ValueError(
                f"cannot resume in the middle of epoch {state['epoch']}: the checkpoint was written with "
                f"different data settings ({details}). Resume with the original data.batch_size, "
                "trainer.devices, data.max_samples and seed, or from an end-of-epoch checkpoint."
            )
        self.sampler.set_epoch(state["epoch"])
        self.sampler.resume_at = (state["epoch"], state["batches"] * self.batch_size)

    # Lightning's names for the same (its fit loop saves the position too, and applies it on some
    # restart paths; applying it twice is harmless)
    state_dict = position
    load_state_dict = resume


# ---- evaluation ---------------------------------------------------------------------------------------
def batch_shard(size: int, batch_size: int, rank: int, world: int, pad: bool = True) -> list[int]:
    """Rank ``rank``'s share of ``range(size)`` in whole batches: the batches ``rank, rank + world, ...`` of
    the single-process batching, padded (``pad``) with batch 0 so that every rank has the same number of
    batches (Lightning's evaluation loop runs a collective per step under DDP).

    Every batch a rank forms from this stream (with the same ``batch_size``, ``drop_last=False``) is
    exactly a batch of the single-process run — same samples, same order, same size — so features are
    bitwise those of one process (a kernel's floating-point result may depend on the batch size: a
    sample-strided split can turn a 4-image batch into a 1-image one and flip near-ties in a ranking).
    The short last batch lands on a rank that needs no padding, so it stays the last in its stream.
    """
    batches = [list(range(k, min(k + batch_size, size))) for k in range(0, size, batch_size)]
    mine = batches[rank::world]
    per_rank = -(-len(batches) // world)
    mine += [batches[0]] * (per_rank - len(mine)) if batches and pad else []
    return [i for batch in mine for i in batch]


class BatchShardSampler(DistributedSampler):
    """Evaluation sampler over :func:`batch_shard` (a ``DistributedSampler`` so Lightning keeps it).

    Padding repeats whole batches; the metric de-duplicates by position, so every query counts once.
    """

    def __init__(self, size: int, batch_size: int):
        self.size, self.batch_size = int(size), int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        pass  # the order never changes

    def __iter__(self) -> Iterator[int]:
        return iter(batch_shard(self.size, self.batch_size, *_world()))

    def __len__(self) -> int:
        return len(batch_shard(self.size, self.batch_size, *_world()))
