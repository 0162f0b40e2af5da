"""Textual inversion shared by LinCIR, CAM-TI and SEARLE-style methods: the projection φ that maps a
feature to a pseudo-word token, and the composed query "a photo of $ that {caption}".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import Tensor, nn

from zscir.backbones import Encoder
from zscir.backbones.base import PLACEHOLDER
from zscir.text.placeholder import MissingPlaceholders, fit_prompts

log = logging.getLogger(__name__)

#: the prompt SEARLE and LinCIR use at inference; ``$`` is the pseudo-word, ``{caption}`` the modification text
DEFAULT_TEMPLATE = "a photo of $ that {caption}"


class Phi(nn.Module):
    """φ: Linear(D→4D) GELU Dropout Linear(4D→4D) GELU Dropout Linear(4D→token_dim).

    The SEARLE/LinCIR architecture (768→3072→3072→768 on CLIP ViT-L/14), ``D`` = the joint embedding
    size, output = one token embedding of the text tower.
    """

    def __init__(self, embed_dim: int, token_dim: int, hidden_mult: int = 4, dropout: float = 0.5):
        super().__init__()
        hidden = hidden_mult * embed_dim
        self.net = nn.Sequential(
            nn.Linear(embed_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, token_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def encode_with_template(
    encoder: Encoder,
    pseudo: Tensor,
    captions: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    missing: MissingPlaceholders | None = None,
    query_ids: Sequence | None = None,
    occurrences: str = "all",
) -> Tensor:
    """Text features of ``template`` filled with each caption, ``$`` replaced by that row's pseudo-token.

    Prompts are built by :func:`zscir.text.placeholder.fit_prompts`: a caption too long for the context
    is shortened so that the template (and its ``$``) survives.

    Args:
        pseudo: [B, token_dim], one pseudo-token per caption.
        missing: counts prompts that still hold no pseudo-word (reported once per evaluation by the
            method); None: such prompts are logged at once.
        query_ids: names of the rows, for that report.
        occurrences: which ``$`` of a prompt gets the pseudo-token: ``"all"`` (LinCIR) or ``"first"``
            (SEARLE); see :meth:`~zscir.backbones.Encoder.encode_text_with_pseudo`.

    Raises:
        ValueError: if the template has no ``$`` or alone is longer than the context.
    """
    if PLACEHOLDER not in template:
        raise ValueError(f"template {template!r} has no '$' placeholder")
    _, ids = fit_prompts(encoder.tokenize, template, captions)
    ids = ids.to(pseudo.device)
    counter = missing if missing is not None else MissingPlaceholders()
    counter.add(ids, encoder.placeholder_id, query_ids)
    if missing is None and (text := counter.report()):
        log.warning(text)
    return encoder.encode_text_with_pseudo(ids, pseudo, occurrences=occurrences)
