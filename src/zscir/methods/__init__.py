"""Methods: LightningModules sharing one retrieval contract (:class:`RetrievalMethod`).

``build_method(backbone, config)`` constructs the method ``config["kind"]`` selects; ``METHODS`` maps each
kind to its class (imported lazily, so a method's optional dependencies load only when it is used).
"""

from __future__ import annotations

import importlib

from zscir.methods.base import (
    MethodConfig,
    OptimConfig,
    RetrievalMethod,
    check_method_keys,
    parse_config,
    renamed_name_message,
)

__all__ = [
    "METHODS",
    "MethodConfig",
    "OptimConfig",
    "RetrievalMethod",
    "build_method",
    "check_method_keys",
    "method_class",
    "parse_config",
    "renamed_name_message",
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


def method_class(kind: str) -> type[RetrievalMethod]:
    """The class of the registered method ``kind``.

    Raises:
        KeyError: an unknown kind (the message lists the known ones).
    """
    if kind not in METHODS:
        raise KeyError(f"unknown method {kind!r}; available: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(backbone: dict, config: dict) -> RetrievalMethod:
    """Instantiate the method ``config["kind"]`` selects on the backbone described by ``backbone``.

    Raises:
        ValueError: the config selects with ``name`` (renamed to ``kind``) or has no ``kind``.
        KeyError: an unknown kind.
    """
    check_method_keys(config)
    if "kind" not in config:
        raise ValueError(f"the method config has no kind; select one of: {', '.join(sorted(METHODS))}")
    return method_class(config["kind"])(backbone=dict(backbone), config=dict(config))
