"""Checks on evaluation-server submission files, run before anything is written.

A file the CIRR or CIRCO server rejects (a missing query, a repeated id, a short list) is only found
out after an upload and an e-mail; these checks fail at once, naming the query and the rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from zscir.benchmarks.base import Query


class SubmissionError(ValueError):
    """A submission object breaks the server's format."""


def _check_ranked_list(
    name: str, key: str, values: object, length: int, allowed: set, item_type: type, excluded: object = None
) -> None:
    where = f"{name}[{key!r}]"
    if not isinstance(values, list):
        raise SubmissionError(f"{where}: expected a list, got {type(values).__name__}")
    if len(values) != length:
        raise SubmissionError(f"{where}: {len(values)} entries, expected {length}")
    if any(not isinstance(v, item_type) or isinstance(v, bool) for v in values):
        raise SubmissionError(f"{where}: every entry must be a {item_type.__name__}")
    if len(set(values)) != len(values):
        raise SubmissionError(f"{where}: repeated ids {sorted({v for v in values if values.count(v) > 1})}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise SubmissionError(f"{where}: ids not allowed here: {unknown[:5]}")
    if excluded is not None and excluded in values:
        raise SubmissionError(f"{where}: contains the query's reference image {excluded!r}")


def _check_keys(name: str, obj: dict, expected: Iterable[str]) -> None:
    expected = set(expected)
    missing, extra = sorted(expected - set(obj)), sorted(set(obj) - expected)
    if missing or extra:
        raise SubmissionError(
            f"{name}: {len(missing)} missing key(s) (e.g. {missing[:5]}), {len(extra)} unexpected (e.g. {extra[:5]})"
        )


def validate_cirr(
    recall: dict, recall_subset: dict, queries: Sequence[Query], gallery_ids: Sequence[str]
) -> None:
    """CIRR rc2 server format: ``version``, ``metric`` and every ``pairid``; top-50 (or all N − 1)
    names without the reference for ``recall``, the top-3 of ``img_set`` minus the reference for
    ``recall_subset``."""
    gallery = set(gallery_ids)
    n = min(50, len(gallery) - 1)
    for name, obj, metric in (
        ("recall", recall, "recall"),
        ("recall_subset", recall_subset, "recall_subset"),
    ):
        _check_keys(name, obj, ["version", "metric", *(q.query_id for q in queries)])
        if obj["version"] != "rc2" or obj["metric"] != metric:
            raise SubmissionError(f"{name}: version/metric must be 'rc2'/{metric!r}")
    for q in queries:
        ref = q.reference.image_id if q.reference is not None else None
        _check_ranked_list("recall", q.query_id, recall[q.query_id], n, gallery, str, ref)
        subset = set(q.subset_ids)
        _check_ranked_list(
            "recall_subset", q.query_id, recall_subset[q.query_id], min(3, len(subset)), subset, str, ref
        )


def validate_circo(
    submission: dict, queries: Sequence[Query], gallery_ids: Sequence[str], exclude_reference: bool = False
) -> None:
    """CIRCO server format: exactly the query ids as keys, each with 50 (or all N) unique image ids.
    ``exclude_reference`` (PLI's protocol): no list holds its query's reference (then 50 or N − 1 ids)."""
    gallery = {int(g) for g in gallery_ids}
    _check_keys("circo", submission, (q.query_id for q in queries))
    n = min(50, len(gallery) - (1 if exclude_reference else 0))
    for q in queries:
        ref = int(q.reference.image_id) if exclude_reference and q.reference is not None else None
        _check_ranked_list("circo", q.query_id, submission[q.query_id], n, gallery, int, ref)
