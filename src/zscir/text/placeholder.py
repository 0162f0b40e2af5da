"""How the pseudo-word ``$`` gets into text: the one place every method, template and fallback uses.

A pseudo-word only works if the text tower sees the placeholder as a token of its own (id 259 in the
CLIP BPE vocabulary), in every prompt. Two things break that silently:

* **Glued to a neighbour.** CLIP's BPE splits text at whitespace and between letters, digits and other
  symbols, but a run of symbols is one piece: ``"$."``, ``"$,"``, ``"$'s"``, ``"($"``, ``"$😀"`` and
  ``"$$"`` are other tokens, not 259. :func:`isolate` gives every ``$`` whitespace on both sides, which
  the tokenizers collapse anyway, so a ``$`` that was already a token of its own tokenises exactly as
  before. (LinCIR's official loader gets the same segmentation by adding ``[$]`` as a special token,
  which the tokenizer splits off before the BPE.)
* **Cut off by the context length.** A prompt that puts ``$`` after the caption (``"{caption}, it
  looks like $"``) loses it when the caption is long. :func:`fit_prompts` shortens the caption, not the
  template, until the whole prompt fits the tokenizer's context; a prompt that fits is left untouched.

:func:`require_placeholders` turns any remaining miss into either a counted, expected loss (the prompt
was longer than the context) or an error (the placeholder was not put into the text properly), and
:class:`MissingPlaceholders` counts composed queries left without a pseudo-word during evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import Tensor

from zscir.backbones.base import PLACEHOLDER

Tokenize = Callable[[Sequence[str]], Tensor]

#: a placeholder directly after / before something that is not whitespace
_GLUED_LEFT = re.compile(rf"(?<=\S){re.escape(PLACEHOLDER)}")
_GLUED_RIGHT = re.compile(rf"{re.escape(PLACEHOLDER)}(?=\S)")
_WORD = re.compile(r"\S+")


def isolate(text: str) -> str:
    """``text`` with a space added on each side of every ``$`` that touches a non-space character.

    The tokenizers of every supported backbone collapse whitespace, so this changes nothing for a ``$``
    that was already a separate word and makes a glued one (``"$."``, ``"$'s"``, ``"($"``) the
    pseudo-word token. Idempotent.
    """
    return _GLUED_RIGHT.sub(PLACEHOLDER + " ", _GLUED_LEFT.sub(" " + PLACEHOLDER, text))


def remove_placeholders(caption: str) -> str:
    """``caption`` with every literal ``$`` removed and whitespace collapsed: a ``$`` written in a training
    caption would otherwise be read as the pseudo-word (LinCIR's official cleaning removes it too)."""
    return " ".join(caption.replace(PLACEHOLDER, " ").split())


def put_placeholder(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """``text`` with each character span ``[start, end)`` replaced by an isolated ``$``.

    Raises:
        ValueError: if spans overlap or leave the text.
    """
    out, last = [], 0
    for start, end in sorted(spans):
        if not last <= start <= end <= len(text):
            raise ValueError(
                f"spans must be disjoint and inside the text of length {len(text)}: {start, end}"
            )
        out += [text[last:start], PLACEHOLDER]
        last = end
    return isolate("".join([*out, text[last:]]))


def fill_template(template: str, caption: str) -> str:
    """``template`` with ``{caption}`` filled in and the template's own ``$`` isolated.

    A ``$`` inside ``caption`` is left as it is (the official evaluation code does not touch captions).
    """
    return isolate(template).format(caption=caption)


def _ends(ids: Tensor, eot: int) -> Tensor:
    """Position [B] of each row's first end-of-text token (after the start token)."""
    return (ids[:, 1:] == eot).int().argmax(dim=1) + 1


def token_lengths(tokenize: Tokenize, texts: Sequence[str], ids: Tensor | None = None) -> list[int]:
    """The untruncated number of tokens of each text, start and end of text included.

    ``tokenize`` truncates to its context ``T`` (the width of its output). A text whose end-of-text
    token lands before the last position is counted from its ids; a text that fills the row is split
    at a whitespace near its middle and the halves are counted (``n(a b) = n(a) + n(b) − 2``): every
    supported tokenizer (CLIP BPE, BERT WordPiece) splits words at whitespace first. A single run
    without whitespace that fills the context is reported as ``T + 1`` (longer than the context).

    Args:
        ids: ``tokenize(texts)`` if the caller has it already.
    """
    if not texts:
        return []
    eot = int(tokenize([""])[0, 1])
    ids = tokenize(list(texts)) if ids is None else ids
    width = ids.shape[1]
    lengths = (_ends(ids, eot) + 1).tolist()
    for i in (ids[:, -1] == eot).nonzero().flatten().tolist():  # a full row: maybe truncated
        if lengths[i] < width:
            continue  # the first end-of-text came earlier (a tokenizer that pads with end-of-text)
        words = list(_WORD.finditer(texts[i]))
        if len(words) < 2:
            lengths[i] = width + 1
            continue
        mid = len(words) // 2
        halves = [texts[i][: words[mid - 1].end()], texts[i][words[mid].start() :]]
        lengths[i] = sum(token_lengths(tokenize, halves)) - 2
    return lengths


def _shorten(tokenize: Tokenize, template: str, caption: str, width: int) -> str:
    """The longest prefix of ``caption`` (whole words; characters of the first word if not even one
    word fits) with which the filled ``template`` fits ``width`` tokens."""

    def fits(cut: int) -> bool:
        return token_lengths(tokenize, [fill_template(template, caption[:cut])])[0] <= width

    if not fits(0):
        raise ValueError(
            f"the prompt template {template!r} alone is longer than the text context ({width} tokens): "
            "use a shorter template"
        )
    words = list(_WORD.finditer(caption))
    cuts = [w.end() for w in words[:-1]]  # the whole caption does not fit
    if not cuts or not fits(cuts[0]):
        cuts = list(range(1, words[0].end())) if words else []
    lo, hi = -1, len(cuts)  # cuts[lo] fits (-1: the empty caption), cuts[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(cuts[mid]) else (lo, mid)
    return fill_template(template, caption[: cuts[lo]] if lo >= 0 else "")


def fit_prompts(tokenize: Tokenize, template: str, captions: Sequence[str]) -> tuple[list[str], Tensor]:
    """Fill ``template`` with each caption so that the whole prompt fits the tokenizer's context.

    A prompt that fits is :func:`fill_template`'s, unchanged. One that does not is cut by the tokenizer
    when the template ends with ``{caption}`` (only the caption loses tokens); otherwise the caption is
    shortened word by word (binary search, lengths by :func:`token_lengths` with ``tokenize`` itself)
    until the template, its ``$`` included, fits after it.

    Args:
        tokenize: the encoder's tokenizer, texts -> ids [B, T] (truncated, end-of-text kept).
        template: a prompt with ``{caption}``, e.g. ``"{caption}, it looks like $"``.

    Returns:
        the prompts and their ids [B, T].

    Raises:
        ValueError: if the template alone is longer than the context.
    """
    prompts = [fill_template(template, c) for c in captions]
    ids = tokenize(prompts)
    if template.rstrip().endswith("{caption}") or not prompts:
        return prompts, ids
    width = ids.shape[1]
    long = [i for i, n in enumerate(token_lengths(tokenize, prompts, ids)) if n > width]
    for i in long:
        prompts[i] = _shorten(tokenize, template, captions[i], width)
    if long:
        ids[long] = tokenize([prompts[i] for i in long])
    return prompts, ids


def require_placeholders(
    tokenize: Tokenize, texts: Sequence[str], ids: Tensor, placeholder_id: int
) -> Tensor:
    """Which rows of ``ids`` (the tokens of ``texts``) hold the placeholder token; [B] bool.

    A row may only lack it because its text is longer than the context.

    Raises:
        ValueError: if a text that fits the context tokenises without the placeholder (its ``$`` was
            glued to a neighbour or never written: put it into text with :func:`put_placeholder`,
            :func:`fill_template` or :func:`isolate`).
    """
    has = (ids == placeholder_id).any(dim=1)
    missing = (~has).nonzero().flatten().tolist()
    lengths = token_lengths(tokenize, [texts[i] for i in missing])
    bad = [texts[i] for i, n in zip(missing, lengths) if n <= ids.shape[1]]
    if bad:
        raise ValueError(
            f"{len(bad)} text(s) fit the context but hold no pseudo-word token {placeholder_id}, e.g. "
            f"{bad[0]!r}: the '$' was glued to a neighbour or is missing"
        )
    return has


class MissingPlaceholders:
    """Counts prompts encoded without a pseudo-word (the query silently became text-only) and reports
    them once: the count and a few example ids."""

    def __init__(self, examples: int = 5):
        self.max_examples = examples
        self.reset()

    def reset(self) -> None:
        self.missing, self.total, self.examples = 0, 0, []

    def add(self, ids: Tensor, placeholder_id: int, query_ids: Sequence | None = None) -> None:
        """Count the rows of ``ids`` [B, T] without ``placeholder_id``; ``query_ids`` name the rows."""
        lost = ~(ids == placeholder_id).any(dim=1)
        self.total += ids.shape[0]
        self.missing += int(lost.sum())
        if query_ids is not None:
            for i in lost.nonzero().flatten().tolist()[: self.max_examples - len(self.examples)]:
                qid = query_ids[i]
                self.examples.append(str(qid.item() if isinstance(qid, Tensor) else qid))

    def report(self) -> str | None:
        """A warning text if any prompt lacked the pseudo-word since the last report (then reset), else None."""
        if not self.missing:
            self.reset()
            return None
        text = (
            f"{self.missing} of {self.total} composed prompts hold no pseudo-word token (their '$' was lost), "
            "so they were encoded as text-only queries"
            + (f"; e.g. queries {', '.join(self.examples)}" if self.examples else "")
        )
        self.reset()
        return text


__all__ = [
    "MissingPlaceholders",
    "fill_template",
    "fit_prompts",
    "isolate",
    "put_placeholder",
    "require_placeholders",
    "token_lengths",
]
