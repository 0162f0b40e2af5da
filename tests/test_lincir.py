"""LinCIR as a LightningModule: noise, the loss against a transcription of the official computation, φ on
each backbone, what trains, EMA, the keyword cache, and a train → evaluate round trip."""

from __future__ import annotations

import json
import random

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from zscir.data.keyword_cache import KeywordCache, KeywordSettings
from zscir.data.loaders import DataConfig, build_train_loader
from zscir.data.text_corpora import MemorySource, expand_text_sources
from zscir.methods import build_method
from zscir.methods.lincir import add_noise
from zscir.text.keywords import extract_keywords
from zscir.text.nlp import load_spacy

BACKBONES = {
    "open_clip": dict(name="tiny", kind="open_clip", model="tiny"),
    "hf_clip": dict(name="tiny_hf", kind="hf_clip", model="tiny"),
}
CAPTIONS = [
    "a big red dog runs across the green field",
    "the very tall man stands there",
    "two dogs play with a ball and the dogs are happy",
    "she runs quickly",
    "a small purple disc on the left side next to a huge yellow cross",
    "<PERSON> holds a $5 bill",
    "there is a tiny blue square",
    "an image of a green triangle",
]


def lincir(backbone: str = "hf_clip", tmp_path=None, **config) -> torch.nn.Module:
    keywords = {"cache_dir": str(tmp_path)} if tmp_path is not None else {}
    return build_method(BACKBONES[backbone], {"kind": "lincir", "keywords": keywords, **config})


# ---- noise ----------------------------------------------------------------------------------------
def test_noise_is_one_uniform_scale_per_row_times_gaussian():
    torch.manual_seed(0)
    z = torch.full((4000, 1024), 3.0)  # wide rows: each row's std estimates its u within ~2 %
    noise = add_noise(z, scale=2.0) - z
    row_std = noise.std(dim=1) / 2.0  # ≈ u for each row
    assert abs(noise.mean().item()) < 0.01
    assert noise.pow(2).mean().item() == pytest.approx(4.0 / 3.0, rel=0.03)  # E[(s u ε)²] = s² E[u²] = s²/3
    assert row_std.mean().item() == pytest.approx(0.5, abs=0.02)  # u ~ U(0, 1), one per row
    assert (row_std < 0.25).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert row_std.max().item() < 1.12
    assert row_std.min().item() < 0.01
    # within a row the noise is Gaussian: standardised fourth moment ≈ 3
    standardised = noise / noise.std(dim=1, keepdim=True)
    assert standardised.pow(4).mean().item() == pytest.approx(3.0, rel=0.05)


# ---- the loss, against the official computation ---------------------------------------------------
def _make_causal_mask(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """transformers v4.34 ``_make_causal_mask`` as copied into navervision/lincir, without the cache part."""
    bsz, tgt_len = shape
    mask = torch.full((tgt_len, tgt_len), torch.finfo(dtype).min, device=device)
    mask_cond = torch.arange(mask.size(-1), device=device)
    mask.masked_fill_(mask_cond < (mask_cond + 1).view(mask.size(-1), 1), 0)
    mask = mask.to(dtype)
    return mask[None, None, :, :].expand(bsz, 1, tgt_len, tgt_len)


def official_encode_with_pseudo_tokens_hf(
    clip, text: torch.Tensor, pseudo_tokens: torch.Tensor
) -> torch.Tensor:
    """``encode_with_pseudo_tokens_HF`` (navervision/lincir), on a ``CLIPModel``'s text tower.

    transformers ≥ 5 takes the additive causal mask as ``attention_mask`` (it dropped ``causal_attention_mask``).
    """
    tm = clip.text_model
    x = tm.embeddings.token_embedding(text)
    x = torch.where(text.unsqueeze(-1) == 259, pseudo_tokens.unsqueeze(1).type(x.dtype), x)
    x = x + tm.embeddings.position_embedding(tm.embeddings.position_ids[:, : text.shape[1]])
    causal = _make_causal_mask(text.shape, x.dtype, device=x.device)
    x = tm.encoder(inputs_embeds=x, attention_mask=causal)
    x = x[0] if isinstance(x, tuple) else x.last_hidden_state
    x_last = tm.final_layer_norm(x)
    x = x_last[torch.arange(x_last.shape[0]), text.to(dtype=torch.int).argmax(dim=-1)]
    return clip.text_projection(x)


def official_loss(clip, phi, original_tokens, replaced_tokens) -> torch.Tensor:
    """``train_phi.py``'s step: text_embeds, noise, φ, re-encode, MSE."""
    tm = clip.text_model
    original_text_embeddings = clip.text_projection(tm(input_ids=original_tokens).pooler_output)
    input_features = original_text_embeddings.clone()
    input_features += (
        1.0
        * torch.rand(input_features.shape[0], device=input_features.device).unsqueeze(-1)
        * torch.randn(input_features.shape, device=input_features.device)
    )
    estimated_token_embeddings = phi(input_features)
    replaced = official_encode_with_pseudo_tokens_hf(clip, replaced_tokens, estimated_token_embeddings)
    return F.mse_loss(replaced.float(), original_text_embeddings.float(), reduction="mean")


def test_loss_equals_the_official_computation_on_a_fixed_batch(tmp_path):
    method = lincir("hf_clip", tmp_path).train()  # φ in train mode: its dropout draws follow the noise
    random.seed(0)
    dataset = method.text_samples.dataset([MemorySource(CAPTIONS)])
    batch = method.text_samples.collate([dataset[i] for i in range(len(dataset))])
    assert (batch["masked_ids"] == 259).any(dim=1).all()
    torch.manual_seed(1)
    ours = method.self_masking_loss(batch["ids"], batch["masked_ids"])
    torch.manual_seed(1)
    with torch.no_grad():
        theirs = official_loss(method.encoder.model, method.phi, batch["ids"], batch["masked_ids"])
    assert ours.item() > 0
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    torch.manual_seed(2)  # other noise, other loss: the comparison is not vacuous
    assert method.self_masking_loss(batch["ids"], batch["masked_ids"]).item() != pytest.approx(
        ours.item(), rel=1e-3
    )


def test_normalised_loss_option(tmp_path):
    method = lincir("hf_clip", tmp_path, normalize_loss=True).eval()
    ids = method.encoder.tokenize(["a red cube", "two blue discs"])
    masked = method.encoder.tokenize(["$ cube", "two $"])
    torch.manual_seed(0)
    loss = method.self_masking_loss(ids, masked)
    torch.manual_seed(0)
    z = method.encoder.encode_text(ids)
    z_hat = method.encoder.encode_text_with_pseudo(masked, method.phi(add_noise(z)))
    assert loss.item() == pytest.approx(
        F.mse_loss(F.normalize(z_hat, dim=-1), F.normalize(z, dim=-1)).item(), rel=1e-5
    )
    assert loss.item() < 4.0 / z.shape[1] + 1e-6  # unit vectors: |a − b|² ≤ 4


# ---- φ and what trains ----------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_phi_maps_embeddings_to_one_token_and_composes_queries(backbone):
    method = lincir(backbone).eval()
    enc = method.encoder
    layers = [m for m in method.phi.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [
        (enc.embed_dim, 4 * enc.embed_dim),
        (4 * enc.embed_dim, 4 * enc.embed_dim),
        (4 * enc.embed_dim, enc.token_dim),
    ]
    assert [m.p for m in method.phi.net if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    pixels = torch.randn(3, 3, enc.image_size, enc.image_size)
    assert method.pseudo_tokens(pixels).shape == (3, enc.token_dim)
    query = method.compose({"pixels": pixels, "texts": ["is red", "has two", "is bigger"]})
    assert query.shape == (3, enc.embed_dim)


class _Snapshots(Callback):
    """φ's parameters after every optimizer step (callbacks run before the module's batch-end hook)."""

    def __init__(self):
        self.steps: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append([p.detach().clone() for p in pl_module.phi.parameters()])


def test_only_phi_trains_towers_stay_frozen_and_ema_follows_the_official_rule(tmp_path):
    method = lincir("open_clip", tmp_path, ema=True, ema_decay=0.9)
    towers = {n: p.detach().clone() for n, p in method.encoder.named_parameters()}
    phi0 = [p.detach().clone() for p in method.phi.parameters()]
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in method.phi.parameters()}
    loader = DataLoader(
        method.text_samples.dataset([MemorySource(CAPTIONS)]),
        batch_size=4,
        collate_fn=method.text_samples.collate,
    )
    snaps = _Snapshots()
    trainer = L.Trainer(
        max_steps=3, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[snaps], accelerator="cpu",
    )  # fmt: skip
    trainer.fit(method, train_dataloaders=loader)
    assert all(torch.equal(p, towers[n]) for n, p in method.encoder.named_parameters())
    assert not any(torch.equal(a, b) for a, b in zip(phi0, method.phi.parameters()))
    method.train()
    assert not any(m.training for t in ("image", "text") for m in method.encoder.tower_modules(t))
    # official EMAModel.step after each optimizer step t = 1, 2, 3
    shadow = phi0
    for t, params in enumerate(snaps.steps, 1):
        one_minus = 1 - min(0.9, (1 + t) / (10 + t))
        shadow = [s - one_minus * (s - p) for s, p in zip(shadow, params)]
    assert int(method.ema_updates) == 3
    for ema, expected in zip(method.phi_ema.parameters(), shadow):
        torch.testing.assert_close(ema, expected)
    assert method.phi_for_eval is method.phi_ema


# ---- keyword cache --------------------------------------------------------------------------------
def _corpus(tmp_path, captions=CAPTIONS):
    path = tmp_path / "corpus" / "captions.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(captions) + "\n")
    return path


def test_keyword_cache_hit_miss_invalidation_and_corruption(tmp_path):
    corpus = _corpus(tmp_path)
    settings = KeywordSettings(context_length=32)
    cache = KeywordCache(settings)  # default: next to the corpus
    (source,) = expand_text_sources(corpus)
    entry = cache.get(source)
    path = cache.path_for(source)
    assert path.parent == corpus.parent
    assert path.is_file()
    assert list(entry.captions)[5] == "person holds a 5 bill"  # cleaned
    assert [entry.keywords[i] for i in range(len(entry))] == extract_keywords(list(entry.captions))
    again = KeywordCache(settings).get(source)
    assert list(again.captions) == list(entry.captions)
    assert [again.keywords[i] for i in range(len(again))] == [entry.keywords[i] for i in range(len(entry))]
    stamp = path.stat().st_mtime_ns
    # a second cache object finds the entry: nothing is rebuilt or rewritten
    second = KeywordCache(settings)
    second.get(source)
    assert [e for _, e in second.events] == ["hit"]
    assert path.stat().st_mtime_ns == stamp
    # a first-n request is served by the whole-file entry
    limited = KeywordCache(settings)
    assert list(limited.get(expand_text_sources(corpus, limit=3)[0]).captions) == list(entry.captions)[:3]
    assert [e for _, e in limited.events] == ["hit"]
    # the corpus changes: rebuilt
    _corpus(tmp_path, [*CAPTIONS, "a new caption about a cat"])
    third = KeywordCache(settings)
    assert len(third.get(expand_text_sources(corpus)[0])) == len(CAPTIONS) + 1
    assert [e for _, e in third.events] == ["built"]
    # a corrupt entry is rebuilt, not trusted
    path.write_bytes(b"not an npz")
    fourth = KeywordCache(settings)
    assert len(fourth.get(expand_text_sources(corpus)[0])) == len(CAPTIONS) + 1
    assert [e for _, e in fourth.events] == ["built"]
    # other settings are another entry
    assert KeywordCache(KeywordSettings(context_length=32, pos=("NOUN",))).path_for(source) != path
    # a configured folder
    elsewhere = KeywordCache(settings, cache_dir=tmp_path / "kw")
    elsewhere.get(expand_text_sources(corpus)[0])
    assert [p.parent for p, _ in elsewhere.events] == [tmp_path / "kw"]


def test_cached_samples_equal_parsing_in_the_loader_and_skip_spacy(tmp_path):
    corpus = _corpus(tmp_path)
    cached = lincir("open_clip", tmp_path / "kw")
    parsing = lincir("open_clip", tmp_path / "kw", keywords={"cache": False})
    sources = expand_text_sources(corpus)
    with_cache, in_loader = cached.text_samples.dataset(sources), parsing.text_samples.dataset(sources)
    calls = 0
    for i in range(len(CAPTIONS)):
        before = load_spacy.cache_info()
        random.seed(i)
        a = with_cache[i]
        assert load_spacy.cache_info() == before  # the cached path never touches spaCy
        random.seed(i)
        b = in_loader[i]
        assert a == b
        after = load_spacy.cache_info()
        calls += after.hits + after.misses - before.hits - before.misses
    assert calls == len(CAPTIONS)  # parsing in the loader asks for the pipeline once per caption


@pytest.mark.parametrize("streaming", [False, True])
def test_train_loader_yields_masked_token_batches(tmp_path, streaming):
    corpus = _corpus(tmp_path)
    method = lincir("open_clip", tmp_path / "kw")
    cfg = DataConfig(kind="text", path=str(corpus), batch_size=4, num_workers=0, streaming=streaming)
    batch = next(iter(build_train_loader(cfg, None, samples=method.text_samples)))
    assert batch["ids"].shape == batch["masked_ids"].shape == (4, method.encoder.context_length)
    assert (batch["masked_ids"] == 259).any(dim=1).all()
    assert not (batch["ids"] == 259).any()  # "$" is stripped from captions
    assert all("$" in m for m in batch["masked"])


# ---- end to end -----------------------------------------------------------------------------------
def test_train_then_evaluate_the_checkpoint(compose, tmp_path):
    from zscir.cli.evaluate import evaluate
    from zscir.cli.train import train

    kw_dir = tmp_path / "keywords"
    cfg = compose(
        "train",
        [
            "method=lincir",
            "backbone=tiny",
            "data=synthetic_text",
            "data.batch_size=32",
            "data.max_samples=128",
            "trainer.max_steps=3",
            "trainer.max_epochs=-1",
            "+trainer.limit_val_batches=0",
            f"method.keywords.cache_dir={kw_dir}",
            "eval_benchmarks=[synthetic_circo]",
        ],
    )
    metrics = train(cfg)
    assert "synthetic_circo/map@10" in metrics
    assert len(list(kw_dir.glob("*.zscir-keywords.npz"))) == 1
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("phi.") for k in state)
    assert not any(k.startswith("encoder.") for k in state)
    again = evaluate(
        compose(
            "eval",
            [
                "method=lincir",
                "backbone=tiny",
                f"ckpt_path={ckpt}",
                "benchmark=synthetic_circo",
                f"paths.run_dir={tmp_path / 'eval'}",
            ],
        )
    )
    assert again["map@10"] == pytest.approx(metrics["synthetic_circo/map@10"], abs=1e-4)
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["method"] == "lincir"
