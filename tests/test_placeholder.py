"""The pseudo-word ``$`` in text: it stays token 259 next to any neighbour (CAM-TI's masked captions,
templates, LinCIR's tokenisation) and survives prompts longer than the context, checked through the real
CLIP tokenizer (OpenAI's ``clip`` package as the reference) and the tiny backbones.

The regression tests at the top import only names that existed before the placeholder helper, so they
run (and fail) on the code before it."""

from __future__ import annotations

import logging

import clip
import open_clip
import pytest
import torch

from zscir.backbones import build_encoder
from zscir.backbones.open_clip_encoder import TINY_ARCHITECTURES, OpenCLIPEncoder
from zscir.methods.cam_ti import CamTI
from zscir.methods.inversion import encode_with_template
from zscir.text.nouns import NounSelector, NounSpan, find_nouns, mask_noun

PLACEHOLDER_ID = 259
TINY = {"kind": "open_clip", "model": "tiny"}
#: what can stand right after a noun, and right before it
RIGHT = [".", ",", ";", ":", "!", "?", "'", "'s", "-", ")", '"', "é", "中", "😀", "$", "\u200b"]
LEFT = ["(", '"', "'", "-", "é", "中", "😀", "$"]
#: a long FashionIQ-like double caption (two relative captions joined with " and ")
LONG = " and ".join(["is a longer sleeveless dress with a floral print and a thin black belt"] * 6)


@pytest.fixture(scope="module")
def bpe():
    """The reference: OpenAI's own CLIP tokenizer, no context limit."""
    return clip.simple_tokenizer.SimpleTokenizer()


def reference_ids(bpe, pieces: list[str]) -> list[int]:
    """Tokens of text pieces joined by the pseudo-word: each piece tokenised on its own and ``$`` as one
    token between them, which is how the official LinCIR loader's added special token ``[$]`` segments
    text (navervision/lincir models.py:35, loader.py:173-193)."""
    out = bpe.encode(pieces[0])
    for piece in pieces[1:]:
        out += [PLACEHOLDER_ID, *bpe.encode(piece)]
    return [49406, *out, 49407]


def content(ids: torch.Tensor) -> list[int]:
    ids = ids.tolist()
    return ids[: ids.index(49407) + 1]


# ---- 1. CAM-TI: the masked noun is token 259 next to any neighbour ------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_masked_noun_is_the_pseudo_word_token_next_to_any_neighbour(bpe, side):
    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    for neighbour in RIGHT if side == "right" else LEFT:
        caption = (
            f"a man riding a horse{neighbour} near the sea"
            if side == "right"
            else f"a man riding a {neighbour}horse near the sea"
        )
        start = caption.index("horse")
        nouns = [NounSpan("man", 2, 5), NounSpan("horse", start, start + 5)]
        masked = mask_noun(caption, nouns, 1)
        expected = reference_ids(bpe, [caption[:start], caption[start + 5 :]])
        assert content(tokenize([masked])[0]) == expected, (neighbour, masked)


def test_every_occurrence_and_real_spacy_nouns_next_to_punctuation_become_token_259(bpe):
    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    captions = ["a man riding a horse.", "the dog's ball, the dog!", '(cat) and "bird"', "a café: 中文 dog😀"]
    selector = NounSelector(sampling="fixed", all_occurrences=True, seed=0)
    for caption, spans in zip(captions, find_nouns(captions)):
        assert spans, caption
        for k in range(len(spans)):
            masked = mask_noun(caption, spans, k, all_occurrences=True)
            ids = content(tokenize([masked])[0])
            word = spans[k].text.lower()
            chosen = sorted((s.start, s.end) for s in spans if s.text.lower() == word)
            pieces, last = [], 0
            for start, end in chosen:
                pieces.append(caption[last:start])
                last = end
            assert ids == reference_ids(bpe, [*pieces, caption[last:]]), masked
            assert ids.count(PLACEHOLDER_ID) == len(chosen)
    for choice in selector.select(captions, [str(i) for i in range(len(captions))]):
        assert PLACEHOLDER_ID in tokenize([choice.masked_caption])[0].tolist(), choice.masked_caption


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_cam_ti_keeps_queries_whose_noun_touches_punctuation_and_counts_every_drop(pixels):
    method = CamTI(backbone=TINY, config={"kind": "cam_ti", "phi_dropout": 0.0})
    method.train()
    captions = ["a large red circle.", "red and blue", "two small squares!", "a tiny triangle, left"]
    batch = {"pixels": pixels, "index": torch.arange(4), "key": list("abcd"), "caption": captions}
    terms = method.losses(batch)
    assert terms["noun_fraction"].item() == pytest.approx(0.75)
    assert terms["truncated_fraction"].item() == 0.0
    assert terms["blank_fraction"].item() == 0.0
    assert terms["dropped_fraction"].item() == pytest.approx(0.25)  # "red and blue": no noun
    assert terms["query_target"].item() > 0.0
    # a flat CAM hides every image (tau 1.0 > every min-max normalised value): all three are dropped
    method.cfg.tau = 1.0
    blank = method.losses(batch)
    assert blank["noun_fraction"].item() == pytest.approx(0.75)
    assert blank["blank_fraction"].item() == pytest.approx(0.75)
    assert blank["dropped_fraction"].item() == pytest.approx(1.0)


def test_cam_ti_counts_a_placeholder_beyond_the_context_as_truncated(pixels):
    method = CamTI(backbone=TINY, config={"kind": "cam_ti", "phi_dropout": 0.0})
    long = "one two three four five six seven eight nine ten eleven twelve " * 3 + "and a red circle"
    batch = {"pixels": pixels, "index": torch.arange(4), "key": list("abcd"), "caption": [long] * 4}
    terms = method.losses(batch)
    assert terms["noun_fraction"].item() == 1.0  # every caption has a noun ...
    assert terms["truncated_fraction"].item() == 1.0  # ... beyond the 32-token context of the tiny model
    assert terms["dropped_fraction"].item() == 1.0
    assert terms["query_target"].item() == 0.0


# ---- 2. the pseudo-word of a template survives a long caption ---------------------------------------
def _tiny_with_context(context_length: int) -> OpenCLIPEncoder:
    arch = {**TINY_ARCHITECTURES["tiny"]}
    arch["text_cfg"] = {**arch["text_cfg"], "context_length": context_length}
    torch.manual_seed(0)
    model = open_clip.CLIP(**arch)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    return OpenCLIPEncoder(model, tokenizer, open_clip.image_transform(64, is_train=False), "tiny").eval()


@pytest.mark.parametrize("context_length", [32, 77])
def test_a_template_ending_in_the_pseudo_word_keeps_it_after_a_long_caption(context_length):
    encoder = build_encoder(**TINY) if context_length == 32 else _tiny_with_context(77)
    assert encoder.context_length == context_length
    template = "{caption}, it looks like $"
    pseudo = torch.randn(2, encoder.token_dim, generator=torch.Generator().manual_seed(1))
    captions = [LONG, "is red"]
    with torch.no_grad():
        composed = encode_with_template(encoder, pseudo, captions, template)
        text_only = encoder.encode_text(encoder.tokenize([template.format(caption=c) for c in captions]))
    assert not torch.allclose(composed[0], text_only[0], atol=1e-4)  # the long query is not text-only
    assert not torch.allclose(composed[1], text_only[1], atol=1e-4)


@pytest.mark.parametrize("context_length", [32, 77])
def test_fitted_prompts_are_the_template_around_a_word_prefix_of_the_caption(bpe, context_length):
    from zscir.text.placeholder import fit_prompts

    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    template = "{caption}, it looks like $"
    short = "is red"
    prompts, ids = fit_prompts(tokenize, template, [LONG, short])
    # short: untouched, and tokenised as OpenAI's clip.tokenize does
    assert prompts[1] == template.format(caption=short)
    assert torch.equal(ids[1], clip.tokenize([prompts[1]], context_length=context_length)[0].to(ids.dtype))
    # long: the longest whole-word prefix of the caption with which the template still fits
    words = LONG.split()
    lengths = [
        len(bpe.encode(template.format(caption=" ".join(words[:k])))) + 2 for k in range(len(words) + 1)
    ]
    assert lengths[-1] > context_length
    k = max(k for k, n in enumerate(lengths) if n <= context_length)
    assert prompts[0] == template.format(caption=" ".join(words[:k]))
    assert content(ids[0])[-3:] == [*bpe.encode("like"), PLACEHOLDER_ID, 49407]
    assert torch.equal(ids[0], clip.tokenize([prompts[0]], context_length=context_length)[0].to(ids.dtype))


def test_a_prompt_that_exactly_fills_the_context_is_left_alone(bpe):
    from zscir.text.placeholder import fit_prompts

    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    template = "{caption} $"
    caption = " ".join(["red"] * 29)  # 1 + 29 + 1 ($) + 1 = 32 tokens
    assert len(bpe.encode(template.format(caption=caption))) + 2 == 32
    prompts, ids = fit_prompts(tokenize, template, [caption, caption + " red"])
    assert prompts[0] == template.format(caption=caption)
    assert prompts[1] == template.format(caption=caption)  # one word too many: that word goes
    assert ids[0, -2].item() == PLACEHOLDER_ID


def test_templates_ending_with_the_caption_are_truncated_by_the_tokenizer_as_before():
    from zscir.text.placeholder import fit_prompts

    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    template = "a photo of $ that {caption}"
    prompts, ids = fit_prompts(tokenize, template, [LONG])
    assert prompts == [template.format(caption=LONG)]
    assert torch.equal(ids, clip.tokenize(prompts, context_length=32, truncate=True).to(ids.dtype))


def test_a_glued_template_placeholder_is_isolated_and_a_too_long_template_is_refused():
    from zscir.text.placeholder import fill_template, fit_prompts

    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    assert PLACEHOLDER_ID in tokenize([fill_template("a photo of $, {caption}", "red")])[0].tolist()
    assert PLACEHOLDER_ID not in tokenize(["a photo of $, red"])[0].tolist()  # what it guards against
    with pytest.raises(ValueError, match="template"):
        fit_prompts(tokenize, " ".join(["word"] * 40) + " {caption} $", ["red"])


def test_a_whitespace_free_caption_is_cut_by_characters():
    from zscir.text.placeholder import fit_prompts

    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    prompts, ids = fit_prompts(tokenize, "{caption}, $", ["中" * 60])
    assert PLACEHOLDER_ID in ids[0].tolist()
    assert prompts[0].startswith("中")
    assert prompts[0].endswith(", $")


# ---- token counting is exact -----------------------------------------------------------------------
def test_token_lengths_equal_the_reference_count_beyond_the_context(bpe):
    from zscir.text.placeholder import token_lengths

    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    gen = torch.Generator().manual_seed(0)
    words = ["a", "man", "horse.", "it's", "(red)", '"blue"', "café", "中文", "😀", "well-known!", "$", "  "]
    texts = [
        " ".join(words[i] for i in torch.randint(len(words), (n,), generator=gen)) for n in range(0, 60, 3)
    ]
    assert token_lengths(tokenize, texts) == [len(bpe.encode(t)) + 2 for t in texts]
    assert token_lengths(tokenize, ["x" * 200]) == [17]  # one run without whitespace: "longer than 16"


def test_token_lengths_with_a_bert_tokenizer():
    from transformers import BertTokenizer

    from zscir.backbones.hf_blip_encoder import tiny_tokenizer
    from zscir.text.placeholder import fit_prompts, token_lengths

    bert: BertTokenizer = tiny_tokenizer()

    def tokenize(texts):
        return bert(list(texts), padding="max_length", truncation=True, max_length=12, return_tensors="pt")[
            "input_ids"
        ]

    texts = ["a red dog.", "a b c d e f g h i j k l m n o p, q $ r", "a, b; c: d! " * 5]
    assert token_lengths(tokenize, texts) == [len(bert.tokenize(t)) + 2 for t in texts]
    _, ids = fit_prompts(tokenize, "{caption} looks like $", ["a b c d e f g h i j k"])
    assert bert.convert_tokens_to_ids("$") in ids[0].tolist()


# ---- the checks ------------------------------------------------------------------------------------
def test_a_fitting_text_without_token_259_is_an_error_and_a_long_one_is_reported():
    from zscir.text.placeholder import require_placeholders

    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    texts = ["a photo of $", "a photo of $."]
    with pytest.raises(ValueError, match="glued"):
        require_placeholders(tokenize, texts, tokenize(texts), PLACEHOLDER_ID)
    texts = ["a photo of $", " ".join(["red"] * 20) + " $"]
    assert require_placeholders(tokenize, texts, tokenize(texts), PLACEHOLDER_ID).tolist() == [True, False]


def test_lincir_tokenisation_keeps_glued_placeholders_and_the_official_spacing():
    from zscir.text.keywords import placeholder_ids

    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    masked = ["a $.", "$'s $-shaped ($)", "$😀 $中", "$$"]
    ids, fell_back = placeholder_ids(tokenize, masked, PLACEHOLDER_ID)
    assert not fell_back.any()
    # the spacing LinCIR used so far: " $ " everywhere; same tokens
    assert torch.equal(ids, tokenize([t.replace("$", " $ ") for t in masked]))


def test_missing_pseudo_words_are_counted_and_reported_once(caplog):
    from zscir.text.placeholder import MissingPlaceholders

    encoder = build_encoder(**TINY)
    template = " ".join(["word"] * 35) + " $ that {caption}"  # the template's own $ is past the context
    pseudo = torch.zeros(3, encoder.token_dim)
    counter = MissingPlaceholders()
    with torch.no_grad():
        encode_with_template(encoder, pseudo, ["a", "b", "c"], template, counter, ["q1", "q2", "q3"])
        encode_with_template(encoder, pseudo[:1], ["d"], "a photo of $ that {caption}", counter, ["q4"])
    report = counter.report()
    assert report.startswith("3 of 4 composed prompts")
    assert "q1, q2, q3" in report
    assert counter.report() is None  # reset after reporting
    with caplog.at_level(logging.WARNING), torch.no_grad():
        encode_with_template(encoder, pseudo[:1], ["a"], template)  # no counter: logged at once
    assert "1 of 1 composed prompts" in caplog.text


class _Metric:
    """Stands in for BenchmarkMetric: records the query rows it is given."""

    features = None

    def __init__(self):
        self.rows = []

    def update(self, kind, index, feats):
        self.rows += index.tolist()

    def compute(self):
        return {}

    def reset(self):
        pass


def test_an_evaluation_warns_once_with_the_count_and_benchmark_query_ids(caplog):
    from types import SimpleNamespace

    from zscir.methods.lincir import LinCIR

    template = " ".join(["word"] * 35) + " $ that {caption}"  # the $ lies past the 32-token context
    method = LinCIR(backbone={"name": "tiny", **TINY}, config={"kind": "lincir", "template": template})
    method.eval()
    queries = [SimpleNamespace(query_id=str(100 + i)) for i in range(3)]
    method.evaluation.benchmarks, method.evaluation.metrics = (
        [SimpleNamespace(name="cirr", queries=queries, query_rule=None)],
        [_Metric()],
    )
    batch = {
        "index": torch.tensor([2, 0]),
        "pixels": torch.randn(2, 3, 64, 64),
        "texts": [["is red", "is blue"]],
    }
    with caplog.at_level(logging.WARNING), torch.no_grad():
        method._query_step(batch, 0)
        method._query_step({"index": torch.tensor([1]), "pixels": batch["pixels"][:1], "texts": [["x"]]}, 0)
        assert "composed prompts" not in caplog.text  # nothing before the evaluation ends
        method._finish_eval("val")
        method._finish_eval("val")
    warnings = [r.getMessage() for r in caplog.records if "composed prompts" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("3 of 3 composed prompts")
    assert "cirr:102, cirr:100, cirr:101" in warnings[0]
