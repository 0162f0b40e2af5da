"""Noun selection for CAM-masked textual inversion: which word of a caption gets masked.

Zhang et al. (arXiv 2406.18836) mask "one noun word" of each caption, chosen at random, and the image
region of that noun. The paper does not say how nouns are found; we use spaCy part-of-speech tags
(``NOUN`` by default, through the project's one loader :func:`zscir.text.nlp.load_spacy`).

Choices made explicit here (all options of :class:`NounSelector`):

* a noun is one spaCy token whose POS is in ``pos`` (compounds such as "plus sign" are not merged; the
  token "sign" is the noun);
* ``exclude``: lower-cased words never chosen (default none: the paper names no stop list);
* ``sampling="fixed"`` draws the noun once per sample from a hash of ``(seed, sample key)``, so every
  epoch masks the same noun and the CAM cache hits from the second epoch on; ``"random"`` draws afresh
  every time (more variety, but the cache only fills gradually);
* ``all_occurrences``: replace only the chosen token (default) or every token of the caption that is the
  same word.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from zscir.text.nlp import load_spacy
from zscir.text.placeholder import put_placeholder

SAMPLING = ("fixed", "random")


@dataclass(frozen=True)
class NounSpan:
    """A noun token of a caption: its text as written and its character offsets."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class NounChoice:
    """The noun chosen in one caption: lower-cased, its character span in the caption, and the caption
    with it replaced by the placeholder."""

    noun: str
    masked_caption: str
    start: int
    end: int


def find_nouns(
    captions: Sequence[str],
    pos: Sequence[str] = ("NOUN",),
    exclude: Sequence[str] = (),
    nlp: object | None = None,
    batch_size: int = 256,
) -> list[list[NounSpan]]:
    """The noun tokens of every caption, in order (one ``nlp.pipe`` pass over the batch).

    Tokens without any letter (spaCy occasionally tags symbols as NOUN) are never nouns.
    """
    nlp = nlp if nlp is not None else load_spacy()
    wanted, skip = set(pos), {w.lower() for w in exclude}
    out = []
    for doc in nlp.pipe(list(captions), batch_size=batch_size):
        out.append(
            [
                NounSpan(t.text, t.idx, t.idx + len(t.text))
                for t in doc
                if t.pos_ in wanted and t.text.lower() not in skip and any(c.isalpha() for c in t.text)
            ]
        )
    return out


def mask_noun(caption: str, nouns: Sequence[NounSpan], chosen: int, all_occurrences: bool = False) -> str:
    """``caption`` with ``nouns[chosen]`` (and, with ``all_occurrences``, every same-word noun) replaced
    by the pseudo-word, kept a token of its own next to punctuation ("a $ ." for "a horse.")."""
    word = nouns[chosen].text.lower()
    spans = [s for s in nouns if s.text.lower() == word] if all_occurrences else [nouns[chosen]]
    return put_placeholder(caption, [(s.start, s.end) for s in spans])


def stable_index(n: int, key: str, seed: int) -> int:
    """A uniform draw in ``[0, n)`` that depends only on ``(seed, key)`` (the same in every epoch and process)."""
    digest = hashlib.sha1(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


class NounSelector:
    """Chooses one noun per caption and masks it; parses are memoised per caption text.

    Args:
        pos: spaCy POS tags that count as nouns.
        exclude: words never chosen (case-insensitive).
        sampling: ``fixed`` (one draw per sample key, stable across epochs) or ``random``.
        all_occurrences: mask every occurrence of the chosen word, not only the drawn token.
        seed: seed of the draws.
        spacy_model: a spaCy pipeline name/path; None = the project default (``en_core_web_sm``).
        max_cached: parses kept in memory (the memo is cleared when it grows past this).
    """

    def __init__(
        self,
        pos: Sequence[str] = ("NOUN",),
        exclude: Sequence[str] = (),
        sampling: str = "fixed",
        all_occurrences: bool = False,
        seed: int = 0,
        spacy_model: str | None = None,
        max_cached: int = 2_000_000,
    ):
        if sampling not in SAMPLING:
            raise ValueError(f"noun sampling must be one of {SAMPLING}, got {sampling!r}")
        self.pos, self.exclude = tuple(pos), tuple(exclude)
        self.sampling, self.all_occurrences, self.seed = sampling, all_occurrences, seed
        self.spacy_model, self.max_cached = spacy_model, max_cached
        self._rng = random.Random(seed)
        self._parses: dict[str, list[NounSpan]] = {}

    def nouns(self, captions: Sequence[str]) -> list[list[NounSpan]]:
        todo = list(dict.fromkeys(c for c in captions if c not in self._parses))
        if todo:
            if len(self._parses) + len(todo) > self.max_cached:
                self._parses.clear()
            nlp = load_spacy(self.spacy_model)
            self._parses.update(zip(todo, find_nouns(todo, self.pos, self.exclude, nlp=nlp)))
        return [self._parses[c] for c in captions]

    def select(self, captions: Sequence[str], keys: Sequence[str] | None = None) -> list[NounChoice | None]:
        """One :class:`NounChoice` per caption, or None for a caption without a noun.

        Args:
            keys: a stable id per sample (the image id); required for ``sampling="fixed"``.
        """
        if self.sampling == "fixed" and keys is None:
            raise ValueError("sampling='fixed' needs a stable key per sample (the image id)")
        out: list[NounChoice | None] = []
        for i, (caption, nouns) in enumerate(zip(captions, self.nouns(captions))):
            if not nouns:
                out.append(None)
                continue
            if self.sampling == "fixed":
                chosen = stable_index(len(nouns), f"{keys[i]}\0{caption}", self.seed)
            else:
                chosen = self._rng.randrange(len(nouns))
            masked = mask_noun(caption, nouns, chosen, all_occurrences=self.all_occurrences)
            span = nouns[chosen]
            out.append(NounChoice(span.text.lower(), masked, span.start, span.end))
        return out
