"""Training samples for LinCIR's self-masking projection: (cleaned caption, caption with its keywords
replaced by ``$``), tokenised in the collate function.

Two ways to get the keywords, both callable so they can be compared (``make bench``, ``lincir_step``):

* from the keyword cache (default): spaCy parsed every caption once, ahead of training
  (:class:`~zscir.data.keyword_cache.KeywordCache`); the loader only does string replacement;
* ``cache=False``: spaCy parses each caption in ``__getitem__``, every time it is drawn — what the
  official loader does.

The random-word fallback is drawn afresh each time a caption is drawn, in both cases (as coded).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from zscir.data.keyword_cache import KeywordCache, KeywordEntry, KeywordSettings
from zscir.data.text_corpora import CaptionSource, MemorySource, StreamingSamples, load_captions
from zscir.text.keywords import (
    FALLBACK_PROMPT,
    KEYWORD_POS,
    clean_caption,
    clip_bpe,
    keyword_runs,
    mask_keywords,
    placeholder_ids,
)


@dataclass
class KeywordOptions:
    """How LinCIR finds and masks keywords, and where their cache lives."""

    #: parts of speech whose maximal runs are keywords
    pos: list[str] = field(default_factory=lambda: list(KEYWORD_POS))
    #: replace keywords only as whole words (False: Python substring replace, as the official code)
    whole_word: bool = False
    #: spaCy pipeline name or path (None: en_core_web_sm through zscir.text.nlp.load_spacy)
    spacy_model: str | None = None
    #: parse ahead of training into the keyword cache (False: spaCy in the data loader, as the official code)
    cache: bool = True
    #: folder of the keyword cache (None: next to each corpus file)
    cache_dir: str | None = None
    #: nlp.pipe batch size and worker processes when building the cache (0: every core for large corpora)
    batch_size: int = 256
    n_process: int = 0


class CachedSelfMasking(Dataset):
    """``{"index", "caption", "masked"}`` from cleaned captions and their cached keywords."""

    def __init__(self, entry: KeywordEntry, whole_word: bool = False):
        self.entry, self.whole_word = entry, whole_word

    def __len__(self) -> int:
        return len(self.entry)

    def lengths(self) -> np.ndarray:
        """[N] byte length of every cleaned caption (for length buckets)."""
        return self.entry.captions.lengths()

    def __getitem__(self, i: int) -> dict:
        caption = self.entry.captions[i]
        masked = mask_keywords(caption, self.entry.keywords[i], random, self.whole_word)
        return {"index": i, "caption": caption, "masked": masked}


class ParsingSelfMasking(Dataset):
    """``{"index", "caption", "masked"}`` from raw captions, cleaning and parsing each one when drawn
    (the official ``CaptionDataset``)."""

    def __init__(self, captions: Sequence[str], settings: KeywordSettings, whole_word: bool = False):
        self.captions, self.settings, self.whole_word = captions, settings, whole_word
        self._bpe = clip_bpe(settings.context_length)

    def __len__(self) -> int:
        return len(self.captions)

    def lengths(self) -> np.ndarray:
        """[N] byte length of every raw caption (for length buckets)."""
        return self.captions.lengths()

    def __getitem__(self, i: int) -> dict:
        return {"index": i, **parse_and_mask(self.captions[i], self.settings, self._bpe, self.whole_word)}


def parse_and_mask(caption: str, settings: KeywordSettings, bpe: object, whole_word: bool) -> dict:
    """Clean, parse with spaCy (loaded once per process) and mask one caption."""
    from zscir.text.nlp import load_spacy

    caption = clean_caption(caption, bpe, settings.context_length)
    keywords = keyword_runs(load_spacy(settings.spacy_model)(caption), settings.pos)
    return {"caption": caption, "masked": mask_keywords(caption, keywords, random, whole_word)}


class SelfMasking:
    """Builds LinCIR's training datasets and collates their batches.

    Args:
        options: :class:`KeywordOptions`.
        context_length: the text tower's context (captions are cleaned and truncated to it).
        placeholder_id: token id of ``$`` (259 in the CLIP BPE vocabulary).
        fallback_prompt: what a masked caption becomes when truncation dropped every ``$``.
        tokenizer: CLIP BPE tokenizer called on a list of texts (default: ``clip_bpe(context_length)``).
    """

    #: LinCIR trains on text alone (``zscir.data.loaders.TrainingSamples``)
    data_kinds = ("text",)

    def __init__(
        self,
        options: KeywordOptions,
        context_length: int,
        placeholder_id: int,
        fallback_prompt: str = FALLBACK_PROMPT,
        tokenizer: object | None = None,
    ):
        self.options, self.placeholder_id, self.fallback_prompt = options, placeholder_id, fallback_prompt
        self.settings = KeywordSettings(context_length, tuple(options.pos), options.spacy_model)
        self.tokenizer = tokenizer if tokenizer is not None else clip_bpe(context_length)

    def keyword_cache(self) -> KeywordCache:
        o = self.options
        return KeywordCache(self.settings, o.cache_dir, batch_size=o.batch_size, n_process=o.n_process)

    def dataset(self, sources: Sequence[CaptionSource | MemorySource]) -> Dataset:
        """A map-style dataset over every caption of ``sources``."""
        if self.options.cache:
            return CachedSelfMasking(self.keyword_cache().get_all(sources), self.options.whole_word)
        return ParsingSelfMasking(load_captions(sources), self.settings, self.options.whole_word)

    def stream(self, sources: Sequence[CaptionSource], shuffle_buffer: int, seed: int) -> StreamingSamples:
        """An endless stream over ``sources`` (for corpora larger than memory). With the cache, every
        file's entry is built first, then each reader loads one file's entry at a time."""
        if self.options.cache:
            cache = self.keyword_cache()
            for source in sources:
                cache.get(source)  # build missing entries now, not inside the workers
            return StreamingSamples(
                sources, _CachedSource(cache, self.options.whole_word), shuffle_buffer, seed
            )
        return StreamingSamples(
            sources, _ParsedSource(self.settings, self.options.whole_word), shuffle_buffer, seed
        )

    def collate(self, items: list[dict]) -> dict:
        """Strings -> token ids: ``ids`` (cleaned captions), ``masked_ids`` (``$`` = placeholder id) and
        ``fell_back`` (rows that became the fallback prompt)."""
        captions = [it["caption"] for it in items]
        masked = [it["masked"] for it in items]
        masked_ids, fell_back = placeholder_ids(
            self.tokenizer, masked, self.placeholder_id, self.fallback_prompt
        )
        return {
            "index": torch.tensor([it["index"] for it in items]),
            "caption": captions,
            "masked": masked,
            "ids": self.tokenizer(captions),
            "masked_ids": masked_ids,
            "fell_back": fell_back,
        }


class _CachedSource:
    """Samples of one file from its cache entry (picklable, for DataLoader workers)."""

    def __init__(self, cache: KeywordCache, whole_word: bool):
        self.cache, self.whole_word = cache, whole_word

    def __call__(self, position: int, source: CaptionSource) -> Iterator[dict]:
        entry, base = self.cache.get(source), position << 32
        for i in range(len(entry)):
            caption = entry.captions[i]
            yield {
                "index": base + i,
                "caption": caption,
                "masked": mask_keywords(caption, entry.keywords[i], random, self.whole_word),
            }


class _ParsedSource:
    """Samples of one file, parsed with spaCy as they are read (the official behaviour)."""

    def __init__(self, settings: KeywordSettings, whole_word: bool):
        self.settings, self.whole_word = settings, whole_word

    def __call__(self, position: int, source: CaptionSource) -> Iterator[dict]:
        bpe, base = clip_bpe(self.settings.context_length), position << 32
        for i, caption in enumerate(source.read()):
            yield {"index": base + i, **parse_and_mask(caption, self.settings, bpe, self.whole_word)}
