"""Encoders: one contract (:class:`Encoder`) over open_clip and Hugging Face models.

``build_encoder(**backbone_config)`` is the one way to construct an encoder from a config.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from zscir.backbones.base import PLACEHOLDER, Encoder, random_keep
from zscir.backbones.errors import BackboneLoadError, missing_checkpoint_message
from zscir.backbones.transforms import with_transform

__all__ = [
    "PLACEHOLDER",
    "BackboneLoadError",
    "Encoder",
    "backbone_fingerprint",
    "build_encoder",
    "random_keep",
]

#: config keys that only matter to the application (how to provision weights), not to the model.
_APP_KEYS = ("name", "train_recipe")
#: config keys of the image preprocessing (``zscir.backbones.transforms``): not part of the weights'
#: identity; feature caches key on ``Encoder.transform_id`` instead
_TRANSFORM_KEYS = ("transform", "targetpad_ratio")


def build_encoder(
    kind: str,
    model: str,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    init_seed: int = 0,
    cache_dir: str | None = None,
    transform: str = "default",
    targetpad_ratio: float = 1.25,
    **extra: object,
) -> Encoder:
    """Build an encoder from a backbone config.

    Args:
        kind: ``open_clip``, ``hf_clip``, ``hf_blip`` or ``lavis_blip``.
        model: architecture name (open_clip, ``lavis_blip``: ``base``), hub name or local directory (HF),
            or ``tiny``.
        pretrained: open_clip pretrained tag or weights file (ignored by HF kinds).
        checkpoint: a state dict file loaded on top of the model (e.g. a zscir-trained backbone); for
            ``lavis_blip``, the LAVIS weights file.
        init_seed: seed for random-init weights, so rebuilding gives identical parameters.
        cache_dir: weights cache folder.
        transform: image preprocessing in front of the backbone's own: ``default`` (none) or
            ``targetpad`` (pad to aspect ratio ``targetpad_ratio`` first; see
            :mod:`zscir.backbones.transforms`). It changes ``transform_id``.
    """
    for key in _APP_KEYS:
        extra.pop(key, None)
    encoder = _build(kind, model, pretrained, checkpoint, init_seed, cache_dir, extra)
    encoder.image_transform, encoder.transform_id = with_transform(
        encoder.image_transform, encoder.transform_id, transform, targetpad_ratio
    )
    return encoder


def _build(
    kind: str,
    model: str,
    pretrained: str | None,
    checkpoint: str | None,
    init_seed: int,
    cache_dir: str | None,
    extra: dict,
) -> Encoder:
    extra = {k: v for k, v in extra.items() if v is not None}  # None: the kind's default
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        raise BackboneLoadError(missing_checkpoint_message(kind, checkpoint))
    if kind == "open_clip":
        from zscir.backbones.open_clip_encoder import build_open_clip

        return build_open_clip(
            model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            init_seed=init_seed,
            cache_dir=cache_dir,
            **extra,
        )
    if kind == "hf_blip":
        from zscir.backbones.hf_blip_encoder import build_hf_blip

        return build_hf_blip(model, checkpoint=checkpoint, init_seed=init_seed, cache_dir=cache_dir, **extra)
    if kind == "lavis_blip":
        from zscir.backbones.lavis_blip_encoder import build_lavis_blip

        return build_lavis_blip(
            model, checkpoint=checkpoint, init_seed=init_seed, cache_dir=cache_dir, **extra
        )
    if extra:
        raise TypeError(f"unexpected backbone options for kind={kind!r}: {sorted(extra)}")
    if kind == "hf_clip":
        from zscir.backbones.hf_clip_encoder import build_hf_clip

        return build_hf_clip(model, checkpoint=checkpoint, init_seed=init_seed, cache_dir=cache_dir)
    raise BackboneLoadError(
        f"unknown backbone kind {kind!r}; expected one of: open_clip, hf_clip, hf_blip, lavis_blip"
    )


def backbone_fingerprint(config: dict, whole_seconds: bool = False) -> str:
    """A short, stable id of the weights a backbone config loads (for caches and checkpoint checks).

    Local weight files contribute their size and modification time in nanoseconds, so replacing a file
    changes it, even within the same second (a retrained checkpoint has the same size).
    ``whole_seconds=True`` gives the id zscir stored in checkpoints before (mtime in whole seconds), to
    recognise those checkpoints.
    """
    skip = (*_APP_KEYS, *_TRANSFORM_KEYS, "cache_dir")
    relevant = {k: v for k, v in sorted(config.items()) if k not in skip}
    for key in ("checkpoint", "pretrained", "model"):
        value = relevant.get(key)
        if isinstance(value, str) and os.path.exists(os.path.expanduser(value)):
            st = os.stat(os.path.expanduser(value))
            relevant[key + "_stat"] = [st.st_size, int(st.st_mtime) if whole_seconds else st.st_mtime_ns]
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]
