"""Errors and hints for loading weights without network access."""

from __future__ import annotations

import os


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
        from zscir.backbones.lavis_blip_encoder import missing_weights_message

        return missing_weights_message(checkpoint)
    return f"backbone checkpoint {checkpoint!r} does not exist"
