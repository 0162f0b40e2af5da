"""Zero-training baselines: the reference image alone, the modification text alone, and their sum."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from zscir.methods.base import MethodConfig, RetrievalMethod
from zscir.retrieval.search import normalize
from zscir.text.placeholder import fit_prompts


class ImageOnly(RetrievalMethod):
    """Query = the reference image's feature."""

    def compose(self, batch: dict) -> Tensor:
        return self.encoder.encode_image(batch["pixels"])


@dataclass
class TextOnlyConfig(MethodConfig):
    #: prompt around the caption; ``{caption}`` is replaced (and shortened if the prompt is too long)
    template: str = "{caption}"


class TextOnly(RetrievalMethod):
    """Query = the text feature of the modification caption."""

    Config = TextOnlyConfig

    def compose(self, batch: dict) -> Tensor:
        _, ids = fit_prompts(self.encoder.tokenize, self.cfg.template, batch["texts"])
        return self.encoder.encode_text(ids)


@dataclass
class SumConfig(MethodConfig):
    #: weight of the normalised image feature (PLI's inference uses 1 − mask_ratio)
    img_weight: float = 1.0
    template: str = "{caption}"


class Sum(RetrievalMethod):
    """Query = normalize(text) + w · normalize(image): the late-fusion baseline."""

    Config = SumConfig
    composes_from_towers = True

    def compose(self, batch: dict) -> Tensor:
        _, ids = fit_prompts(self.encoder.tokenize, self.cfg.template, batch["texts"])
        text = normalize(self.encoder.encode_text(ids))
        image = normalize(self.encoder.encode_image(batch["pixels"]))
        return text + self.cfg.img_weight * image
