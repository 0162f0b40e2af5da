"""``Encoder.encode_text_with_pseudo(occurrences="first")`` replaces only each row's first placeholder
(SEARLE, Pic2Word at evaluation); ``"all"`` (the default, LinCIR) replaces every one. The full-size
comparison with SEARLE's own code is in tests/parity/test_openai_clip_parity.py."""

import pytest
import torch

from zscir.backbones import build_encoder


@pytest.fixture(scope="module", params=["open_clip", "hf_clip", "hf_blip"])
def encoder(request):
    return build_encoder(kind=request.param, model="tiny")


def test_first_occurrence_only(encoder):
    ids = encoder.tokenize(["a photo of $ that is red", "$ and $ on the left", "no placeholder here"])
    pid = encoder.placeholder_id
    pseudo = torch.randn(3, encoder.token_dim, generator=torch.Generator().manual_seed(0))
    # expected: mark each row's first placeholder with an id found nowhere else, replace "all" of those
    vocab = encoder.token_embedding().num_embeddings
    marker = next(i for i in range(vocab - 1, 0, -1) if not (ids == i).any())
    marked = ids.clone()
    for row in range(len(ids)):
        hits = (ids[row] == pid).nonzero()
        if len(hits):
            marked[row, hits[0, 0]] = marker
    with torch.no_grad():
        first = encoder.encode_text_with_pseudo(ids, pseudo, occurrences="first")
        expected = encoder.encode_text_with_pseudo(marked, pseudo, placeholder_id=marker)
        every = encoder.encode_text_with_pseudo(ids, pseudo)
        plain = encoder.encode_text(ids)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first[[0]], every[[0]], atol=1e-5, rtol=1e-5)  # a single "$": the same
    assert not torch.allclose(first[1], every[1], atol=1e-4)  # the second "$" is kept as the word
    torch.testing.assert_close(first[2], plain[2], atol=1e-5, rtol=1e-5)


def test_unknown_occurrences_value_is_refused(encoder):
    ids = encoder.tokenize(["a photo of $"])
    with pytest.raises(ValueError, match="occurrences"):
        encoder.encode_text_with_pseudo(ids, torch.zeros(1, encoder.token_dim), occurrences="last")
