"""Errors and hints for loading weights without network access, and the one check of whether the
Hugging Face hub can be reached (so an unreachable hub fails in seconds, not after minutes of retries)."""

from __future__ import annotations

import contextlib
import functools
import os
import urllib.error
import urllib.request
from collections.abc import Iterator

#: seconds the one reachability check of the hub may take
HUB_PROBE_TIMEOUT_S = 5.0

#: Where LAVIS downloads the ``blip_feature_extractor`` base weights from
#: (``lavis/configs/models/blip_feature_extractor_base.yaml``).
LAVIS_BLIP_BASE_URL = (
    "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_capfilt_large.pth"
)


class BackboneLoadError(RuntimeError):
    """A backbone could not be built or its weights could not be found."""


def hub_offline_by_env() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(
        os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.cache
def _probe(endpoint: str) -> bool:
    try:  # urllib honours the *_proxy variables, as the hub client does
        with urllib.request.urlopen(
            urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S
        ):
            return True
    except urllib.error.HTTPError:  # the server answered
        return True
    except (OSError, ValueError):  # no route, DNS failure, refused, timed out
        return False


def hub_reachable() -> bool:
    """Whether weights may be fetched from the Hugging Face hub: False when offline mode is set, else one
    HEAD request to ``$HF_ENDPOINT`` (at most :data:`HUB_PROBE_TIMEOUT_S`, answered once per process).
    Loaders then read only the local cache when it is False (``local_files_only``), so an unreachable hub
    fails at once instead of after the hub client's retries."""
    if hub_offline_by_env():
        return False
    return _probe(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@contextlib.contextmanager
def hub_cache_only(enabled: bool) -> Iterator[None]:
    """Inside: the hub client serves files from its cache only (its offline mode), when ``enabled`` — for
    libraries that call it without a ``local_files_only`` argument (open_clip)."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def weights_hint(library: str, model: str, pretrained: str | None, cache_dir: str | None) -> str:
    """Explain where weights were looked for and how to pass a local copy instead."""
    hf_home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    where = cache_dir or os.path.join(hf_home, "hub")
    tried = (
        "HF_HUB_OFFLINE is set, so the hub was not tried"
        if hub_offline_by_env()
        else "the hub could not be reached, so only the cache was read"
        if not hub_reachable()
        else "the hub was tried"
    )
    if library == "open_clip":
        repo = model.removeprefix("hf-hub:")
        fetch = (
            f"hf download {repo}"
            if model.startswith("hf-hub:")
            else f"open_clip.create_model_and_transforms({model!r}, pretrained={pretrained!r})"
        )
        return (
            f"Looked in the cache {where!r} ({tried}). Without network access, download the weights once "
            f"elsewhere ({fetch}) and either copy the cache folder here or pass the file directly: "
            "backbone.pretrained=/path/to/open_clip_pytorch_model.bin (or backbone.model=local-dir:/path/to/dir)"
        )
    return (
        f"Looked in the cache {where!r} ({tried}). Without network access, download it once elsewhere "
        f"(hf download {model} --local-dir {model.split('/')[-1]}) and pass the local directory: "
        f"backbone.model=/path/to/{model.split('/')[-1]}"
    )


def missing_checkpoint_message(kind: str, checkpoint: str) -> str:
    """Say that a backbone's ``checkpoint`` file is missing, and where to get it when it is a release."""
    if kind == "lavis_blip":
        return missing_weights_message(checkpoint)
    return f"backbone checkpoint {checkpoint!r} does not exist"


def missing_weights_message(path: str | None) -> str:
    """What to do when the LAVIS BLIP weights file is not there (``path``: the file looked for, if any)."""
    where = f"{path!r} does not exist" if path else "no weights file was given"
    return (
        f"LAVIS BLIP base weights: {where}. Download model_base_capfilt_large.pth once from "
        f"{LAVIS_BLIP_BASE_URL} and pass it: backbone.checkpoint=/path/to/model_base_capfilt_large.pth"
    )
