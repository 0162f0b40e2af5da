"""The one encoder contract every method talks to.

An :class:`Encoder` wraps a CLIP-like dual encoder (open_clip, Hugging Face CLIP, BLIP) and exposes
exactly what the ZS-CIR methods need: tokenisation, the image transform, image encoding with optional
patch-token dropping (PLI), text encoding, and text encoding with a pseudo-token injected in place of a
placeholder word (LinCIR, SEARLE-style textual inversion, CAM-TI). All features are returned
*unnormalised*; normalisation is the caller's decision because the official methods differ on it.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

PLACEHOLDER = "$"


class Encoder(nn.Module, ABC):
    """A dual image/text encoder behind one interface.

    Subclasses set ``embed_dim`` (joint space), ``token_dim`` (width of the text token embeddings),
    ``context_length``, ``image_size``, ``num_patches`` and ``image_transform`` (PIL image -> float
    tensor [3, H, W]), and implement the four abstract methods.
    """

    embed_dim: int
    token_dim: int
    context_length: int
    image_size: int
    num_patches: int
    image_transform: Callable
    #: A short string that identifies the preprocessing (for feature caches).
    transform_id: str

    # ---- text ---------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids [B, context_length] (truncated, end-of-text kept)."""

    @property
    def placeholder_id(self) -> int:
        """Token id of the pseudo-word ``$`` (259 in the CLIP BPE vocabulary)."""
        if not hasattr(self, "_placeholder_id"):
            self._placeholder_id = single_token_id(self.tokenize, PLACEHOLDER)
        return self._placeholder_id

    @abstractmethod
    def encode_text(self, ids: Tensor) -> Tensor:
        """Projected text features [B, embed_dim]."""

    @abstractmethod
    def token_embedding(self) -> nn.Embedding:
        """The text tower's token embedding table (the injection point for pseudo-tokens)."""

    def encode_text_with_pseudo(
        self, ids: Tensor, pseudo: Tensor, placeholder_id: int | None = None, occurrence: str = "all"
    ) -> Tensor:
        """Encode ``ids`` with every placeholder position's token embedding replaced by ``pseudo``.

        Args:
            ids: token ids [B, T].
            pseudo: one pseudo-token embedding per row, [B, token_dim].
            placeholder_id: token id to replace; defaults to :attr:`placeholder_id`.
            occurrence: ``"all"`` replaces every placeholder of a row (LinCIR); ``"first"`` only the
                first one, later ones keep the placeholder word's own embedding (SEARLE's
                ``encode_with_pseudo_tokens``).

        The replacement happens on the output of the token embedding table, before positional
        embeddings are added, and then the unchanged text tower runs. Rows without a placeholder are
        encoded normally.
        """
        pid = self.placeholder_id if placeholder_id is None else placeholder_id
        if pseudo.shape != (ids.shape[0], self.token_dim):
            raise ValueError(
                f"pseudo must be [B={ids.shape[0]}, token_dim={self.token_dim}], got {tuple(pseudo.shape)}"
            )
        with inject_pseudo_tokens(self.token_embedding(), pid, pseudo, occurrence):
            return self.encode_text(ids)

    # ---- image --------------------------------------------------------------------------------
    @abstractmethod
    def encode_image(self, pixels: Tensor, keep: Tensor | None = None) -> Tensor:
        """Projected image features [B, embed_dim].

        Args:
            pixels: [B, 3, image_size, image_size], already transformed.
            keep: optional [B, K] indices (0..num_patches-1) of the patch tokens to keep. Positional
                embeddings are added before dropping and the class token is always kept (FLIP/PLI).
        """

    @abstractmethod
    def vision_blocks(self) -> Sequence[nn.Module]:
        """The vision transformer's residual blocks, first to last (Grad-CAM target layers)."""

    @abstractmethod
    def tower_modules(self, tower: str) -> list[nn.Module]:
        """The modules of the ``"image"`` or ``"text"`` tower (switching them to eval mode freezes dropout)."""

    def tower_parameters(self, tower: str) -> list[nn.Parameter]:
        """Every parameter of the ``"image"`` or ``"text"`` tower, projections included, each once."""
        seen: dict[int, nn.Parameter] = {}
        for module in self.tower_modules(tower):
            for p in module.parameters():
                seen.setdefault(id(p), p)
        for p in self._tower_loose_parameters(tower):
            seen.setdefault(id(p), p)
        return list(seen.values())

    def _tower_loose_parameters(self, tower: str) -> list[nn.Parameter]:
        """Parameters a tower owns that sit directly on a shared parent module (open_clip's text tower)."""
        return []

    def set_tower_trainable(self, tower: str, trainable: bool) -> None:
        """Freeze (``requires_grad=False`` and eval mode) or unfreeze one tower."""
        for p in self.tower_parameters(tower):
            p.requires_grad_(trainable)
        for module in self.tower_modules(tower):
            module.train(trainable)

    @property
    def grid_size(self) -> tuple[int, int]:
        side = round(self.num_patches**0.5)
        return side, side


def single_token_id(tokenize: Callable[[Sequence[str]], Tensor], word: str) -> int:
    """The id of ``word`` if the tokenizer maps it to exactly one token between its special tokens."""
    ids = tokenize([word])[0].tolist()
    inner = [i for i in ids[1:] if i != 0]
    if len(inner) != 2:  # the word itself, then end-of-text
        raise ValueError(f"{word!r} is not a single token for this tokenizer: {ids[: len(inner) + 1]}")
    return inner[0]


@contextlib.contextmanager
def inject_pseudo_tokens(
    embedding: nn.Embedding, placeholder_id: int, pseudo: Tensor, occurrence: str = "all"
) -> Iterator[None]:
    """Within the block, ``embedding``'s output wherever its input is ``placeholder_id`` (``occurrence``:
    ``"all"`` positions, or only each row's ``"first"``) becomes that row's ``pseudo`` [B, D].

    A forward hook keeps the library's own text tower in charge of everything after the lookup, so
    injection cannot drift from plain encoding (a test checks that injecting a word's own embedding
    reproduces ``encode_text``). The positions are read from the ids the embedding actually receives,
    so an encoder may trim padding before the lookup.
    """

    if occurrence not in ("all", "first"):
        raise ValueError(f"occurrence must be 'all' or 'first', got {occurrence!r}")

    def hook(_module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        where = inputs[0] == placeholder_id
        if occurrence == "first":
            where = where & (where.cumsum(dim=1) == 1)
        return torch.where(where.unsqueeze(-1), pseudo.to(output.dtype).unsqueeze(1), output)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def trim_padding(ids: Tensor) -> Tensor:
    """``ids`` [B, T] cut after the last row's end-of-text token (the largest id in the CLIP vocabulary).

    For a causal text tower pooled at the end-of-text token, the positions after it never reach the
    output, so encoding the trimmed ids gives the same features at a fraction of the cost: captions are
    ~15–25 tokens against a context of 77.
    """
    if ids.shape[1] == 0:
        return ids
    return ids[:, : int(ids.argmax(dim=-1).max()) + 1]


def gather_patches(tokens: Tensor, keep: Tensor) -> Tensor:
    """Select patch tokens [B, L, D] -> [B, K, D] by per-sample indices ``keep`` [B, K]."""
    if keep.dim() != 2 or keep.shape[0] != tokens.shape[0]:
        raise ValueError(f"keep must be [B={tokens.shape[0]}, K], got {tuple(keep.shape)}")
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= tokens.shape[1]):
        raise ValueError(
            f"keep indices must lie in [0, {tokens.shape[1]}), got [{int(keep.min())}, {int(keep.max())}]"
        )
    return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def random_keep(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform random patch subsets, one per sample: [B, int(L·(1−r))] sorted indices.

    Same rule as PLI/MAE (``argsort`` of uniform noise, first ``int(L * (1 - r))`` kept), drawn
    independently per sample.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n_keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    return noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
