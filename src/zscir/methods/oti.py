"""Optimisation-based textual inversion (OTI) and image–concept association, as SEARLE does them
(Baldrati et al., "Zero-Shot Composed Image Retrieval with Textual Inversion", ICCV 2023; official
code ``src/oti_inversion.py``, ``src/image_concepts_association.py``).

**Concept association.** Every concept of the vocabulary is embedded with 24 prompt templates (those
of PALAVRA, Cohen et al. 2022); each template's text feature is L2-normalised, the mean over templates
normalised again. An image's concepts are the vocabulary ranked by cosine with its image feature; SEARLE
keeps the top 250.

**OTI.** For each image a pseudo-word token ``v`` (token-embedding width), drawn from N(0, σ²) with
σ = 0.02, is optimised by AdamW (lr 2e-2, weight decay 0.01) for 350 steps; the result is the
exponential moving average of ``v`` (decay 0.99) over the steps. The loss of one image at one step is

    (λ_cos · (1 − cos(f("<template with $>"), f_img)) + λ_gpt · (1 − cos(f(p with $), f(p)))) / (λ_cos + λ_gpt)

with a random template, and ``p`` a random phrase of one of the image's top-k concepts (k = 15) whose
first occurrence of the concept is replaced by `` $ `` (filled with ``v``). λ_cos = 1, λ_gpt = 0.5.

Batched: a batch of images is one ``[B, token_dim]`` parameter under one AdamW, whose state is
element-wise, so every image has its own moments. The batch loss is the *sum* of the per-image losses,
so each token's gradient is its own image's (the official code takes the batch mean, a factor 1/B that
Adam's normalisation removes up to its ε). Every random draw of an image (initial token, template and
phrase at each step) comes from a generator seeded by (seed, image key): an image's token is the same
whatever batch it is optimised in, which makes batched OTI equal to one image at a time and lets the
targets be cached by image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from zscir.backbones import Encoder
from zscir.data.concepts import Concepts
from zscir.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

#: the prompt templates of concept association and of OTI's cosine loss ("{}" = the concept or `` $ ``),
#: PALAVRA's (Cohen et al., "This is my unicorn, Fluffy", ECCV 2022), as SEARLE uses them
TEMPLATES = (
    "This is a photo of a {}",
    "This photo contains a {}",
    "A photo of a {}",
    "This is an illustration of a {}",
    "This illustration contains a {}",
    "An illustrations of a {}",
    "This is a sketch of a {}",
    "This sketch contains a {}",
    "A sketch of a {}",
    "This is a diagram of a {}",
    "This diagram contains a {}",
    "A diagram of a {}",
    "A {}",
    "We see a {}",
    "{}",
    "We see a {} in this photo",
    "We see a {} in this image",
    "We see a {} in this illustration",
    "We see a {} photo",
    "We see a {} image",
    "We see a {} illustration",
    "{} photo",
    "{} image",
    "{} illustration",
)
#: the pseudo-word as SEARLE writes it into templates and phrases (spaces keep it a separate token)
SLOT = " $ "


@dataclass
class OTIConfig:
    """OTI's settings; the defaults are the official code's (``src/oti_inversion.py`` arguments)."""

    steps: int = 350
    lr: float = 2e-2
    weight_decay: float = 0.01
    init_std: float = 0.02
    ema_decay: float = 0.99
    lambda_cos: float = 1.0
    lambda_gpt: float = 0.5
    #: phrases come from the image's top_k associated concepts
    top_k: int = 15
    seed: int = 0


# ---- concept association ----------------------------------------------------------------------------
@torch.no_grad()
def concept_embeddings(encoder: Encoder, names: Sequence[str], batch_size: int = 1024) -> Tensor:
    """Template-ensembled text features of ``names``: [V, embed_dim], L2-normalised, float32.

    Each concept is written into every template as ``" {name} "``; per template normalised, averaged,
    normalised again (``src/image_concepts_association.py``).
    """
    prompts = [t.format(f" {n} ") for n in names for t in TEMPLATES]
    device = next(encoder.parameters()).device
    feats = []
    for i in range(0, len(prompts), batch_size):
        ids = encoder.tokenize(prompts[i : i + batch_size]).to(device)
        feats.append(F.normalize(encoder.encode_text(ids).float(), dim=-1))
    per_template = torch.cat(feats).view(len(names), len(TEMPLATES), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1)


def associate(image_features: Tensor, concept_features: Tensor, k: int) -> Tensor:
    """Indices [B, min(k, V)] of each image's ``k`` concepts of highest cosine, best first.

    Args:
        image_features: [B, D] (any scale; normalised here).
        concept_features: [V, D] from :func:`concept_embeddings`.
    """
    sims = F.normalize(image_features.float(), dim=-1) @ concept_features.T.to(image_features.device)
    return sims.topk(min(k, concept_features.shape[0]), dim=1).indices


def usable_top(ranked: Sequence[int], concepts: Concepts, k: int) -> list[str]:
    """The usable concepts among the first ``k`` of ``ranked`` (vocabulary indices); if there is none, the
    best-ranked usable concept (SEARLE's code would fail on such an image)."""
    names = [concepts.names[i] for i in ranked[:k]]
    kept = [n for n in names if concepts.usable(n)]
    if kept:
        return kept
    fallback = next((concepts.names[i] for i in ranked if concepts.usable(concepts.names[i])), None)
    if fallback is None:
        fallback = next(iter(concepts.phrases))
    return [fallback]


# ---- OTI --------------------------------------------------------------------------------------------
def image_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one image's random draws, from the run's ``seed`` and the image's key."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "little") >> 1


def oti_loss_terms(
    template_feats: Tensor, image_feats: Tensor, phrase_feats: Tensor, original_feats: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-image (cosine, phrase) losses [B] each: ``1 − cos`` of the template text with the token against
    the image, and of the phrase with the token against the original phrase (``nn.CosineEmbeddingLoss``
    with target 1, per row)."""
    cos = 1 - F.cosine_similarity(template_feats.float(), image_feats.float(), dim=-1)
    gpt = 1 - F.cosine_similarity(phrase_feats.float(), original_feats.float(), dim=-1)
    return cos, gpt


def optimise_tokens(
    encoder: Encoder,
    image_features: Tensor,
    phrase_pools: Sequence[Sequence[tuple[str, str]]],
    keys: Sequence[str],
    cfg: OTIConfig,
) -> Tensor:
    """OTI for a batch of images: the EMA pseudo-tokens [B, token_dim] (float32, no grad).

    Args:
        image_features: [B, embed_dim] image features (unnormalised is fine).
        phrase_pools: per image, the (phrase, concept) pairs its regularisation samples from.
        keys: per image, the id that seeds its random draws (:func:`image_seed`).

    Runs with gradients enabled even inside ``torch.no_grad``/``inference_mode`` (evaluation).
    """
    b, device = image_features.shape[0], image_features.device
    if not (len(phrase_pools) == len(keys) == b) or any(not p for p in phrase_pools):
        raise ValueError("optimise_tokens needs one key and a non-empty phrase pool per image")
    # every random draw of an image from its own generator: batch composition never changes a token
    init, template_idx, phrase_idx = [], [], []
    for key, pool in zip(keys, phrase_pools):
        g = torch.Generator().manual_seed(image_seed(cfg.seed, key))
        init.append(torch.randn(encoder.token_dim, generator=g) * cfg.init_std)
        template_idx.append(torch.randint(len(TEMPLATES), (cfg.steps,), generator=g))
        phrase_idx.append(torch.randint(len(pool), (cfg.steps,), generator=g))
    if cfg.steps == 0:  # nothing drawn, nothing to encode: the initial tokens
        return torch.stack(init).to(device)
    # the distinct phrases the batch draws (not its whole pools: an image's pool holds hundreds of phrases,
    # of which it draws at most ``steps``), tokenised and (originals) encoded once
    index: dict[tuple[str, str], int] = {}
    rows = torch.tensor(
        [
            [index.setdefault(pool[j], len(index)) for j in idx.tolist()]
            for pool, idx in zip(phrase_pools, phrase_idx)
        ],
        dtype=torch.long,
    ).view(b, cfg.steps)
    pairs = list(index)
    with torch.inference_mode(False), torch.enable_grad():  # inside evaluation too
        rows = rows.to(device)  # [B, steps]: row of the phrase each image uses at each step
        template_ids = encoder.tokenize([t.format(SLOT) for t in TEMPLATES]).to(device)
        slotted_ids = encoder.tokenize([p.replace(c, SLOT, 1) for p, c in pairs]).to(device)
        with torch.no_grad():
            originals = encoder.encode_text(encoder.tokenize([p for p, _ in pairs]).to(device)).float()
        image = image_features.detach().float().clone()
        token = torch.nn.Parameter(torch.stack(init).to(device))
        ema = token.detach().clone()
        optimiser = torch.optim.AdamW([token], lr=cfg.lr, weight_decay=cfg.weight_decay)
        template_idx = torch.stack(template_idx).to(device)
        lam = cfg.lambda_cos + cfg.lambda_gpt
        for step in range(cfg.steps):
            row = rows[:, step]
            prompts = (template_ids[template_idx[:, step]], slotted_ids[row])
            if b > 1:  # two passes, each trimmed to its own longest row: one would pad the short templates
                # to the phrases' length (a third of the work); for one image a pass costs more than that
                feats = torch.cat(
                    [encoder.encode_text_with_pseudo(p, token, occurrences="first") for p in prompts]
                )
            else:
                feats = encoder.encode_text_with_pseudo(
                    torch.cat(prompts), token.repeat(2, 1), occurrences="first"
                )
            cos, gpt = oti_loss_terms(feats[:b], image, feats[b:], originals[row])
            loss = (cfg.lambda_cos * cos + cfg.lambda_gpt * gpt) / lam
            # the token's gradient only: no weight gradients are computed or accumulated, trainable or not
            (token.grad,) = torch.autograd.grad(loss.sum(), token)
            optimiser.step()
            ema.mul_(cfg.ema_decay).add_(token.detach(), alpha=1 - cfg.ema_decay)
    return ema


def phrase_pool(concepts: Concepts, names: Sequence[str]) -> list[tuple[str, str]]:
    """Every (phrase, concept) of ``names``: OTI samples uniformly among them (so a concept with more
    phrases is drawn more often, as in the official code)."""
    return [(p, n) for n in names for p in concepts.phrases[n]]


# ---- the on-disk cache of OTI targets ---------------------------------------------------------------
MAGIC, VERSION = b"ZOTI", 1
_HEADER = struct.Struct("<4sBII")  # magic, version, header json length, token width


def cache_namespace(**parts: object) -> str:
    """A short hash of everything besides the image that decides its token (backbone weights, transform,
    OTI settings, the concept files, the numeric precision, the format)."""
    blob = json.dumps({"format": VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


class OTICache:
    """OTI tokens on disk, one small file per image under ``root/namespace``, keyed by the image's corpus
    key and checked against the stamp of the file the image was read from (size, modification and
    change time: :func:`zscir.utils.io.file_stamp`): a rewritten image file is a miss. Entries are
    written atomically (temp file + rename); an unreadable or foreign entry is a miss and is rewritten.
    """

    def __init__(self, root: str | Path, namespace: str):
        self.root = Path(root).expanduser() / namespace
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.oti"

    def get(self, key: str, stamp: str) -> Tensor | None:
        """The token [token_dim] stored for ``key`` read from a file with ``stamp``, or None."""
        try:
            data = self.path(key).read_bytes()
            magic, version, hlen, width = _HEADER.unpack_from(data)
            header = json.loads(data[_HEADER.size : _HEADER.size + hlen])
            ok = (magic, version) == (MAGIC, VERSION) and header == {"key": key, "stamp": stamp}
            ok = ok and len(data) == _HEADER.size + hlen + 4 * width
        except (OSError, struct.error, ValueError):
            ok = False
        if not ok:
            self.misses += 1
            return None
        self.hits += 1
        return torch.frombuffer(bytearray(data[_HEADER.size + hlen :]), dtype=torch.float32)

    def put(self, key: str, stamp: str, token: Tensor) -> None:
        """Store ``token`` [token_dim]; a failed write is logged and otherwise ignored."""
        header = json.dumps({"key": key, "stamp": stamp}).encode()
        payload = token.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        data = _HEADER.pack(MAGIC, VERSION, len(header), token.numel()) + header + payload
        path = self.path(key)
        try:  # one small file per entry: atomic, not fsynced (a lost entry is recomputed)
            atomic_write_bytes(path, data, durable=False)
        except OSError as err:
            log.warning("could not write OTI cache entry %s: %s", path, err)
