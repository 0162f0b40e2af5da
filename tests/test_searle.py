"""SEARLE (``searle``: φ distilled from OTI; ``searle_oti``: OTI at test time).

The official computations are transcribed here from miccunifi/SEARLE (commit a9c314b, cited by
file:line) and used as references on identical tensors: the OTI loss, the NT-Xent distillation loss,
the phrase loss with SEARLE's first-``$`` injection, and the targetpad preprocessing.
"""

from __future__ import annotations

import pickle
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision.transforms.functional as FT
from PIL import Image
from torch import nn
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from zscir.backbones import backbone_fingerprint, build_encoder
from zscir.data.concepts import Concepts, load_phrases
from zscir.data.corpora import ImageCaptionDataset, collate_skip_none, load_caption_folder
from zscir.methods import build_method
from zscir.methods.inversion import Phi
from zscir.methods.losses import nt_xent
from zscir.methods.oti import TEMPLATES, OTICache, OTIConfig, optimise_tokens, oti_loss_terms
from zscir.methods.searle import load_phi_checkpoint, phrase_loss

warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step called without a Trainer
TOL = dict(rtol=1e-6, atol=1e-6)
TINY = {"kind": "open_clip", "model": "tiny"}


def features(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def concept_config(world: Path) -> dict:
    root = world / "synthetic" / "concepts"
    return {
        "vocabulary": str(root / "class-descriptions.csv"),
        "phrases": str(root / "concept_to_phrases.pkl"),
    }


# ---- transcriptions of the official code ----------------------------------------------------------------
def official_oti_loss(template_f, image_f, reg_oti_f, reg_f, lambda_cos=1.0, lambda_gpt=0.5):
    """src/oti_inversion.py:123-124 (criterion), 211-216: CosineEmbeddingLoss (mean over the batch, target
    1) of the template text with the token vs the image, and of the phrase with the token vs the phrase;
    weighted mean."""
    criterion = nn.CosineEmbeddingLoss()
    target = torch.as_tensor([1])
    cosine_loss = criterion(template_f, image_f, target)
    gpt_loss = criterion(reg_oti_f, reg_f, target)
    return (lambda_cos * cosine_loss + lambda_gpt * gpt_loss) / (lambda_cos + lambda_gpt)


def official_contrastive_loss(v1, v2, temperature):
    """src/utils.py:57-70 (from PALAVRA)."""
    v1 = F.normalize(v1, dim=1)
    v2 = F.normalize(v2, dim=1)
    numerator = torch.exp(torch.diag(torch.inner(v1, v2)) / temperature)
    numerator = torch.cat((numerator, numerator), 0)
    joint_vector = torch.cat((v1, v2), 0)
    pairs_product = torch.exp(torch.mm(joint_vector, joint_vector.t()) / temperature)
    denominator = torch.sum(pairs_product - pairs_product * torch.eye(joint_vector.shape[0]), 0)
    return -torch.mean(torch.log(numerator / denominator))


def official_encode_with_pseudo_tokens(model, text, pseudo_tokens):
    """src/encode_with_pseudo_tokens.py:13-41 (num_tokens=1, one token per row) on an open_clip CLIP: the
    embedding at each row's FIRST ``$`` (id 259) is replaced; open_clip's text tower is batch-first and
    takes its causal mask explicitly."""
    x = model.token_embedding(text)
    _, counts = torch.unique((text == 259).nonzero(as_tuple=True)[0], return_counts=True)
    cum_sum = torch.cat((torch.zeros(1, device=text.device).int(), torch.cumsum(counts, dim=0)[:-1]))
    first_tokens_indexes = (text == 259).nonzero()[cum_sum][:, 1]
    x = x.clone()
    x[torch.arange(x.shape[0]), first_tokens_indexes] = pseudo_tokens.to(x.dtype)
    x = x + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ model.text_projection


def official_phrase_loss(model, tokenize, phrases, concepts, tokens):
    """src/train_phi.py:180-191: every occurrence of the concept replaced by " $ " (str.replace without a
    count), the original phrase encoded plainly, CosineEmbeddingLoss with target 1."""
    token_phrases = [p.replace(w, " $ ") for w, p in zip(concepts, phrases)]
    reference = model.encode_text(tokenize(phrases))
    with_token = official_encode_with_pseudo_tokens(model, tokenize(token_phrases), tokens)
    return nn.CosineEmbeddingLoss()(reference, with_token, torch.as_tensor([1]))


class OfficialTargetPad:
    """src/data_utils.py:27-50."""

    def __init__(self, target_ratio, size):
        self.size, self.target_ratio = size, target_ratio

    def __call__(self, image):
        w, h = image.size
        actual_ratio = max(w, h) / min(w, h)
        if actual_ratio < self.target_ratio:
            return image
        scaled_max_wh = max(w, h) / self.target_ratio
        hp = max(int((scaled_max_wh - w) / 2), 0)
        vp = max(int((scaled_max_wh - h) / 2), 0)
        return FT.pad(image, [hp, vp, hp, vp], 0, "constant")


def official_targetpad_transform(target_ratio, dim):
    """src/data_utils.py:53-67."""
    return Compose(
        [
            OfficialTargetPad(target_ratio, dim),
            Resize(dim, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(dim),
            lambda image: image.convert("RGB"),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )


# ---- loss parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_oti_loss_is_the_official_weighted_cosine_loss(seed):
    t, img, p, o = (features(8, 128, seed=seed * 4 + k, scale=3.0) for k in range(4))
    cos, gpt = oti_loss_terms(t, img, p, o)
    ours = ((1.0 * cos + 0.5 * gpt) / 1.5).mean()  # per image, as optimise_tokens sums them
    torch.testing.assert_close(ours, official_oti_loss(t, img, p, o), **TOL)


@pytest.mark.parametrize("seed", range(3))
def test_nt_xent_is_the_official_contrastive_loss_and_gradient(seed):
    a = features(16, 64, seed=seed, scale=0.5).requires_grad_()
    b = features(16, 64, seed=seed + 100, scale=2.0).requires_grad_()
    expected = official_contrastive_loss(a, b, 0.25)
    (ga, gb) = torch.autograd.grad(expected, (a, b))
    ours = nt_xent(a, b, 0.25)
    (oa, ob) = torch.autograd.grad(ours, (a, b))
    torch.testing.assert_close(ours, expected, **TOL)
    torch.testing.assert_close((oa, ob), (ga, gb), rtol=1e-5, atol=1e-7)
    assert expected.item() > 1.0


def test_phrase_loss_uses_searles_first_dollar_injection():
    enc = build_encoder(**TINY).eval()
    model = enc.model
    tokenize = enc.tokenize
    concepts = ["red circle", "box", "cross"]
    # the second phrase holds its concept twice: all occurrences become "$", only the first gets the token
    phrases = [
        "a photo of a red circle that is large",
        "a photo of a box that is next to a box",
        "a photo of a cross that is on the left",
    ]
    tokens = features(3, enc.token_dim, seed=0, scale=0.02)
    slotted = [p.replace(c, " $ ") for p, c in zip(phrases, concepts)]
    with torch.no_grad():
        expected = official_phrase_loss(model, tokenize, phrases, concepts, tokens)
        ours = phrase_loss(enc, phrases, slotted, tokens, occurrences="first")
        every = phrase_loss(enc, phrases, slotted, tokens, occurrences="all")
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert abs(every.item() - expected.item()) > 1e-4  # the other injection is another loss


def test_searle_losses_are_the_official_losses_of_its_draws(small_world, tmp_path):
    method = build_method(
        TINY,
        {"kind": "searle", **concept_config(small_world), "oti": {"steps": 2}, "top_k_concepts": 5},
    ).train()
    method.phi.eval()  # dropout off: the reference recomputes φ(x)
    pixels = features(4, 3, 64, 64, seed=1)
    batch = {"pixels": pixels, "index": torch.arange(4), "key": list("abcd"), "stamp": ["s"] * 4}
    torch.manual_seed(0)
    random.seed(0)
    terms = method.losses(batch)
    random.seed(0)
    with torch.no_grad():
        feats = method.encoder.encode_image(pixels).float()
        ranked = [
            [int(i) for i in r]
            for r in (F.normalize(feats, dim=-1) @ method.concept_features().T).topk(5).indices
        ]
        originals, slotted = method.phrase_pairs(ranked)
        concepts = [
            next(c for c in method.concepts.phrases if c in o and o.replace(c, " $ ") == s)
            for o, s in zip(originals, slotted)
        ]
        targets = method.oti_targets(feats, list("abcd"), None)
        predicted = method.phi(feats)
        expected_distil = official_contrastive_loss(targets, predicted, 0.25)
        expected_gpt = official_phrase_loss(
            method.encoder.model, method.encoder.tokenize, originals, concepts, predicted
        )
    torch.testing.assert_close(terms["distil"], expected_distil, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["gpt"], expected_gpt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"], expected_distil + 0.75 * expected_gpt, rtol=1e-5, atol=1e-6)


# ---- OTI ----------------------------------------------------------------------------------------------
def test_batched_oti_equals_one_image_at_a_time():
    enc = build_encoder(**TINY).eval()
    feats = features(3, enc.embed_dim, seed=5)
    pools = [
        [("a photo of a red circle that is large", "red circle"), ("a photo of a box that is small", "box")],
        [("a photo of a cross that is on the left", "cross")],
        [
            ("a photo of a blue disc that is next to a box", "blue disc"),
            ("a photo of a box that is big", "box"),
        ],
    ]
    cfg = OTIConfig(steps=6)
    keys = ["img0", "img1", "img2"]
    batched = optimise_tokens(enc, feats, pools, keys, cfg)
    single = torch.cat(
        [optimise_tokens(enc, feats[i : i + 1], pools[i : i + 1], keys[i : i + 1], cfg) for i in range(3)]
    )
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)
    # the tokens moved away from their initialisation (steps=0 returns it)
    start = optimise_tokens(enc, feats, pools, keys, OTIConfig(steps=0))
    assert (batched - start).abs().max() > 1e-3


def test_oti_reduces_its_loss():
    enc = build_encoder(**TINY).eval()
    feats = features(2, enc.embed_dim, seed=6)
    pools = [[("a photo of a red circle that is large", "red circle")]] * 2
    ids = enc.tokenize([TEMPLATES[2].format(" $ ")] * 2)

    def cos_loss(tokens):
        with torch.no_grad():
            f = enc.encode_text_with_pseudo(ids, tokens, occurrences="first")
        return (1 - F.cosine_similarity(f, feats)).mean().item()

    start = optimise_tokens(enc, feats, pools, ["a", "b"], OTIConfig(steps=0))
    done = optimise_tokens(enc, feats, pools, ["a", "b"], OTIConfig(steps=25, ema_decay=0.0))
    assert cos_loss(done) < cos_loss(start) - 0.05


# ---- the OTI-target cache -------------------------------------------------------------------------------
def _folder_corpus(root: Path, colours: list[tuple[int, int, int]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", (40, 30), colour).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text("a caption")


def test_oti_cache_notices_a_changed_image_file(small_world, tmp_path):
    method = build_method(
        TINY,
        {
            "kind": "searle",
            **concept_config(small_world),
            "oti": {"steps": 3},
            "oti_cache_dir": str(tmp_path / "cache"),
        },
    )
    folder = tmp_path / "images"
    _folder_corpus(folder, [(200, 20, 20), (20, 20, 200)])

    def targets() -> torch.Tensor:
        data = ImageCaptionDataset(load_caption_folder(folder), method.encoder.image_transform)
        batch = collate_skip_none([data[0], data[1]])
        with torch.no_grad():
            feats = method.encoder.encode_image(batch["pixels"]).float()
        return method.oti_targets(feats, list(batch["key"]), list(batch["stamp"]))

    cache = method.oti_cache
    first = targets()
    assert (cache.hits, cache.misses) == (0, 2)
    second = targets()
    assert (cache.hits, cache.misses) == (2, 2)
    torch.testing.assert_close(second, first)
    Image.new("RGB", (40, 30), (20, 200, 20)).save(folder / "img0.png")  # same key, new content
    third = targets()
    assert (cache.hits, cache.misses) == (3, 3)
    assert (third[0] - first[0]).abs().max() > 1e-4  # recomputed from the new image
    torch.testing.assert_close(third[1], first[1])
    # a truncated entry is a miss, never a crash
    path = cache.path("img1")
    path.write_bytes(path.read_bytes()[:20])
    assert cache.get("img1", "whatever") is None


def test_oti_cache_namespace_follows_settings_and_backbone(small_world, tmp_path):
    def namespace(**over) -> str:
        cfg = {"kind": "searle", **concept_config(small_world), "oti_cache_dir": str(tmp_path), **over}
        return build_method(over.pop("backbone", TINY), cfg).oti_cache.root.name

    base = namespace()
    assert namespace(oti={"steps": 7}) != base
    assert (
        build_method(
            {**TINY, "transform": "targetpad"},
            {"kind": "searle", **concept_config(small_world), "oti_cache_dir": str(tmp_path)},
        ).oti_cache.root.name
        != base
    )
    assert (
        build_method(
            {**TINY, "init_seed": 1},
            {"kind": "searle", **concept_config(small_world), "oti_cache_dir": str(tmp_path)},
        ).oti_cache.root.name
        != base
    )
    assert isinstance(OTICache(tmp_path, base).path("k"), Path)


def test_oti_cache_namespace_keys_every_oti_setting_the_concept_files_and_the_precision(
    small_world, tmp_path
):
    """A token depends on every OTI setting, on the vocabulary and phrase files' content and on the numeric
    precision OTI runs in (the Trainer's, or the caller's autocast): each change is another namespace (a
    miss); the same config again is the same namespace (a hit)."""
    import dataclasses

    import lightning as L

    concepts = tmp_path / "concepts"
    concepts.mkdir()
    files = {k: concepts / Path(v).name for k, v in concept_config(small_world).items()}
    for key, path in files.items():
        path.write_bytes(Path(concept_config(small_world)[key]).read_bytes())

    def method(**over):
        cfg = {"kind": "searle", **{k: str(v) for k, v in files.items()}, "oti_cache_dir": str(tmp_path)}
        return build_method(TINY, {**cfg, **over})

    base = method().oti_cache.root.name
    assert method().oti_cache.root.name == base  # unchanged: a hit
    for field in dataclasses.fields(OTIConfig):
        changed = getattr(OTIConfig(), field.name) + 1
        assert method(oti={field.name: changed}).oti_cache.root.name != base, field.name
    searle = method()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert searle.oti_cache.root.name != base
    assert searle.oti_cache.root.name == base  # autocast left: the fp32 namespace again
    for precision in ("bf16-mixed", "32-true"):
        searle.trainer = L.Trainer(precision=precision, accelerator="cpu", logger=False)
        assert (searle.oti_cache.root.name == base) == (precision == "32-true"), precision
    for path in files.values():  # a vocabulary or phrase file replaced (one byte more)
        path.write_bytes(path.read_bytes() + (b"\n" if path.suffix == ".csv" else b"\0"))
        assert method().oti_cache.root.name != base, path.name
        base = method().oti_cache.root.name


# ---- targetpad ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 64), (70, 60), (100, 40), (30, 90), (125, 100), (81, 64)])
def test_targetpad_is_searles_transform(size):
    enc = build_encoder(**TINY, transform="targetpad")
    image = Image.fromarray(
        (torch.rand(size[1], size[0], 3, generator=torch.Generator().manual_seed(sum(size))) * 255)
        .byte()
        .numpy()
    )
    expected = official_targetpad_transform(1.25, enc.image_size)(image)
    torch.testing.assert_close(enc.image_transform(image), expected)
    plain = build_encoder(**TINY)
    padded = OfficialTargetPad(1.25, enc.image_size)(image).size != image.size
    assert (not torch.equal(plain.image_transform(image), expected)) == padded
    assert enc.transform_id != plain.transform_id
    # the weights are the same: checkpoints and backbone fingerprints do not depend on the preprocessing
    assert backbone_fingerprint({**TINY, "transform": "targetpad"}) == backbone_fingerprint(TINY)


def test_unknown_transform_is_refused():
    with pytest.raises(ValueError, match=r"default.*targetpad"):
        build_encoder(**TINY, transform="pad")


# ---- inputs: concepts, phrases, released φ --------------------------------------------------------------
class _NotAllowed:
    pass


def test_phrase_files_hold_only_strings(tmp_path):
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({" dog ": ["a photo of dog that runs"]}))
    assert load_phrases(good) == {"dog": ["a photo of dog that runs"]}
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"dog": [_NotAllowed()]}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_phrases(bad)


def test_concepts_drop_those_whose_phrases_miss_them(tmp_path):
    (tmp_path / "v.csv").write_text("LabelName,DisplayName\n/m/1,Dog\n/m/2,Cat\n/m/3,Bird\n/m/4,Dog\n")
    (tmp_path / "p.pkl").write_bytes(
        pickle.dumps({"Dog": ["a photo of Dog that runs"], "Cat": ["a photo of Cat", "a photo of a kitten"]})
    )
    concepts = Concepts.load(tmp_path / "v.csv", tmp_path / "p.pkl")
    assert concepts.names == ["Dog", "Cat", "Bird"]
    assert list(concepts.phrases) == ["Dog"]  # Cat: a phrase without it; Bird: no phrases


def test_synthetic_world_writes_concepts_and_phrases(small_world):
    concepts = Concepts.load(**concept_config(small_world))
    assert "red circle" in concepts.names
    assert "gray background" in concepts.names
    assert len(concepts.phrases) == len(concepts.names)
    assert all(p.startswith("a photo of") for ps in concepts.phrases.values() for p in ps)


def test_released_phi_checkpoint_loads_by_path(small_world, tmp_path):
    released = nn.Module()
    released.layers = Phi(128, 128).net.eval()  # SEARLE names its sequential "layers"
    torch.save({"epoch": 100, "Phi": released.state_dict()}, tmp_path / "SEARLE_tiny.pt")
    method = build_method(
        TINY,
        {"kind": "searle", **concept_config(small_world), "phi_checkpoint": str(tmp_path / "SEARLE_tiny.pt")},
    ).eval()
    x = features(2, 128, seed=3)
    torch.testing.assert_close(method.phi(x), released.layers(x))
    torch.save({"epoch": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="'Phi'"):
        load_phi_checkpoint(Phi(128, 128), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_phi_checkpoint(Phi(64, 64), tmp_path / "SEARLE_tiny.pt")


# ---- DDP and resume -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gathered_nt_xent_gives_the_single_process_loss_and_gradients(tmp_path):
    from helpers.searle_workers import nt_xent_problem, nt_xent_worker

    out = tmp_path / "ranks.pt"
    mp.spawn(nt_xent_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    results = torch.load(out, weights_only=True)
    for sizes, gathered in results.items():
        loss, grad = nt_xent_problem(slice(0, sum(sizes)), sum(sizes), gather=True)
        same = torch.allclose(gathered["loss"], loss, atol=1e-6) and torch.allclose(
            gathered["grad"], grad, atol=1e-6
        )
        assert same == gathered["gather"], sizes


@pytest.mark.slow
def test_searle_resumes_to_the_uninterrupted_result(compose, tmp_path):
    from reliability_helpers import loss_trajectory, max_weight_difference
    from zscir.cli.train import train

    run = [
        "method=searle",
        "backbone=tiny",
        "method.oti.steps=4",
        "method.top_k_concepts=10",
        "data.max_samples=32",
        "data.batch_size=16",
        "trainer.precision=32-true",
        "trainer.deterministic=true",
        "trainer.log_every_n_steps=1",
        "eval_benchmarks=[]",  # as tests/test_resume.py: no per-epoch validation between save and resume
    ]
    whole = compose("train", [*run, "trainer.max_epochs=2", f"paths.run_dir={tmp_path / 'whole'}"])
    reference = train(whole)
    torch.use_deterministic_algorithms(False)
    cache = tmp_path / "outputs" / "cache" / "oti"
    assert len(list(cache.rglob("*.oti"))) == 32  # every image once; the second epoch read them
    split = [*run, f"paths.run_dir={tmp_path / 'split'}"]
    train(compose("train", [*split, "trainer.max_epochs=1"]))
    resumed = train(compose("train", [*split, "trainer.max_epochs=2", "resume=last"]))
    torch.use_deterministic_algorithms(False)
    assert resumed == reference == {}
    assert loss_trajectory(tmp_path / "split") == pytest.approx(loss_trajectory(tmp_path / "whole"), rel=1e-6)
    final = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=False)
    ref = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)
    assert max_weight_difference(final, ref) <= 1e-6
    assert any(k.startswith("phi.") for k in final["state_dict"])


def test_searle_oti_composes_queries_in_evaluation(small_world):
    method = build_method(
        TINY, {"kind": "searle_oti", **concept_config(small_world), "oti": {"steps": 3}}
    ).eval()
    assert not method.trains
    batch = {
        "pixels": features(2, 3, 64, 64, seed=2),
        "texts": ["make it red", "add a box"],
        "query_ids": ["q1", "q2"],
    }
    with torch.inference_mode():  # Lightning's evaluation mode: OTI still optimises
        query = method.compose(batch)
        again = method.compose(batch)  # caption variants of one batch reuse its tokens
    assert query.shape == (2, method.encoder.embed_dim)
    torch.testing.assert_close(query, again)


def test_image_folder_corpus_has_no_captions(tmp_path):
    from zscir.data.corpora import load_captioned_images

    _folder_corpus(tmp_path / "imgs" / "n01", [(1, 2, 3), (4, 5, 6)])
    for f in (tmp_path / "imgs").rglob("*.txt"):
        f.unlink()
    samples = load_captioned_images("images", tmp_path / "imgs")
    assert [(s.key, s.caption) for s in samples] == [("n01/img0", ""), ("n01/img1", "")]
    item = ImageCaptionDataset(samples, build_encoder(**TINY).image_transform)[0]
    assert item["stamp"].startswith(str((tmp_path / "imgs" / "n01" / "img0.png").stat().st_size))
