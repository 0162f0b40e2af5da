"""Lightning plumbing that makes a training run survive kills and refuse to go silently wrong.

* :class:`AtomicCheckpointIO` — checkpoints are written to a temp file and renamed: a kill never leaves
  a truncated ``last.ckpt``.
* :class:`LastCheckpoint` — ``last.ckpt`` every N optimizer steps and on SIGTERM (SLURM pre-emption),
  after which the run exits with status 143 (128 + SIGTERM) so a scheduler or a ``&&`` chain knows it
  did not finish.
* :class:`ResumeState` — the global RNG streams and the position in the training data travel with the
  checkpoint, so a resumed run sees the same remaining batches and draws the same random numbers
  (masking, dropout) as one that was never interrupted.
* :class:`NonFiniteGuard` — a NaN/Inf loss or gradient stops training *before* the optimizer step,
  naming the step and the batch's sample ids; ``last.ckpt`` is then still the last good state.
* :class:`SkippedSamples` — unreadable training images (dropped by the collate function) are counted
  and logged as ``train/skipped_samples`` (cumulative, summed over ranks).

Together with :class:`zscir.data.samplers.ResumableDataLoader` they give the resume guarantee in
``RELIABILITY.md``.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from zscir.data.samplers import ResumableDataLoader
from zscir.utils.io import atomic_write

log = logging.getLogger("zscir")

#: exit status of a run stopped by SIGTERM after saving its checkpoint (the shell's 128 + 15)
PREEMPTED_EXIT_CODE = 143


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temp file in the checkpoint folder, fsync, rename (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage (s3://, gs://): leave it to fsspec
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda f: torch.save(checkpoint, f))


class Preempted(SystemExit):
    """Ends a run stopped by SIGTERM (on every rank), after its checkpoint is on disk."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


class LastCheckpoint(Callback):
    """Write ``<dirpath>/last.ckpt`` at the end of every ``every_n_epochs``-th epoch (after its
    validation), every ``every_n_train_steps`` optimizer steps, and on SIGTERM.

    (Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only when it also saves a
    top-k checkpoint, so without a monitored metric it would write it only when training ends.)

    The signal handler only records the signal; the checkpoint is written at the next optimizer-step
    boundary, where the state is consistent (no half-accumulated gradients), and every rank agrees on
    that step through one boolean all-reduce per batch. Lightning's own SIGTERM handler is replaced
    during training because it does a collective inside the handler and stops without saving.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 0, every_n_epochs: int = 1):
        self.path = Path(dirpath) / "last.ckpt"
        self.every = int(every_n_train_steps)
        self.every_epochs = int(every_n_epochs)
        self.signal_received: int | None = None
        self._replaced: Any = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return "zscir.LastCheckpoint"

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signal_received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            self._replaced = signal.signal(signal.SIGTERM, self._on_signal)

    def _restore_handler(self) -> None:
        if self._replaced is not None and signal.getsignal(signal.SIGTERM) == self._on_signal:
            signal.signal(signal.SIGTERM, self._replaced)
        self._replaced = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handler()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_epochs > 0 and (trainer.current_epoch + 1) % self.every_epochs == 0:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = trainer.global_step != self._last_step
        if not stepped:  # mid gradient accumulation: nothing consistent to save yet
            return
        self._last_step = trainer.global_step
        stop = self.signal_received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop or (self.every and trainer.global_step % self.every == 0):
            trainer.save_checkpoint(self.path, weights_only=False)
        if stop and trainer.is_global_zero:
            log.warning(
                "SIGTERM: saved %s at step %d (epoch %d, batch %d); stopping. Resume with the same "
                "command plus hydra.run.dir=%s resume=last",
                self.path,
                trainer.global_step,
                trainer.current_epoch,
                batch_idx,
                self.path.parent.parent,
            )
        if stop:
            # Let Lightning stop after this batch's bookkeeping (so its logged metrics are not lost) with
            # its SIGTERMException, which train() turns into exit status 143
            connector = getattr(trainer, "_signal_connector", None)
            if connector is None or not hasattr(connector, "received_sigterm"):
                raise Preempted()
            connector.received_sigterm = True


# ---- RNG streams ---------------------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    """The global RNG states, as tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _resumable_loaders(trainer: L.Trainer) -> list[ResumableDataLoader]:
    loaders = trainer.fit_loop._combined_loader.flattened if trainer.fit_loop._combined_loader else []
    return [dl for dl in loaders if isinstance(dl, ResumableDataLoader)]


class ResumeState(Callback):
    """Save the global RNG states and the training data position with each checkpoint; restore both just
    before training resumes.

    Restoring at ``on_train_start`` (not at load time) matters: nothing between it and the first resumed
    batch draws random numbers or data, exactly as nothing did between the save and the next batch of
    the uninterrupted run. Under DDP the saved states are rank 0's and every rank restores them; ranks
    seeded alike (``seed_everything``) have identical RNG streams and agree on the data position.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "zscir.ResumeState"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        loaders = _resumable_loaders(self._trainer) if self._trainer is not None else []
        return {"rng": rng_states(), "data": [dl.position() for dl in loaders]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        loaders = _resumable_loaders(trainer)
        if len(loaders) != len(state["data"]):
            raise ValueError(
                f"the checkpoint records {len(state['data'])} resumable training loader(s), this run has "
                f"{len(loaders)}: it cannot continue the checkpoint's epoch exactly"
            )
        for loader, position in zip(loaders, state["data"]):
            loader.resume(position)
        set_rng_states(state["rng"])


# ---- non-finite loss / gradients -----------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient; the weights were not updated with it."""


class NonFiniteGuard(Callback):
    """Stop at the first NaN/Inf loss or gradient, before the optimizer step can spread it to the weights.

    The error names the global step, the epoch, the batch index within the epoch and the dataset indices
    of the batch's samples, and points to ``last.ckpt`` (which holds only finite weights, since nothing
    after the bad batch was saved). Gradients are not checked under fp16 loss scaling, whose scaler skips
    steps with overflowing gradients by design.
    """

    def __init__(self, checkpoint_dir: str | Path | None = None):
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self._batch_idx = -1
        self._sample_ids: list[int] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx
        index = batch.get("index") if isinstance(batch, dict) else None
        self._sample_ids = [int(i) for i in index.reshape(-1).tolist()] if torch.is_tensor(index) else []

    def _fail(self, trainer: L.Trainer, what: str) -> None:
        ids = self._sample_ids
        shown = f"{ids[:32]}{' ...' if len(ids) > 32 else ''} ({len(ids)} samples)" if ids else "unknown"
        last = self.checkpoint_dir / "last.ckpt" if self.checkpoint_dir else None
        keep = (
            f"{last} holds the last good weights (saved before this step); resume from it with resume=last"
            if last and last.is_file()
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"{what} at global step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
            f"{self._batch_idx} of the epoch); dataset indices of the batch: {shown}. Training stopped "
            f"before the optimizer step. {keep}. Usual fixes: a lower method.optim.lr, "
            "trainer.gradient_clip_val=1.0, trainer.precision=32-true, or inspecting those samples."
        )

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:  # every rank must stop at the same step, or the others hang in DDP
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            self._fail(trainer, f"the training loss is {loss.detach().float().flatten()[0].item()}")

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return
        names = {id(p): n for n, p in pl_module.named_parameters()}
        bad = [
            names.get(id(p), "?")
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        self._fail(trainer, f"non-finite gradients in {len(bad)} parameter(s), e.g. {bad[:3]}")


# ---- skipped samples ----------------------------------------------------------------------------------
class SkippedSamples(Callback):
    """Log ``train/skipped_samples``: unreadable training samples so far (summed over ranks, kept across
    resumes). Each one is also logged by name when it is read (``ImageCaptionDataset``)."""

    def __init__(self) -> None:
        self.total = 0

    @property
    def state_key(self) -> str:
        return "zscir.SkippedSamples"

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.total = int(state_dict.get("total", 0))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        skipped = int(batch.get("skipped", 0)) if isinstance(batch, dict) else 0
        if trainer.world_size > 1:  # a global total, identical on every rank (so the checkpoint holds it)
            count = torch.tensor(float(skipped), device=pl_module.device)
            skipped = int(trainer.strategy.reduce(count, reduce_op="sum").item())
        if skipped:
            log.warning("skipped %d unreadable training sample(s) at step %d", skipped, trainer.global_step)
        self.total += skipped
        pl_module.log("train/skipped_samples", float(self.total), on_step=True, on_epoch=False)


def reliability_callbacks(
    checkpoint_dir: str | Path | None, every_n_train_steps: int = 0, every_n_epochs: int = 1
) -> list[Callback]:
    """The callbacks every training run gets (``checkpoint_dir=None``: no checkpointing)."""
    callbacks: list[Callback] = [ResumeState(), NonFiniteGuard(checkpoint_dir), SkippedSamples()]
    if checkpoint_dir is not None:
        callbacks.append(LastCheckpoint(checkpoint_dir, every_n_train_steps, every_n_epochs))
    return callbacks
