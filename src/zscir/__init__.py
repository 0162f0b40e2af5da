"""zscir: zero-shot composed image retrieval (PLI, LinCIR, CAM-masked textual inversion) on one stack.

The library (backbones, methods, data, metrics, retrieval) imports without Hydra; Hydra lives in
``zscir.cli`` and ``zscir/conf`` only. The Python API (:mod:`zscir.api`) is exported here, imported on
first use (``import zscir`` stays light):

    method = zscir.load_method("sum", backbone="tiny")       # or zscir.load_run(<zscir-train run dir>)
    queries = zscir.compose_queries(method, [reference_image], ["is red and has no sleeves"])
    gallery = zscir.encode_gallery(method, image_files)
    indices, scores = zscir.retrieve(queries, gallery, k=10)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "load_method": "zscir.api",
    "load_run": "zscir.api",
    "load_checkpoint": "zscir.api",
    "run_config": "zscir.api",
    "backbone_config": "zscir.api",
    "compose_queries": "zscir.api",
    "encode_gallery": "zscir.api",
    "retrieve": "zscir.api",
    "load_benchmark": "zscir.api",
    "evaluate": "zscir.api",
    "RetrievalMethod": "zscir.methods",
    "Benchmark": "zscir.benchmarks",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zscir' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
