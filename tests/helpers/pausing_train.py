"""``zscir-train`` with one extra callback that pauses at a given global step, for the kill tests.

    ZSCIR_PAUSE_AT_STEP=<step> ZSCIR_PAUSE_MARKER=<file> python tests/helpers/pausing_train.py [overrides]

When global rank 0 is about to run the batch of optimizer step ``<step>`` (so, when checkpointing every
step, ``last.ckpt`` of the step before is on disk), it writes ``<file>`` and waits; other ranks wait in
the next collective. The test then kills the process: SIGKILL ends it there; SIGTERM lets it continue
into zscir's pre-emption path (the batch runs, ``last.ckpt`` is saved, exit status 143). The wait ends by
itself after 5 minutes, so a crashed test never leaves this process behind for long. The settings travel
in the environment because Lightning's DDP launcher re-runs this script with the same arguments.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class PauseAtStep(Callback):
    def __init__(self, step: int, marker: Path):
        self.step, self.marker, self.done = step, marker, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.done or trainer.global_step != self.step or trainer.global_rank != 0:
            return
        self.done = True
        tmp = self.marker.with_suffix(".part")
        tmp.write_text(f"{trainer.global_step} {trainer.current_epoch} {batch_idx}\n")
        tmp.rename(self.marker)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(getattr(cb, "signal_received", None) for cb in trainer.callbacks):
                return  # SIGTERM: let zscir's pre-emption handling take over
            time.sleep(0.05)
        raise SystemExit("pausing_train: nobody killed me within 5 minutes")


def main() -> None:
    step, marker = int(os.environ["ZSCIR_PAUSE_AT_STEP"]), Path(os.environ["ZSCIR_PAUSE_MARKER"])
    original = L.Trainer.__init__

    @functools.wraps(original)  # keeps the signature zscir checks trainer options against
    def patched(self: L.Trainer, *args: object, callbacks: list | None = None, **kwargs: object) -> None:
        original(self, *args, callbacks=[PauseAtStep(step, marker), *(callbacks or [])], **kwargs)

    L.Trainer.__init__ = patched
    from zscir.cli.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
