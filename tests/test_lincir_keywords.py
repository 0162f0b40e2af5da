"""LinCIR's self-masking on hand-made sentences: keyword runs (real spaCy en_core_web_sm), replacement,
fallbacks, clean-up and tokenisation — checked against a verbatim transcription of the official loop."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from zscir.text.keywords import (
    FALLBACK_PROMPT,
    clean_caption,
    clip_bpe,
    keyword_runs,
    mask_keywords,
    placeholder_ids,
)
from zscir.text.nlp import load_spacy

PLACEHOLDER_ID = 259


@pytest.fixture(scope="module")
def nlp():
    return load_spacy()


def official_mask(caption: str, keywords: list[str], rng: random.Random) -> str:
    """The keyword loop of navervision/lincir ``loader.py`` (``CaptionDataset.__getitem__``), transcribed,
    with its ``[$]`` special token written as ``$``."""
    replaced_caption = caption
    if len(keywords) == 0:
        keywords = [""]
    for keyword in keywords:
        if keyword != "" and keyword in caption:
            replaced_caption = replaced_caption.replace(keyword, "$")
        else:
            tmp_keywords = caption.split(" ")
            if len(tmp_keywords) > 0:
                selected_keywords = rng.sample(tmp_keywords, k=min(int(len(tmp_keywords) * 1.0), 1))
                for selected_keyword in selected_keywords:
                    replaced_caption = replaced_caption.replace(selected_keyword, "$")
            break
    return replaced_caption


def tokens(*pairs: tuple[str, str]) -> list[SimpleNamespace]:
    return [SimpleNamespace(text=t, pos_=p) for t, p in pairs]


def test_runs_are_maximal_and_joined_with_spaces():
    doc = tokens(
        ("a", "DET"), ("big", "ADJ"), ("dog", "NOUN"), ("runs", "VERB"), ("to", "ADP"), ("Paris", "PROPN")
    )
    assert keyword_runs(doc) == ["a big dog", "Paris"]
    assert keyword_runs(tokens(("runs", "VERB"), ("fast", "ADV"))) == []
    assert keyword_runs(doc, pos=("NOUN",)) == ["dog"]


@pytest.mark.parametrize(
    ("sentence", "runs"),
    [
        ("a big red dog runs across the green field", ["a big red dog", "the green field"]),
        ("john smith plays the blue guitar in new york", ["john smith", "the blue guitar", "new york"]),
        ("the very tall man stands there", ["the", "tall man"]),
        ("she runs quickly", []),
    ],
)
def test_keyword_runs_with_spacy(nlp, sentence, runs):
    assert keyword_runs(nlp(sentence)) == runs


def test_every_occurrence_of_every_keyword_is_replaced(nlp):
    caption = "a big red dog runs across the green field"
    assert mask_keywords(caption, keyword_runs(nlp(caption))) == "$ runs across $"


def test_substring_replacement_hits_the_inside_of_there_and_whole_word_does_not(nlp):
    caption = "the very tall man stands there"
    keywords = keyword_runs(nlp(caption))
    assert keywords == ["the", "tall man"]
    assert mask_keywords(caption, keywords) == "$ very $ stands $re"  # the official str.replace
    assert mask_keywords(caption, keywords, whole_word=True) == "$ very $ stands there"


def test_repeated_keywords_replace_every_occurrence_in_official_order(nlp):
    caption = "two dogs play with a ball and the dogs are happy"
    keywords = keyword_runs(nlp(caption))
    assert keywords == ["dogs", "a ball", "the dogs", "happy"]
    # "dogs" goes first, everywhere; "the dogs" is then found in the original caption but no longer in the
    # masked one, so "the" survives
    assert mask_keywords(caption, keywords) == "two $ play with $ and the $ are $"
    assert mask_keywords("a cube and a cube", ["a cube", "a cube"]) == "$ and $"


def test_no_keyword_replaces_one_random_word(nlp):
    caption = "she runs quickly"
    assert keyword_runs(nlp(caption)) == []
    seen = set()
    for seed in range(20):
        masked = mask_keywords(caption, [], random.Random(seed))
        assert masked.count("$") == 1
        assert masked.split(" ") != caption.split(" ")
        assert len(masked.split(" ")) == 3
        seen.add(masked)
    assert seen == {"$ runs quickly", "she $ quickly", "she runs $"}


def test_a_keyword_missing_from_the_caption_falls_back_and_stops():
    # spaCy's text can differ from the caption (e.g. re-joined tokens); the official loop then masks one
    # random word (all its occurrences) and ignores the remaining keywords
    caption = "a red cube next to blue things"
    keywords = ["a red cube", "absent", "blue things"]
    outcomes = {mask_keywords(caption, keywords, random.Random(seed)) for seed in range(40)}
    # the random word is one of the caption's 7; "a", "red", "cube" are already masked away
    assert outcomes == {
        "$ next to blue things",
        "$ $ to blue things",
        "$ next $ blue things",
        "$ next to $ things",
        "$ next to blue $",
    }
    for seed in range(10):
        assert mask_keywords(caption, keywords, random.Random(seed)) == official_mask(
            caption, keywords, random.Random(seed)
        )


def test_empty_caption_becomes_the_placeholder():
    assert mask_keywords("", []) == "$"


@pytest.mark.parametrize(
    "caption",
    [
        "a big red dog runs across the green field",
        "the very tall man stands there",
        "two dogs play with a ball and the dogs are happy",
        "she runs quickly",
        "a t-shirt with a red logo",
        "i don't like the t-shirt",
        "look at that",
    ],
)
def test_substring_mode_equals_the_official_loop(nlp, caption):
    keywords = keyword_runs(nlp(caption))
    for seed in range(5):
        assert mask_keywords(caption, keywords, random.Random(seed)) == official_mask(
            caption, keywords, random.Random(seed)
        )


def test_clean_up_as_coded():
    assert clean_caption("  <PERSON> Buys $5 Apples  ") == "person buys 5 apples"
    assert clean_caption(None) == ""


def test_long_captions_are_cut_to_the_context():
    bpe = clip_bpe(16)
    caption = " ".join(["red"] * 10 + ["blue"] * 10)
    cleaned = clean_caption(caption, bpe, context_length=16)
    assert cleaned == " ".join(["red"] * 10 + ["blue"] * 4)  # 14 tokens + start + end = 16
    assert clean_caption("a short one", bpe, context_length=16) == "a short one"


def test_placeholders_stay_single_tokens_next_to_punctuation():
    bpe = clip_bpe(16)
    # "$." is one BPE word that is not token 259; spacing keeps "$" the placeholder, as "[$]" is officially
    assert PLACEHOLDER_ID not in bpe(["a photo of $."])[0].tolist()
    ids, fell_back = placeholder_ids(bpe, ["a photo of $.", "$'s red l$rge"], PLACEHOLDER_ID)
    assert (ids == PLACEHOLDER_ID).sum(dim=1).tolist() == [1, 2]
    assert not fell_back.any()


def test_a_placeholder_cut_off_by_truncation_falls_back_to_a_photo_of():
    bpe = clip_bpe(8)
    ids, fell_back = placeholder_ids(bpe, ["one two three four five six seven $", "$ red"], PLACEHOLDER_ID)
    assert fell_back.tolist() == [True, False]
    assert ids[0].tolist() == bpe([FALLBACK_PROMPT.replace("$", " $ ")])[0].tolist()
    assert (ids[0] == PLACEHOLDER_ID).sum() == 1


#: captions whose parts of speech depend on the dependency parse: en_core_web_sm's attribute_ruler maps
#: tags to POS with DEP conditions (a DT that is not a determiner -> PRON, an auxiliary -> AUX/VERB)
PARSE_DEPENDENT = [
    "this is a red car",
    "there is a cat on the mat",
    "the man does his homework",
    "a dog that is running on the beach",
    "which one is better, the blue or the green one?",
]


def test_loaded_pipeline_tags_like_the_full_official_pipeline(nlp):
    """The pipeline zscir loads (components POS does not need switched off) gives every token the POS
    the full ``en_core_web_sm`` gives (the official loader runs all of it). The parser must stay: without
    it, "this is a red car" tags "this" DET (a keyword) instead of PRON."""
    from zscir.data.synthetic import world

    full = load_spacy(None, disable=())  # every component, as the official loader runs it
    rng = random.Random(0)
    sample = PARSE_DEPENDENT + [world.caption(world.sample_scene(rng), rng) for _ in range(40)]
    for caption in sample:
        assert [t.pos_ for t in nlp(caption)] == [t.pos_ for t in full(caption)], caption
    with full.select_pipes(disable=["parser"]):
        assert full("this is a red car")[0].pos_ == "DET"
    assert nlp("this is a red car")[0].pos_ == "PRON"


def test_parallel_cache_build_gives_the_same_keywords(tmp_path):
    from zscir.data.keyword_cache import KeywordCache, KeywordSettings, spacy_processes
    from zscir.data.text_corpora import MemorySource
    from zscir.text.keywords import KEYWORD_POS

    captions = PARSE_DEPENDENT * 20
    entries = [
        KeywordCache(KeywordSettings(77, KEYWORD_POS), tmp_path / str(n), n_process=n).build(
            MemorySource(captions, "t")
        )
        for n in (1, 2)
    ]
    assert [entries[0].keywords[i] for i in range(len(captions))] == [
        entries[1].keywords[i] for i in range(len(captions))
    ]
    assert spacy_processes(0, 10) == 1
    assert spacy_processes(3, 10) == 3
    with pytest.raises(ValueError, match="n_process"):
        spacy_processes(-1, 10)
