"""Encoders: one contract (:class:`Encoder`) over open_clip and Hugging Face models.

``build_encoder(**backbone_config)`` is the one way to construct an encoder from a config.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path

from zscir.backbones.base import PLACEHOLDER, Encoder, random_keep
from zscir.backbones.errors import BackboneLoadError, missing_checkpoint_message
from zscir.backbones.transforms import with_transform

__all__ = [
    "BACKBONES",
    "PLACEHOLDER",
    "BackboneLoadError",
    "Encoder",
    "backbone_builder",
    "backbone_fingerprint",
    "build_encoder",
    "random_keep",
]

#: config keys that only matter to the application (how to provision weights), not to the model.
_APP_KEYS = ("name", "train_recipe")
#: config keys of the image preprocessing (``zscir.backbones.transforms``): not part of the weights'
#: identity; feature caches key on ``Encoder.transform_id`` instead
_TRANSFORM_KEYS = ("transform", "targetpad_ratio")


#: backbone ``kind`` -> its builder (``module:function``, imported on first use, so a kind's libraries load
#: only when it is used). Every builder takes ``(model, checkpoint=, init_seed=, cache_dir=, **options)``.
BACKBONES: dict[str, str] = {
    "open_clip": "zscir.backbones.open_clip_encoder:build_open_clip",
    "hf_clip": "zscir.backbones.hf_clip_encoder:build_hf_clip",
    "hf_blip": "zscir.backbones.hf_blip_encoder:build_hf_blip",
    "lavis_blip": "zscir.backbones.lavis_blip_encoder:build_lavis_blip",
}

#: why an option does not apply to a kind, and what to do instead (appended to the error)
_OPTION_HINTS = {
    "revision": "pin an open_clip hub model by downloading that revision (hf download <repo> --revision <rev> "
    "--local-dir <dir>) and passing backbone.model=local-dir:<dir>",
    "quick_gelu": "a Hugging Face or LAVIS model takes its activation from its config (hidden_act): leave "
    "backbone.quick_gelu unset",
    "pretrained": "Hugging Face kinds load the weights named by backbone.model (hub name or directory); "
    "LAVIS weights come from backbone.checkpoint",
}


def backbone_builder(kind: str) -> Callable[..., Encoder]:
    """The builder function of backbone ``kind`` (see :data:`BACKBONES`).

    Raises:
        BackboneLoadError: ``kind`` is not registered.
    """
    if kind not in BACKBONES:
        raise BackboneLoadError(f"unknown backbone kind {kind!r}; expected one of: {', '.join(BACKBONES)}")
    module, function = BACKBONES[kind].split(":")
    return getattr(importlib.import_module(module), function)


def build_encoder(
    kind: str,
    model: str,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    init_seed: int = 0,
    cache_dir: str | None = None,
    transform: str = "default",
    targetpad_ratio: float = 1.25,
    **options: object,
) -> Encoder:
    """Build an encoder from a backbone config: the builder :data:`BACKBONES` registers for ``kind``.

    Args:
        kind: ``open_clip``, ``hf_clip``, ``hf_blip`` or ``lavis_blip``.
        model: architecture name (open_clip, ``lavis_blip``: ``base``), hub name or local directory (HF),
            or ``tiny``.
        pretrained: open_clip pretrained tag or weights file (open_clip only).
        checkpoint: a state dict file loaded on top of the model (e.g. a zscir-trained backbone); for
            ``lavis_blip``, the LAVIS weights file.
        init_seed: seed for random-init weights, so rebuilding gives identical parameters.
        cache_dir: weights cache folder.
        options: the kind's own options, the keyword arguments of its builder: ``quick_gelu``
            (open_clip: the activation the weights were trained with, see
            :func:`~zscir.backbones.open_clip_encoder.build_open_clip`), ``context_length``, ``revision``
            (hf_clip, hf_blip: the hub revision — branch, tag or commit — of ``model``), the BLIP text and
            image options. ``None`` means the kind's default.
        transform: image preprocessing in front of the backbone's own: ``default`` (none) or
            ``targetpad`` (pad to aspect ratio ``targetpad_ratio`` first, as SEARLE; see
            :mod:`zscir.backbones.transforms`). It changes ``transform_id``.

    Raises:
        BackboneLoadError: unknown kind, missing checkpoint, an option the kind does not take (e.g.
            ``quick_gelu`` for a Hugging Face model, ``revision`` for open_clip), or weights that cannot
            be loaded.
    """
    for key in _APP_KEYS:
        options.pop(key, None)
    options = {k: v for k, v in {"pretrained": pretrained, **options}.items() if v is not None}
    builder = backbone_builder(kind)
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        raise BackboneLoadError(missing_checkpoint_message(kind, checkpoint))
    takes = set(inspect.signature(builder).parameters) - {"model", "checkpoint", "init_seed", "cache_dir"}
    foreign = sorted(set(options) - takes)
    if foreign:
        hints = "; ".join(_OPTION_HINTS[k] for k in foreign if k in _OPTION_HINTS)
        raise BackboneLoadError(
            f"backbone option(s) {', '.join(foreign)} do not apply to kind={kind}, which takes "
            f"{', '.join(sorted(takes)) or 'no options'}" + (f": {hints}" if hints else "")
        )
    encoder = builder(model, checkpoint=checkpoint, init_seed=init_seed, cache_dir=cache_dir, **options)
    encoder.image_transform, encoder.transform_id = with_transform(
        encoder.image_transform, encoder.transform_id, transform, targetpad_ratio
    )
    return encoder


def backbone_fingerprint(config: dict, whole_seconds: bool = False) -> str:
    """A short, stable id of the weights a backbone config loads (for caches and checkpoint checks).

    Local weight files contribute their size and modification time in nanoseconds, so replacing a file
    changes it, even within the same second (a retrained checkpoint has the same size).
    ``whole_seconds=True`` gives the id zscir stored in checkpoints before (mtime in whole seconds), to
    recognise those checkpoints. A hub ``revision`` is part of it when one is given (without one, the id is
    the one configs without that key always had).
    """
    skip = (*_APP_KEYS, *_TRANSFORM_KEYS, "cache_dir")
    relevant = {k: v for k, v in sorted(config.items()) if k not in skip}
    if relevant.get("revision") is None:
        relevant.pop("revision", None)
    for key in ("checkpoint", "pretrained", "model"):
        value = relevant.get(key)
        if isinstance(value, str) and os.path.exists(os.path.expanduser(value)):
            st = os.stat(os.path.expanduser(value))
            relevant[key + "_stat"] = [st.st_size, int(st.st_mtime) if whole_seconds else st.st_mtime_ns]
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]
