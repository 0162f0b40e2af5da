"""``topk``: chunked top-50 search (``zscir.retrieval.topk_search``) vs a full Q×N similarity matrix +
argsort, the way the official evaluation scripts rank (SEARLE/LinCIR ``validate.py``). Both sides get
the same L2-normalised features, so only the search is compared."""

from __future__ import annotations

import textwrap

import torch

from experiments.bench.common import interleaved, peak_rss_above_setup_mib, row
from zscir.retrieval.search import normalize, topk_search

K = 50


def baseline_topk(q: torch.Tensor, g: torch.Tensor, k: int = K) -> torch.Tensor:
    """Full similarity matrix, full sort (features already L2-normalised)."""
    return torch.argsort(q @ g.T, dim=1, descending=True)[:, :k]


def ours_topk(q: torch.Tensor, g: torch.Tensor, k: int = K) -> torch.Tensor:
    return topk_search(q, g, k, normalized=True)[0]


_SETUP = """
import torch
from experiments.bench.bench_topk import baseline_topk, ours_topk
torch.manual_seed(0)
q, g = torch.randn({q}, {d}), torch.randn({n}, {d})
q /= q.norm(dim=1, keepdim=True)  # in place: no transient copy inflating the inputs' own peak
g /= g.norm(dim=1, keepdim=True)
"""


def run(
    queries: int = 1000, gallery: int = 100_000, dim: int = 768, reps: int = 5, memory_queries: int = 5000
) -> dict:
    """Time at ``queries`` (interleaved medians), peak memory at ``memory_queries`` (one subprocess per side)."""
    torch.manual_seed(0)
    q, g = normalize(torch.randn(queries, dim)), normalize(torch.randn(gallery, dim))
    assert torch.equal(ours_topk(q, g)[:, :5], baseline_topk(q, g)[:, :5])  # same answer (no ties here)
    t_ours, t_base = interleaved(lambda: ours_topk(q, g), lambda: baseline_topk(q, g), reps=reps)
    setup = textwrap.dedent(_SETUP.format(q=memory_queries, n=gallery, d=dim))
    rss_ours = peak_rss_above_setup_mib(setup, "ours_topk(q, g)")
    rss_base = peak_rss_above_setup_mib(setup, "baseline_topk(q, g)")
    return {
        "topk": row(t_ours, t_base, "s", False, size=f"Q={queries} N={gallery} D={dim}, top-{K}"),
        "topk_memory": row(
            rss_ours,
            rss_base,
            "MiB peak RSS above the inputs",
            False,
            size=f"Q={memory_queries} N={gallery} D={dim}, top-{K}",
        ),
    }
