"""gloo workers for SEARLE's gathered NT-Xent (spawned; import only torch and zscir.methods.losses)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from helpers.dist_workers import _load_distributed_helpers

nt_xent = _load_distributed_helpers().nt_xent

#: rows per rank, and whether the ranks gather each other's vectors (False: a control that must differ)
CASES = {(4, 4): True, (3, 5): True, (4, 4, 0): False}


def nt_xent_problem(rows: slice, total: int, gather: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent between fixed targets and a linear map of inputs (a stand-in for φ); loss and its gradient."""
    g = torch.Generator().manual_seed(0)
    x, targets, w = (
        torch.randn(total, 6, generator=g),
        torch.randn(total, 5, generator=g),
        torch.randn(6, 5, generator=g),
    )
    w.requires_grad_()
    loss = nt_xent(targets[rows], x[rows] @ w, 0.25, gather_negatives=gather)
    loss.backward()
    return loss.detach(), w.grad


def nt_xent_worker(rank: int, world: int, store: str, out: str) -> None:
    """Each case on this rank's rows; loss and gradient averaged over ranks as DDP does."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for sizes, gather in CASES.items():
        sizes = sizes[:2]
        offset = sum(sizes[:rank])
        loss, grad = nt_xent_problem(slice(offset, offset + sizes[rank]), sum(sizes), gather)
        for t in (loss, grad):
            dist.all_reduce(t)
            t /= world
        results[sizes if gather else (*sizes, 0)] = {"loss": loss, "grad": grad, "gather": gather}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
