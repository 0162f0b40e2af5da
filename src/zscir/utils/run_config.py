"""Reading the config a run saved (``<run dir>/resolved_config.yaml``), brought up to today's keys.

Every reader of a saved run config (``zscir-eval run_dir=``, ``zscir.load_run``, ``zscir-report``) goes
through :func:`load_run_config`, so a run written by an earlier zscir keeps evaluating and reporting.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("zscir")

#: the file in a run directory that holds the run's resolved config
RUN_CONFIG = "resolved_config.yaml"

_warned: set[Path] = set()  # one warning per file and process: Hydra resolves the run's keys several times


def load_run_config(run_dir: str | Path) -> DictConfig:
    """The config saved in the run directory ``run_dir`` (its ``resolved_config.yaml``, unresolved), with
    the keys renamed since it was written moved to their new names; a warning names the file once per
    process. Renamed so far:

    - ``method.name`` -> ``method.kind``: runs written before the method group took the selector key of
      the backbone and benchmark groups select their method with ``name``.

    Raises:
        FileNotFoundError: the directory holds no ``resolved_config.yaml``.
        ValueError: the file holds no mapping.
    """
    file = Path(run_dir) / RUN_CONFIG
    config = OmegaConf.load(file)
    if not isinstance(config, DictConfig):
        raise ValueError(f"{file} holds no config mapping")
    method = config.get("method")
    if isinstance(method, DictConfig) and "name" in method and "kind" not in method:
        method.kind = method.pop("name")
        if file not in _warned:
            _warned.add(file)
            log.warning(
                "%s was written by an earlier zscir: its method.name (%s) is read as method.kind",
                file,
                method.kind,
            )
    return config
