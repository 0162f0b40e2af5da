"""LinCIR's self-masking of captions: keyword runs found by spaCy, replaced by the pseudo-word ``$``.

Transcribed from the official loader (https://github.com/navervision/lincir ``loader.py``; summary in
``docs/methods.md``, LinCIR); every deviation is an option or is noted where it happens.

* :func:`clean_caption`: ``None`` → ``""``, ``<PERSON>`` → ``person``, lowercase, drop ``$``, strip, and cut
  captions longer than the text context to its first ``context_length − 2`` BPE tokens.
* :func:`keyword_runs`: every maximal run of consecutive tokens whose part of speech is NOUN, PROPN, ADJ
  or DET, joined with single spaces ("a big red triangle").
* :func:`mask_keywords`: every occurrence of every keyword becomes ``$`` — by Python substring replace
  as coded (so a lone "the" also hits "there"), or only where it stands as whole words
  (``whole_word=True``). If a keyword is empty or not found in the caption, one random word is replaced
  instead and the remaining keywords are skipped (the official fallback).
* :func:`placeholder_ids`: tokenisation that keeps every ``$`` a token of its own (through
  :mod:`zscir.text.placeholder`); a masked caption whose ``$`` fell off the end of the context becomes
  the fallback prompt ``"a photo of $"``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence

from torch import Tensor

from zscir.backbones.base import PLACEHOLDER
from zscir.text.placeholder import isolate, require_placeholders

#: the parts of speech whose runs LinCIR masks (``extract_keywords_spacy`` in the official loader)
KEYWORD_POS = ("NOUN", "PROPN", "ADJ", "DET")
#: what a masked caption becomes when truncation left no ``$`` in it
FALLBACK_PROMPT = "a photo of $"


def clip_bpe(context_length: int = 77):  # noqa: ANN201 - open_clip's SimpleTokenizer
    """The CLIP BPE tokenizer (shared by OpenAI CLIP, open_clip and HF CLIP) at ``context_length``."""
    import open_clip

    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def clean_caption(caption: str | None, bpe: object | None = None, context_length: int = 77) -> str:
    """The official caption clean-up.

    Args:
        caption: raw caption (``None`` is treated as empty, as the official code does).
        bpe: a CLIP BPE tokenizer with ``encode``/``decode`` (:func:`clip_bpe`); None skips truncation.
        context_length: text context of the backbone; longer captions keep their first
            ``context_length − 2`` tokens (start and end of text take the other two), decoded back to text.
    """
    caption = "" if caption is None else caption
    caption = caption.replace("<PERSON>", "person")  # Conceptual Captions' anonymised names
    caption = caption.lower().replace(PLACEHOLDER, "").strip()
    if bpe is not None:
        tokens = bpe.encode(caption)
        if len(tokens) + 2 > context_length:
            caption = bpe.decode(tokens[: context_length - 2]).strip()
    return caption


def keyword_runs(doc: Iterable, pos: Sequence[str] = KEYWORD_POS) -> list[str]:
    """Maximal runs of consecutive tokens with ``token.pos_`` in ``pos``, each joined with single spaces."""
    runs, current = [], []
    for token in doc:
        if token.pos_ in pos:
            current.append(token.text)
        elif current:
            runs.append(" ".join(current))
            current = []
    if current:
        runs.append(" ".join(current))
    return runs


def extract_keywords(
    captions: Sequence[str],
    nlp: object | None = None,
    pos: Sequence[str] = KEYWORD_POS,
    batch_size: int = 256,
    n_process: int = 1,
) -> list[list[str]]:
    """Keyword runs of every caption, parsed in batches with ``nlp.pipe`` (``n_process`` > 1: in parallel).

    ``nlp`` defaults to :func:`zscir.text.nlp.load_spacy` (``en_core_web_sm``, the official model).
    """
    if nlp is None:
        from zscir.text.nlp import load_spacy

        nlp = load_spacy()
    docs = nlp.pipe(captions, batch_size=batch_size, n_process=n_process)
    return [keyword_runs(doc, pos) for doc in docs]


def _whole_word(keyword: str) -> re.Pattern:
    # a keyword begins and ends with word characters or punctuation; "whole" = not glued to a letter/digit
    return re.compile(rf"(?<!\w){re.escape(keyword)}(?!\w)")


def _replace(text: str, keyword: str, whole_word: bool) -> str:
    if whole_word:
        return _whole_word(keyword).sub(lambda _: PLACEHOLDER, text)
    return text.replace(keyword, PLACEHOLDER)


def _contains(text: str, keyword: str, whole_word: bool) -> bool:
    return bool(_whole_word(keyword).search(text)) if whole_word else keyword in text


def mask_keywords(
    caption: str,
    keywords: Sequence[str],
    rng: random.Random | None = None,
    whole_word: bool = False,
) -> str:
    """``caption`` with every occurrence of every keyword replaced by ``$`` (official order and fallback).

    Keywords are replaced in order; each is looked up in the *original* caption and replaced in the
    partly masked one, as coded. The first keyword that is empty or absent from the caption triggers the
    fallback (one random word of the caption replaced, in all its occurrences) and ends the loop. No
    keyword at all triggers the fallback directly.

    One deliberate deviation: the random word is drawn from the non-empty words. The official
    ``caption.split(' ')`` can yield ``''`` (double spaces), and ``str.replace('', '$')`` would put a
    ``$`` between every two characters.
    """
    rng = rng if rng is not None else random
    masked = caption
    for keyword in keywords or [""]:
        if keyword != "" and _contains(caption, keyword, whole_word):
            masked = _replace(masked, keyword, whole_word)
            continue
        words = [w for w in caption.split(" ") if w]
        if not words:  # empty caption: official ''.replace('', '[$]') gives the placeholder alone
            return PLACEHOLDER
        (word,) = rng.sample(words, k=1)
        masked = _replace(masked, word, whole_word)
        break
    return masked


def placeholder_ids(
    tokenize: Callable[[Sequence[str]], Tensor],
    masked: Sequence[str],
    placeholder_id: int,
    fallback: str = FALLBACK_PROMPT,
) -> tuple[Tensor, Tensor]:
    """Token ids of the masked captions, with rows that lost every ``$`` to truncation replaced by the
    tokens of ``fallback``.

    Every ``$`` is first isolated (:func:`zscir.text.placeholder.isolate`), so the CLIP BPE keeps it one
    token (id 259) next to punctuation ("$." alone would be another token), as the official added
    special token ``[$]`` is.

    Returns:
        ids [B, T] and ``fell_back`` [B] (bool; the official code logs its complement as the
        "preproc rate").

    Raises:
        ValueError: if a masked caption that fits the context tokenises without the placeholder.
    """
    texts = [isolate(t) for t in masked]
    ids = tokenize(texts)
    fell_back = ~require_placeholders(tokenize, texts, ids, placeholder_id)
    if fell_back.any():
        ids[fell_back] = tokenize([isolate(fallback)])[0]
    return ids, fell_back
