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


def build_encoder(
    kind: str,
    model: str,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    init_seed: int = 0,
    cache_dir: str | None = None,
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
        extra: kind-specific options: ``quick_gelu`` (open_clip: the activation the weights were trained
            with, see :func:`~zscir.backbones.open_clip_encoder.build_open_clip`), ``context_length``,
            ``revision`` (hf_clip, hf_blip: the hub revision — branch, tag or commit — of ``model``).

    Raises:
        BackboneLoadError: unknown kind, missing checkpoint, weights that cannot be loaded, or
            ``quick_gelu`` set for a Hugging Face model (those read the activation from their config).
    """
    for key in _APP_KEYS:
        extra.pop(key, None)
    extra = {k: v for k, v in extra.items() if v is not None}  # None: the kind's default
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        raise BackboneLoadError(missing_checkpoint_message(kind, checkpoint))
    revision = extra.pop("revision", None)
    if revision is not None and kind not in ("hf_clip", "hf_blip"):
        raise BackboneLoadError(
            f"backbone.revision applies to the Hugging Face kinds (hf_clip, hf_blip), not {kind}: pin an "
            "open_clip hub model by downloading that revision (hf download <repo> --revision <rev> --local-dir "
            "<dir>) and passing backbone.model=local-dir:<dir>"
        )
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
    if extra.pop("quick_gelu", None) is not None:
        raise BackboneLoadError(
            f"backbone.quick_gelu applies to kind=open_clip only; a {kind} model takes its activation from "
            "its config.json (hidden_act): leave backbone.quick_gelu unset"
        )
    if kind == "hf_blip":
        from zscir.backbones.hf_blip_encoder import build_hf_blip

        return build_hf_blip(
            model, checkpoint=checkpoint, init_seed=init_seed, cache_dir=cache_dir, revision=revision, **extra
        )
    if kind == "lavis_blip":
        from zscir.backbones.lavis_blip_encoder import build_lavis_blip

        return build_lavis_blip(
            model, checkpoint=checkpoint, init_seed=init_seed, cache_dir=cache_dir, **extra
        )
    if extra:
        raise TypeError(f"unexpected backbone options for kind={kind!r}: {sorted(extra)}")
    if kind == "hf_clip":
        from zscir.backbones.hf_clip_encoder import build_hf_clip

        return build_hf_clip(
            model, checkpoint=checkpoint, init_seed=init_seed, cache_dir=cache_dir, revision=revision
        )
    raise BackboneLoadError(
        f"unknown backbone kind {kind!r}; expected one of: open_clip, hf_clip, hf_blip, lavis_blip"
    )


def backbone_fingerprint(config: dict, whole_seconds: bool = False) -> str:
    """A short, stable id of the weights a backbone config loads (for caches and checkpoint checks).

    Local weight files contribute their size and modification time in nanoseconds, so replacing a file
    changes it, even within the same second (a retrained checkpoint has the same size).
    ``whole_seconds=True`` gives the id zscir stored in checkpoints before (mtime in whole seconds), to
    recognise those checkpoints. A hub ``revision`` is part of it when one is given (without one, the id is
    the one configs without that key always had).
    """
    relevant = {k: v for k, v in sorted(config.items()) if k not in _APP_KEYS and k != "cache_dir"}
    if relevant.get("revision") is None:
        relevant.pop("revision", None)
    for key in ("checkpoint", "pretrained", "model"):
        value = relevant.get(key)
        if isinstance(value, str) and os.path.exists(os.path.expanduser(value)):
            st = os.stat(os.path.expanduser(value))
            relevant[key + "_stat"] = [st.st_size, int(st.st_mtime) if whole_seconds else st.st_mtime_ns]
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]
