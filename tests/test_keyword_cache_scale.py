"""The LinCIR keyword cache at corpus scale: a progress bar over the spaCy pass, a rank that waits on
another's build says so, and the number of spaCy processes defaults to what the corpus is worth."""

from __future__ import annotations

import fcntl
import logging
import os

import pytest

from zscir.data import keyword_cache
from zscir.data.keyword_cache import KeywordCache, KeywordSettings, spacy_processes
from zscir.data.text_corpora import MemorySource, expand_text_sources
from zscir.text.nlp import load_spacy


class RecordingNLP:
    """The real pipeline, recording the ``nlp.pipe`` arguments (and parsing in this process)."""

    def __init__(self):
        self.nlp, self.calls = load_spacy(), []

    def pipe(self, texts, **kwargs):
        self.calls.append(kwargs)
        return self.nlp.pipe(texts, batch_size=kwargs["batch_size"], n_process=1)


@pytest.fixture(scope="module")
def nlp():
    return RecordingNLP()


def test_the_spacy_pass_shows_a_progress_bar(tmp_path, nlp, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red dog runs\na big cat\nthe small tree\n")
    KeywordCache(KeywordSettings(context_length=32), nlp=nlp).get(expand_text_sources(corpus)[0])
    err = capsys.readouterr().err
    assert "keywords corpus" in err
    assert "3/3" in err  # the total is known: every caption is read before parsing
    assert "captions/s" in err


def test_a_process_that_waits_on_the_lock_says_so(tmp_path, nlp, monkeypatch, caplog):
    real, attempts = fcntl.flock, []

    def flock(handle, op):
        attempts.append(op)
        if op & fcntl.LOCK_NB:
            raise BlockingIOError("held by another rank")  # another rank is building this entry
        return real(handle, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    source = MemorySource(["a red dog runs", "a big cat"], name="corpus")
    with caplog.at_level(logging.INFO, logger="zscir.data.keyword_cache"):
        KeywordCache(KeywordSettings(context_length=32), cache_dir=tmp_path, nlp=nlp).get(source)
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("waiting for corpus-") and "another process is building the keyword cache of corpus" in m
        for m in messages
    )
    assert any(" is free after " in m for m in messages)
    assert attempts[:2] == [fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_EX]


def test_an_unlocked_entry_is_built_without_a_waiting_message(tmp_path, nlp, caplog):
    source = MemorySource(["a red dog runs"], name="corpus")
    with caplog.at_level(logging.INFO, logger="zscir.data.keyword_cache"):
        KeywordCache(KeywordSettings(context_length=32), cache_dir=tmp_path, nlp=nlp).get(source)
    assert not any("waiting for" in r.getMessage() for r in caplog.records)


def test_n_process_defaults_to_one_for_small_corpora_and_several_for_large_ones(monkeypatch):
    big = keyword_cache.AUTO_PARALLEL_MIN
    assert spacy_processes(0, 10) == 1
    assert spacy_processes(0, big - 1) == 1
    for cpus, expected in ((1, 1), (2, 2), (6, 4), (32, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert spacy_processes(0, big) == expected
    assert spacy_processes(3, 10) == 3  # an explicit count is kept
    with pytest.raises(ValueError, match="n_process"):
        spacy_processes(-1, 10)


def test_the_cache_uses_the_default_unless_n_process_is_set(tmp_path, nlp):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red dog\n")
    nlp.calls.clear()
    KeywordCache(KeywordSettings(context_length=32), cache_dir=tmp_path / "a", nlp=nlp).get(
        expand_text_sources(corpus)[0]
    )
    KeywordCache(KeywordSettings(context_length=32), cache_dir=tmp_path / "b", n_process=3, nlp=nlp).get(
        expand_text_sources(corpus)[0]
    )
    assert [c["n_process"] for c in nlp.calls] == [1, 3]
