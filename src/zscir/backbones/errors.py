"""Errors and hints for loading weights without network access."""

from __future__ import annotations

import os

#: Where LAVIS downloads the ``blip_feature_extractor`` base weights from
#: (``lavis/configs/models/blip_feature_extractor_base.yaml``).
LAVIS_BLIP_BASE_URL = (
    "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_capfilt_large.pth"
)


class BackboneLoadError(RuntimeError):
    """A backbone could not be built or its weights could not be found."""


def weights_hint(library: str, model: str, pretrained: str | None, cache_dir: str | None) -> str:
    """Explain where weights were looked for and how to pass a local copy instead."""
    hf_home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    where = cache_dir or os.path.join(hf_home, "hub")
    if library == "open_clip":
        return (
            f"Looked in the cache {where!r} (and tried the hub unless HF_HUB_OFFLINE=1). Without network access, "
            f"download the weights once elsewhere (open_clip.create_model_and_transforms({model!r}, pretrained={pretrained!r})) "
            f"and either copy the cache folder here or pass the file directly: backbone.pretrained=/path/to/open_clip_pytorch_model.bin"
        )
    return (
        f"Looked in the cache {where!r} (and tried the hub unless HF_HUB_OFFLINE=1). Without network access, "
        f"download it once elsewhere (huggingface-cli download {model}) and pass the local directory: backbone.model=/path/to/{model.split('/')[-1]}"
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
