"""The contrastive (InfoNCE) losses of every method, with negatives from every rank under DDP.

:func:`info_nce` (PLI), :func:`clip_loss` (CLIP pre-training) and :func:`contrastive_loss` (CAM-TI) are one
computation: cross-entropy of query-target logits with each query's own target as the label, optionally
in both directions; they differ only in how the logits are scaled and which targets are positives.

Under DDP, gradients go back to the rank that owns the gathered rows.

With ``W`` processes each holding ``B`` pairs, an InfoNCE loss over the local batch sees only ``B - 1``
negatives, so ``W × B`` training is not ``1 × W·B`` training. :func:`gather_for_contrastive` all-gathers
features *with* gradients; a method then scores its own rows against every rank's columns
(:func:`clip_loss` does exactly this for the CLIP loss)::

    g = gather_for_contrastive(image, text)              # g.tensors: ([N, D], [N, D]), N = Σ B_r
    all_image, all_text = g.tensors
    labels = g.labels(image.device)                     # this rank's rows in the gathered batch
    loss_i = F.cross_entropy(scale * image @ all_text.T, labels)
    loss_t = F.cross_entropy(scale * text @ all_image.T, labels)
    loss = g.weight * (loss_i + loss_t) / 2

Why this is exact: the backward of the gather sums, over ranks, each rank's gradient for the rows it
received and hands every rank the sum for its own rows; DDP then averages parameter gradients over
ranks. The two together give the gradient of the mean of the per-rank losses, and ``weight``
(``W · B_r / N``) makes that mean equal the loss over the whole gathered batch even when ranks hold
different numbers of rows (a skipped corrupt image). So ``W × B`` with gathering follows the same
trajectory as ``1 × W·B`` (tested in tests/test_ddp.py), up to float summation order.

Works on any backend with ``all_gather`` and ``all_reduce`` (gloo included); without an initialised
process group it returns its inputs unchanged, so single-process code runs the same lines.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """[M, ...] per rank -> [W, M, ...] on every rank; backward: sum of all ranks' gradients, own slice."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


class ContrastiveGather(NamedTuple):
    """The gathered batch and where this rank's rows sit in it."""

    #: each input gathered over ranks: [N, ...] with N = Σ_r B_r, rank order, this rank's rows differentiable
    tensors: tuple[Tensor, ...]
    #: index of this rank's first row in the gathered tensors
    offset: int
    #: rows this rank contributed (B_r)
    local: int
    #: number of processes (1 without a process group)
    world_size: int

    def labels(self, device: torch.device | str | None = None) -> Tensor:
        """Positions of this rank's rows in the gathered batch: the InfoNCE targets of its rows."""
        return torch.arange(self.offset, self.offset + self.local, device=device)

    @property
    def weight(self) -> float:
        """Factor for this rank's mean loss so that DDP's gradient average equals the global mean."""
        total = self.tensors[0].shape[0]
        return self.world_size * self.local / total if total else 0.0


def clip_loss(image: Tensor, text: Tensor, scale: Tensor | float, gather_negatives: bool = True) -> Tensor:
    """Symmetric InfoNCE of L2-normalised ``image``/``text`` features [B, D] with logit scale ``scale``.

    With ``gather_negatives`` and more than one process, every rank's pairs are negatives (see the
    module docstring); the mean of the returned per-rank values is then the loss of the global batch.
    Without a process group the two settings are the same computation.
    """
    return info_nce(image, text, scale, symmetric=True, gather_negatives=gather_negatives)


def info_nce(
    query: Tensor,
    target: Tensor,
    scale: Tensor | float | None,
    symmetric: bool,
    gather_negatives: bool = True,
    labels: Tensor | None = None,
    temperature: float | None = None,
) -> Tensor:
    """Cross-entropy of ``scale · query · targetᵀ`` (or ``query · targetᵀ / temperature``) with each query's
    own target as the label (features are used as given: normalise first for cosine logits);
    ``symmetric`` adds the positive-target → query direction over the queries.

    Args:
        query: [Q, D] query features.
        target: [B, D] target features; every row is a candidate for every query.
        scale: logit scale (CLIP's ``logit_scale.exp()``), or None when ``temperature`` is given.
        labels: [Q] row of each query's positive in ``target``; None: ``arange(Q)`` (Q == B).
        temperature: divide the logits by it instead of multiplying by ``scale`` (CAM-TI).
        gather_negatives: under DDP, every rank's targets (and queries) are candidates, as in one process
            holding the global batch; the returned per-rank value is weighted so its mean over ranks is the
            global-batch loss. Without a process group both settings are the same computation.

    Raises:
        ValueError: not exactly one of ``scale`` and ``temperature`` is given.
    """
    if (scale is None) == (temperature is None):
        raise ValueError("info_nce needs exactly one of scale (multiplies) and temperature (divides)")

    def logits(a: Tensor, b: Tensor) -> Tensor:
        return scale * a @ b.T if temperature is None else a @ b.T / temperature

    positives = target if labels is None else target[labels]
    if labels is None:  # one gather: the pairs' targets are the candidates
        gathered = gather_for_contrastive(query, target) if gather_negatives else None
        targets = gathered
    else:  # the queries and the whole target batch are gathered separately (Q != B)
        gathered = gather_for_contrastive(query) if gather_negatives else None
        targets = gather_for_contrastive(target) if gather_negatives else None
    if gathered is None or gathered.world_size == 1:
        all_query, all_target, weight = query, target, 1.0
        back = torch.arange(query.shape[0], device=query.device)
        forward = back if labels is None else labels
    else:
        all_query, all_target, weight = gathered.tensors[0], targets.tensors[-1], gathered.weight
        back = gathered.labels(query.device)
        forward = back if labels is None else labels + targets.offset
        if query.shape[0] == 0:  # a rank without queries still takes part in the gathers' backward
            return 0.0 * (all_query.sum() + all_target.sum())
    loss = F.cross_entropy(logits(query, all_target), forward)
    if symmetric:
        loss = (loss + F.cross_entropy(logits(positives, all_query), back)) / 2
    return weight * loss


def contrastive_loss(
    queries: Tensor,
    images: Tensor,
    labels: Tensor,
    temperature: float,
    symmetric: bool,
    gather_negatives: bool = True,
) -> Tensor:
    """CAM-TI's in-batch InfoNCE on cosine similarities (Pic2Word's loss; see :func:`info_nce`).

    Args:
        queries: [Q, D] query features; ``labels`` [Q] is the row of each query's positive in ``images``.
        images: [B, D] image features (every row is a candidate for every query).
        symmetric: also the image->query direction, over the Q labelled images and the Q queries.
        gather_negatives: under DDP, every rank's images and queries are candidates.
    """
    q = F.normalize(queries.float(), dim=-1)
    v = F.normalize(images.float(), dim=-1)
    return info_nce(
        q, v, None, symmetric, gather_negatives=gather_negatives, labels=labels, temperature=temperature
    )


def gather_for_contrastive(*tensors: Tensor) -> ContrastiveGather:
    """All-gather ``tensors`` (each [B_r, ...], same B_r for all of them) from every rank, with gradients.

    Ranks may hold different B_r: rows are padded for the collective and the padding removed again.
    Every rank must call this the same number of times (it is a collective).
    """
    if not tensors:
        raise ValueError("gather_for_contrastive needs at least one tensor")
    local = tensors[0].shape[0]
    if any(t.shape[0] != local for t in tensors):
        raise ValueError(f"all tensors need the same number of rows, got {[t.shape[0] for t in tensors]}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ContrastiveGather(tuple(tensors), 0, local, 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=tensors[0].device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local], dtype=torch.long, device=tensors[0].device))
    sizes = [int(s) for s in sizes]
    most = max(sizes)
    gathered = []
    for t in tensors:
        padded = torch.cat([t, t.new_zeros(most - local, *t.shape[1:])]) if local < most else t
        stacked = _AllGatherWithGrad.apply(padded)  # [W, most, ...]
        gathered.append(torch.cat([stacked[r, : sizes[r]] for r in range(world)]))
    return ContrastiveGather(tuple(gathered), sum(sizes[:rank]), local, world)


def nt_xent(v1: Tensor, v2: Tensor, temperature: float, gather_negatives: bool = True) -> Tensor:
    """Symmetric NT-Xent between paired rows of ``v1`` and ``v2`` [B, D]: each of the 2B L2-normalised
    vectors must pick its partner among the other 2B − 1 (PALAVRA's loss, SEARLE ``src/utils.py``
    ``contrastive_loss``), averaged over the 2B vectors.

    Under DDP with ``gather_negatives``, every rank's vectors are candidates and the per-rank value is
    weighted so that its mean over ranks is the loss of the global batch (as :func:`info_nce`).
    """
    a, b = F.normalize(v1.float(), dim=-1), F.normalize(v2.float(), dim=-1)
    n_local = a.shape[0]
    g = gather_for_contrastive(a, b) if gather_negatives else None
    if g is None or g.world_size == 1:
        all_a, all_b, offset, weight = a, b, 0, 1.0
    else:
        (all_a, all_b), offset, weight = g.tensors, g.offset, g.weight
    n = all_a.shape[0]
    logits = torch.cat([a, b]) @ torch.cat([all_a, all_b]).T / temperature  # [2B, 2N]
    own = torch.arange(n_local, device=a.device) + offset
    self_cols, partner_cols = torch.cat([own, own + n]), torch.cat([own + n, own])
    rows = torch.arange(2 * n_local, device=a.device)
    logits = logits.masked_fill(F.one_hot(self_cols, 2 * n).bool(), float("-inf"))
    loss = (logits.logsumexp(dim=1) - logits[rows, partner_cols]).mean()
    return weight * loss
