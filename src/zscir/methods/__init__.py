"""Methods: LightningModules sharing one retrieval contract (:class:`RetrievalMethod`).

``build_method(backbone, config)`` constructs a method by ``config["name"]``; ``METHODS`` maps each
name to its class (imported lazily, so a method's optional dependencies load only when it is used).
"""

from __future__ import annotations

import importlib

from zscir.methods.base import MethodConfig, OptimConfig, RetrievalMethod, parse_config

__all__ = [
    "METHODS",
    "MethodConfig",
    "OptimConfig",
    "RetrievalMethod",
    "build_method",
    "method_class",
    "parse_config",
]

METHODS: dict[str, str] = {
    "image_only": "zscir.methods.baselines:ImageOnly",
    "text_only": "zscir.methods.baselines:TextOnly",
    "sum": "zscir.methods.baselines:Sum",
    "clip_pretrain": "zscir.methods.clip_pretrain:CLIPPretrain",
    "lincir": "zscir.methods.lincir:LinCIR",
    "cam_ti": "zscir.methods.cam_ti:CamTI",
    "pli": "zscir.methods.pli:PLI",
    "pic2word": "zscir.methods.pic2word:Pic2Word",
    "searle": "zscir.methods.searle:Searle",
    "searle_oti": "zscir.methods.searle:SearleOTI",
}


def method_class(name: str) -> type[RetrievalMethod]:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(backbone: dict, config: dict) -> RetrievalMethod:
    """Instantiate the method named ``config["name"]`` on the backbone described by ``backbone``."""
    return method_class(config["name"])(backbone=dict(backbone), config=dict(config))
