"""Similarity search (chunked top-k, exact target ranks) and the on-disk gallery feature cache."""

from zscir.retrieval.search import normalize, target_ranks, topk_search

__all__ = ["normalize", "target_ranks", "topk_search"]
