"""Experiment loggers that can never fail a run.

W&B (or any remote tracker) may be unreachable when the run starts, or go away hours into it. Both must
cost at most a warning: :func:`start_failsafe` connects the logger up front (rank 0), and drops it with a
warning if that fails; :func:`make_failsafe` guards the logger's methods in place, so an exception in any
later logging call disables that logger with one warning and training carries on. The logger keeps its
class (``isinstance(x, WandbLogger)`` checks elsewhere still hold).
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger("zscir")

#: logger methods Lightning (or our code) calls during a run; those present are guarded
GUARDED = (
    "log_metrics",
    "log_hyperparams",
    "log_graph",
    "save",
    "finalize",
    "after_save_checkpoint",
    "log_image",
    "log_table",
    "log_text",
)


class _Guarded:
    """``logger.<name>(...)`` that warns once and turns into a no-op after its first exception.

    Holds the logger and the method name (not a closure), so a guarded logger still pickles.
    """

    def __init__(self, logger: Logger, name: str, label: str):
        self.logger, self.name, self.label = logger, name, label

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self.logger, "_zscir_disabled", False):
            return None
        try:
            return getattr(type(self.logger), self.name)(self.logger, *args, **kwargs)
        except Exception as err:  # a logger must never end a run
            self.logger._zscir_disabled = True
            log.warning(
                "logger %s failed in %s (%s: %s); it is disabled for the rest of the run, training goes on",
                self.label,
                self.name,
                type(err).__name__,
                err,
            )
            return None


def make_failsafe(logger: Logger, label: str) -> Logger:
    """Guard ``logger``'s logging methods in place (see the module docstring); returns it."""
    for name in GUARDED:
        if callable(getattr(type(logger), name, None)):
            setattr(logger, name, _Guarded(logger, name, label))
    return logger


def start_failsafe(logger: Logger, label: str) -> Logger | None:
    """Connect ``logger`` now (on rank 0) and guard it; None, with a warning, if it cannot start."""
    try:
        if rank_zero_only.rank == 0:
            _ = logger.experiment  # W&B: wandb.init happens here, not in the constructor
    except Exception as err:
        log.warning(
            "logger %s could not start (%s: %s); continuing without it", label, type(err).__name__, err
        )
        return None
    return make_failsafe(logger, label)
