"""Worker functions for tests that run on a gloo process group (spawned; imports only torch + the helper)."""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _load_distributed_helpers() -> ModuleType:
    """``zscir.methods.losses`` alone (it imports only torch): importing it as usual runs the
    ``zscir.methods`` package, which imports Lightning and open_clip, seconds per spawned process that
    this test does not need."""
    path = Path(__file__).resolve().parents[2] / "src" / "zscir" / "methods" / "losses.py"
    spec = importlib.util.spec_from_file_location("_zscir_distributed", path)
    assert spec is not None, path
    assert spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_distributed = _load_distributed_helpers()
clip_loss, info_nce, contrastive_loss = (
    _distributed.clip_loss,
    _distributed.info_nce,
    _distributed.contrastive_loss,
)

CASES = {  # name: (rows per rank, gather negatives, loss)
    "equal": ((4, 4), True, "clip"),
    "unequal": ((3, 5), True, "clip"),
    "local_only": ((4, 4), False, "clip"),
    # PLI's loss as coded: raw features, one direction (query = image + text, target = text tower here)
    "one_direction_unnormalised": ((3, 5), True, "pli"),
    "one_direction_local_only": ((4, 4), False, "pli"),
    # CAM-TI's loss: queries for some rows only (labels into the image batch), cosine logits / temperature
    "queries_on_some_rows": ((3, 5), True, "cam_ti"),
    "no_query_on_one_rank": ((3, 5), True, "cam_ti_rank0_empty"),
    "some_rows_local_only": ((4, 4), False, "cam_ti"),
}


def problem(total: int) -> tuple[torch.Tensor, ...]:
    """Inputs and parameters of a small two-tower contrastive problem (same on every process)."""
    g = torch.Generator().manual_seed(0)
    x_image, x_text = torch.randn(total, 6, generator=g), torch.randn(total, 6, generator=g)
    w_image, w_text = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    return (
        x_image,
        x_text,
        w_image.requires_grad_(),
        w_text.requires_grad_(),
        torch.tensor(2.0).requires_grad_(),
    )


def loss_and_grads(
    rows: slice, total: int, gather: bool, loss_kind: str = "clip"
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x_image, x_text, w_image, w_text, log_scale = problem(total)
    if loss_kind == "clip":
        image = F.normalize(x_image[rows] @ w_image, dim=-1)
        text = F.normalize(x_text[rows] @ w_text, dim=-1)
        loss = clip_loss(image, text, log_scale.exp(), gather_negatives=gather)
    elif loss_kind.startswith("cam_ti"):
        # queries of the rows a CAM-TI batch keeps (global index % 3 != 2; or only rows >= 3: none on rank 0)
        keep = [
            i - rows.start
            for i in range(rows.start, rows.stop)
            if (i >= 3 if loss_kind.endswith("rank0_empty") else i % 3 != 2)
        ]
        labels = torch.tensor(keep, dtype=torch.long)
        query = (x_text[rows] @ w_text)[labels] * log_scale.exp()
        loss = contrastive_loss(query, x_image[rows] @ w_image, labels, 0.5, True, gather_negatives=gather)
    else:
        query = x_image[rows] @ w_image + x_text[rows] @ w_text
        loss = info_nce(
            query, x_text[rows] @ w_text, log_scale.exp(), symmetric=False, gather_negatives=gather
        )
    loss.backward()
    return loss.detach(), [w_image.grad, w_text.grad, log_scale.grad]


def gather_worker(rank: int, world: int, store: str, out: str) -> None:
    """Each case on this rank's rows; loss and gradients averaged over ranks as DDP and sync_dist do."""
    # a rank left waiting in a collective (a loss that skips the gather on one rank) fails instead of hanging
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results = {}
    for name, (sizes, gather, loss_kind) in CASES.items():
        offset = sum(sizes[:rank])
        loss, grads = loss_and_grads(slice(offset, offset + sizes[rank]), sum(sizes), gather, loss_kind)
        for t in (loss, *grads):
            dist.all_reduce(t)
            t /= world
        results[name] = {"loss": loss, "grads": grads}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


# ---- Pic2Word: a frozen image tower, a trainable mapping, its token through a frozen text tower ----------
PIC2WORD_CASES = {  # name: (rows per rank, aggregation)
    "gathered": ((3, 5), "zscir"),  # info_nce with gathered negatives, unequal shards
    "local": ((4, 4), "local"),  # each rank's own rows only
    "official": ((4, 4), "official"),  # src/trainer.py:111-145 (its all_gather needs equal shards)
}


def pic2word_loss_and_grads(
    rows: slice, gather: bool, aggregation: str = "zscir", total: int = 8
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The Pic2Word loss of ``rows`` of a small problem (same on every process) and the mapping's gradient."""
    g = torch.Generator().manual_seed(1)
    x, w_image = torch.randn(total, 6, generator=g), torch.randn(6, 4, generator=g)
    w_map, w_text = torch.randn(4, 5, generator=g).requires_grad_(), torch.randn(5, 4, generator=g)
    with torch.no_grad():  # the frozen image tower
        image = x[rows] @ w_image
    text = torch.tanh(image @ w_map) @ w_text  # the mapped token through the frozen text tower
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    scale = 10.0
    if aggregation == "official":
        world, rank = dist.get_world_size(), dist.get_rank()
        gathered_image = [torch.zeros_like(image) for _ in range(world)]
        gathered_text = [torch.zeros_like(text) for _ in range(world)]
        dist.all_gather(gathered_image, image)
        dist.all_gather(gathered_text, text)
        all_image = torch.cat([image, *gathered_image[:rank], *gathered_image[rank + 1 :]])
        all_text = torch.cat([text, *gathered_text[:rank], *gathered_text[rank + 1 :]])
        ground_truth = torch.arange(len(all_image)).long()
        logits_per_image = scale * all_image @ all_text.t()
        loss = (
            F.cross_entropy(logits_per_image, ground_truth)
            + F.cross_entropy(logits_per_image.t(), ground_truth)
        ) / 2
    else:
        loss = info_nce(image, text, scale, symmetric=True, gather_negatives=gather)
    loss.backward()
    return loss.detach(), [w_map.grad]


def pic2word_worker(rank: int, world: int, store: str, out: str) -> None:
    """Each case on this rank's rows; loss and gradients averaged over ranks as DDP and sync_dist do."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for name, (sizes, aggregation) in PIC2WORD_CASES.items():
        offset = sum(sizes[:rank])
        rows = slice(offset, offset + sizes[rank])
        loss, grads = pic2word_loss_and_grads(rows, aggregation != "local", aggregation, sum(sizes))
        for t in (loss, *grads):
            dist.all_reduce(t)
            t /= world
        results[name] = {"loss": loss, "grads": grads}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
