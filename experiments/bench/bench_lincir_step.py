"""LinCIR training: loading a batch of captions and one φ step, on a corpus whose caption lengths mix
like real ones (80 % short CC3M-like captions of ~8–15 words, 20 % long prompts cut to the 77-token
context), tiny CLIP text tower (77-token context), batch 128.

Rows:

* ``peer_lincir_step`` (headline): vs a transcription of the official data path and step
  (navervision/lincir ``loader.py:53-140`` ``extract_keywords_spacy`` + ``preprocess_precomputed_base``:
  clean, parse every drawn caption with the **full** ``en_core_web_sm`` pipeline — ``loader.py:225``
  ``spacy.load('en_core_web_sm')``, nothing disabled —, mask, tokenise padded to the full 77-token
  context; ``loader.py:226`` a ``DataLoader`` with worker processes, here 1 worker, as the bench has
  one core to spare; ``train_phi.py:239-241`` the text tower over all 77 positions). The official code
  tokenises with the HF CLIP tokenizer and an added ``[$]`` token mapped to id 259; here the same CLIP
  BPE (open_clip's) with every ``$`` kept a token of its own — the same ids. Ours: the keyword cache
  (parsed once, ``cache_build_s`` beside the row), in-process loading, batches of similar caption length
  (``data.length_buckets=64``), the text tower over the batch's own length (positions after the last
  end-of-text token never reach the output). Ours is timed over whole epochs (its length buckets make
  batches of very different cost), the baselines over ``steps`` random batches; both as samples/s.
* ``lincir_step``: vs zscir's own ``keywords.cache=false`` path (spaCy in the loader, in-process,
  zscir's pipeline, random batches) — the cache and the length buckets.

Equality: the keywords of every caption (official full pipeline vs the cache) are compared in full,
and one batch's loss, with φ's dropout and noise off, is compared between the 77-token and the trimmed
tower (atol 1e-6).
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

import zscir.backbones.open_clip_encoder as oc
from experiments.bench.common import TINY77, compare, timed_row
from zscir.data.samplers import bucket_by_length
from zscir.data.synthetic import world
from zscir.data.text_corpora import MemorySource
from zscir.methods import build_method
from zscir.text.keywords import keyword_runs
from zscir.text.nlp import load_spacy
from zscir.text.placeholder import isolate

BACKBONE = TINY77
PLACEHOLDER_ID = 259  # "$</w>" in the CLIP BPE (the official code maps its added "[$]" token to it)


def mixed_captions(n: int, long_share: float = 0.2, seed: int = 0) -> list[str]:
    """``n`` captions: short scene captions, and a ``long_share`` of long prompts (several scenes joined,
    60–120 words, longer than the 77-token context)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < long_share:
            words: list[str] = []
            while len(words) < rng.randint(60, 120):
                words += (world.caption(world.sample_scene(rng), rng) + ", and").split()
            out.append(" ".join(words))
        else:
            out.append(world.caption(world.sample_scene(rng), rng))
    return out


# ---- the official data path, transcribed ---------------------------------------------------------------
class OfficialCaptionDataset(Dataset):
    """navervision/lincir ``loader.py:143-160`` (``CaptionDataset``) with ``preprocess_precomputed_base``
    (``loader.py:86-140``) on the caption; spaCy loaded in full (``loader.py:225``)."""

    def __init__(self, captions: list[str], tokenize, bpe):
        self.captions, self.tokenize, self.bpe = captions, tokenize, bpe

    def __len__(self) -> int:
        return len(self.captions)

    def clean(self, caption: str) -> str:  # loader.py:74-83
        caption = (caption or "").replace("<PERSON>", "person").lower().replace("$", "").strip()
        tokens = self.bpe.encode(caption)
        if len(tokens) + 2 > 77:
            caption = self.bpe.decode(tokens[:75]).strip()
        return caption

    def __getitem__(self, i: int):
        caption = self.clean(self.captions[i])
        keywords = keyword_runs(load_spacy(None, disable=())(caption))  # loader.py:53-71, 96
        replaced = caption
        for keyword in keywords or [""]:  # loader.py:104-116
            if keyword != "" and keyword in caption:
                replaced = replaced.replace(keyword, "$")
            else:
                words = [w for w in caption.split(" ") if w]
                replaced = (
                    replaced.replace(random.choice(words), "$") if words else "a photo of $ that " + caption
                )
                break
        tokens = self.tokenize([caption])[0]  # padding="max_length": all 77 positions (loader.py:118)
        replaced_tokens = self.tokenize([isolate(replaced)])[0]
        if PLACEHOLDER_ID not in replaced_tokens:  # loader.py:128-136
            replaced_tokens = self.tokenize(["a photo of $"])[0]
        return tokens, replaced_tokens


@contextlib.contextmanager
def full_context() -> Iterator[None]:
    """Run the text tower over all 77 positions, as the official HF ``CLIPTextModel`` does."""
    trim = oc.trim_padding
    oc.trim_padding = lambda ids: ids
    try:
        yield
    finally:
        oc.trim_padding = trim


def _step(method, optimizer, ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    loss = method.self_masking_loss(ids, masked)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def run(batch: int = 128, captions: int = 4096, steps: int = 8, reps: int = 5) -> dict:
    """Each timed call runs ``steps`` steps; samples/s = batch × steps / seconds."""
    torch.manual_seed(0)
    texts = mixed_captions(captions)
    with tempfile.TemporaryDirectory() as cache_dir:
        methods = {
            cache: build_method(
                BACKBONE,
                {"kind": "lincir", "keywords": {"cache": cache, "cache_dir": cache_dir, "n_process": 1}},
            ).train()
            for cache in (True, False)
        }
        peer_method = build_method(BACKBONE, {"kind": "lincir"}).train()
        start = time.perf_counter()
        entry = methods[True].text_samples.keyword_cache().get_all([MemorySource(texts, "bench")])
        build_s = time.perf_counter() - start
        datasets = {
            cache: m.text_samples.dataset([MemorySource(texts, "bench")]) for cache, m in methods.items()
        }
        enc = peer_method.encoder
        official = OfficialCaptionDataset(texts, enc.tokenize, methods[True].text_samples.tokenizer)

        # equality: every caption's keywords (official full pipeline vs the cache) and one batch's loss
        full_nlp = load_spacy(None, disable=())
        equal_keywords = all(
            keyword_runs(full_nlp(official.clean(texts[i]))) == entry.keywords[i] for i in range(len(texts))
        )
        items = methods[True].text_samples.collate([datasets[True][j] for j in range(batch)])
        m = methods[True]
        m.eval()
        torch.manual_seed(1)
        trimmed = m.self_masking_loss(items["ids"], items["masked_ids"])
        torch.manual_seed(1)
        with full_context():
            untrimmed = m.self_masking_loss(items["ids"], items["masked_ids"])
        m.train()
        equal = equal_keywords and bool(torch.allclose(trimmed, untrimmed, atol=1e-6, rtol=0))

        optimizers = {k: torch.optim.AdamW(v.phi.parameters(), lr=1e-4) for k, v in methods.items()}
        peer_opt = torch.optim.AdamW(peer_method.phi.parameters(), lr=1e-4)
        ours_iter = _endless_steps(methods[True], datasets[True], batch, optimizers[True], buckets=64)
        own_iter = _endless_steps(methods[False], datasets[False], batch, optimizers[False])

        def peer() -> None:
            # a fresh pass of the official loader (1 worker) for `steps` batches
            loader = DataLoader(official, batch_size=batch, num_workers=1, shuffle=True, drop_last=True)
            with full_context():
                for n, (ids, masked) in enumerate(loader):
                    _step(peer_method, peer_opt, ids, masked)
                    if n + 1 == steps:
                        break

        epoch = captions // batch  # ours walks whole epochs: its batches' lengths differ (buckets), so a
        # call of `steps` batches would time a different slice of the epoch each round (spread ~2x)

        def ours() -> None:
            for _ in range(epoch):
                next(ours_iter)

        def own() -> None:
            for _ in range(steps):
                next(own_iter)

        t_peer = per_steps(compare(ours, peer, reps=reps, busy=2), "ours", steps / epoch)
        t_own = per_steps(compare(ours, own, reps=reps), "ours", steps / epoch)
    size = (
        f"tiny CLIP text tower (77-token context), batch {batch}, {steps} steps per call, {captions} captions "
        "(80 % short, 20 % long prompts)"
    )
    peer_is = "navervision/lincir loader.py:53-140 + :225-226 (full spaCy, 77 tokens, 1 worker) + train_phi.py:239-241"
    n = batch * steps
    return {
        "peer_lincir_step": timed_row(
            t_peer,
            "samples/s",
            baseline_is=peer_is,
            equal=equal,
            per_call=n,
            size=size,
            cache_build_s=round(build_s, 2),
        ),
        "lincir_step": timed_row(
            t_own,
            "samples/s",
            baseline_is="zscir's keywords.cache=false path (spaCy per drawn caption, in-process)",
            equal=equal_keywords,
            per_call=n,
            size=size,
            cache_build_s=round(build_s, 2),
        ),
    }


def per_steps(timing: dict, side: str, factor: float) -> dict:
    """``timing`` with ``side``'s seconds scaled by ``factor`` (ours timed per epoch, reported per
    ``steps`` steps like the other side, so one ``per_call`` gives both throughputs)."""
    return {**timing, side: {key: value * factor for key, value in timing[side].items()}}


def _endless_steps(method, dataset, batch: int, optimizer, buckets: int = 0) -> Iterator[None]:
    """An endless iterator whose ``next`` loads one batch in-process and runs one training step;
    ``buckets`` > 0: batches of similar caption length, as ``data.length_buckets`` makes them."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    if buckets:
        order = bucket_by_length(order, torch.as_tensor(dataset.lengths()), batch, buckets, seed=0)
    order = order.tolist()
    while True:
        for i in range(0, len(order) - batch + 1, batch):
            items = method.text_samples.collate([dataset[j] for j in order[i : i + batch]])
            _step(method, optimizer, items["ids"], items["masked_ids"])
            yield
