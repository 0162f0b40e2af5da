"""Scoring a benchmark from its features: zscir vs SEARLE's own evaluation code (the code LinCIR copies),
from the same query and gallery features, at the real benchmark sizes.

Rows (time and peak memory, each side's full metrics / submission checked equal in the same run):

* ``peer_cirr_val``: CIRR val, Q=4181 × N=2297 × D=768. Baseline: a transcription of SEARLE
  ``src/validate.py:187-222`` (``cirr_compute_val_metrics`` after the features are computed: normalise
  the gallery, full distance matrix, ``argsort``, image names, reference removed by a name mask, subset
  labels by comparing names with the 6 ``img_set`` members). Ours: ``cirr_metrics`` (one similarity pass
  for recall and subset recall).
* ``peer_circo_val``: CIRCO val, Q=220 × N=123403 × D=768. Baseline: SEARLE ``src/validate.py:317-364``
  (``circo_compute_val_metrics``: normalise the gallery, then per query a similarity row, ``topk`` 50,
  names, AP@k and recall@k). Ours: ``topk_search`` + ``circo_metrics_from_ranking``.
* ``peer_circo_test``: CIRCO test submission, Q=800 × N=123403 × D=768. Baseline: SEARLE
  ``src/generate_test_submission.py:223-234`` (normalise the gallery, full similarity matrix, ``topk``
  50, names, ``{query id: names}``). Ours: ``topk_search`` + the same dict.

On the CIRCO rows zscir searches a gallery prepared once (:func:`zscir.retrieval.search.prepare_gallery`:
normalised and its duplicates indexed): CIRCO val and test share one gallery (COCO 2017 unlabeled, 123403
images), and zscir keeps the prepared gallery in place of the raw features, so both sides hold inputs of
the same size. SEARLE normalises the gallery inside every call (its code). The one-off preparation time is
reported as ``prepare_s`` and folded into ``ratio_incl_prepare``; on CIRR, zscir prepares inside the call.
Where the CPU has bfloat16 matrix units, the CIRCO rankings use ``topk_search``'s bfloat16 pre-filter (the
float32 ranking, see ``bench_topk``): its bfloat16 copy of the gallery is part of ``prepare_s`` in the
timed rows and of zscir's peak in the memory rows (built inside the measured call).

Metrics are compared with an absolute tolerance of 1e-4 (percent): SEARLE averages in float32, zscir in
float64; the ranked lists and submissions are compared exactly.
"""

from __future__ import annotations

import textwrap
import time

import numpy as np
import torch
import torch.nn.functional as F

from experiments.bench.common import compare, peak_rss_above_setup_mib, row, same, timed_row
from zscir.metrics.functional import circo_metrics_from_ranking, cirr_metrics
from zscir.retrieval.search import prefilter_pays, prepare_gallery, topk_search

SEARLE = "miccunifi/SEARLE"
MEM = "MiB peak RSS above the inputs"


# ---- inputs ---------------------------------------------------------------------------------------
def cirr_inputs(queries: int, gallery: int, dim: int, members: int = 6, seed: int = 0) -> dict:
    """Random features and CIRR-like annotations: each query's ``img_set`` holds ``members`` images, the
    reference and the target among them (the target ≠ the reference)."""
    gen = torch.Generator().manual_seed(seed)
    sets = torch.stack([torch.randperm(gallery, generator=gen)[:members] for _ in range(queries)])
    return {
        "q": F.normalize(torch.randn(queries, dim, generator=gen), dim=-1),  # SEARLE normalises queries
        "g": torch.randn(gallery, dim, generator=gen),
        "reference": sets[:, 0].clone(),
        "target": sets[:, 1].clone(),
        "members": sets,  # [Q, members], reference included (as in CIRR's img_set)
    }


def circo_inputs(queries: int, gallery: int, dim: int, seed: int = 0) -> dict:
    """Random features and 1–23 ground truths per query (CIRCO's range), the target first."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 24, (queries,), generator=gen).tolist()
    return {
        "q": F.normalize(torch.randn(queries, dim, generator=gen), dim=-1),
        "g": torch.randn(gallery, dim, generator=gen),
        "positives": [torch.randperm(gallery, generator=gen)[:c].tolist() for c in counts],
    }


def names(n: int) -> list[str]:
    return [f"{i:012d}" for i in range(n)]


# ---- SEARLE, transcribed ----------------------------------------------------------------------------
def searle_cirr_val(
    predicted_features, index_features, index_names, reference_names, target_names, group_members
):
    """SEARLE ``src/validate.py:187-222`` (after ``cirr_generate_val_predictions``)."""
    index_features = F.normalize(index_features, dim=-1).float()  # :191
    distances = 1 - predicted_features @ index_features.T  # :194
    sorted_indices = torch.argsort(distances, dim=-1).cpu()  # :195
    sorted_index_names = np.array(index_names)[sorted_indices]  # :196
    reference_mask = torch.tensor(  # :199-200
        sorted_index_names
        != np.repeat(np.array(reference_names), len(index_names)).reshape(len(target_names), -1)
    )
    sorted_index_names = sorted_index_names[reference_mask].reshape(  # :201-202
        sorted_index_names.shape[0], sorted_index_names.shape[1] - 1
    )
    labels = torch.tensor(  # :204-205
        sorted_index_names
        == np.repeat(np.array(target_names), len(index_names) - 1).reshape(len(target_names), -1)
    )
    group_members = np.array(group_members)  # :208
    group_mask = (sorted_index_names[..., None] == group_members[:, None, :]).sum(-1).astype(bool)  # :209
    group_labels = labels[group_mask].reshape(labels.shape[0], -1)  # :210
    assert torch.equal(torch.sum(labels, dim=-1).int(), torch.ones(len(target_names)).int())
    assert torch.equal(torch.sum(group_labels, dim=-1).int(), torch.ones(len(target_names)).int())
    out = {f"recall@{k}": (torch.sum(labels[:, :k]) / len(labels)).item() * 100 for k in (1, 5, 10, 50)}
    for k in (1, 2, 3):  # :216-222
        out[f"recall_subset@{k}"] = (torch.sum(group_labels[:, :k]) / len(group_labels)).item() * 100
    return out


def searle_circo_val(predicted_features, index_features, index_names, target_names, gts_img_ids):
    """SEARLE ``src/validate.py:317-364`` (after ``circo_generate_val_predictions``)."""
    ap = {k: [] for k in (5, 10, 25, 50)}
    recall = {k: [] for k in (5, 10, 25, 50)}
    index_features = F.normalize(index_features.float())  # :322
    for predicted_feature, target_name, gt_img_ids in zip(predicted_features, target_names, gts_img_ids):
        gt_img_ids = np.array(gt_img_ids)[np.array(gt_img_ids) != ""]  # :325-326
        similarity = predicted_feature @ index_features.T  # :327
        sorted_indices = torch.topk(similarity, dim=-1, k=50).indices.cpu()  # :328
        sorted_index_names = np.array(index_names)[sorted_indices]  # :329
        map_labels = torch.tensor(np.isin(sorted_index_names, gt_img_ids), dtype=torch.uint8)  # :330
        precisions = torch.cumsum(map_labels, dim=0) * map_labels  # :331
        precisions = precisions / torch.arange(1, map_labels.shape[0] + 1)  # :332
        for k in ap:  # :334-337
            ap[k].append(float(torch.sum(precisions[:k]) / min(len(gt_img_ids), k)))
        assert target_name == gt_img_ids[0]
        single_gt_labels = torch.tensor(sorted_index_names == target_name)  # :340
        for k in recall:  # :341-344
            recall[k].append(float(torch.sum(single_gt_labels[:k])))
    return {
        **{f"map@{k}": np.mean(v) * 100 for k, v in ap.items()},
        **{f"recall@{k}": np.mean(v) * 100 for k, v in recall.items()},
    }


def searle_circo_test(predicted_features, index_features, index_names, query_ids):
    """SEARLE ``src/generate_test_submission.py:223-234``."""
    index_features = index_features.float()  # :224
    index_features = F.normalize(index_features, dim=-1)  # :225
    similarity = predicted_features @ index_features.T  # :228
    sorted_indices = torch.topk(similarity, dim=-1, k=50).indices.cpu()  # :229
    sorted_index_names = np.array(index_names)[sorted_indices]  # :230
    return {qid: names_[:50].tolist() for qid, names_ in zip(query_ids, sorted_index_names)}  # :233-234


# ---- zscir --------------------------------------------------------------------------------------------
def zscir_cirr_val(q, g, target, reference, subset):
    return cirr_metrics(q, g, target, reference, subset)


def zscir_circo_val(q, prepared, positives):
    return circo_metrics_from_ranking(topk_search(q, prepared, 50)[0], positives)


def zscir_circo_test(q, prepared, index_names, query_ids):
    top = topk_search(q, prepared, 50)[0]
    return {qid: [index_names[j] for j in row_] for qid, row_ in zip(query_ids, top.tolist())}


# ---- the bench ----------------------------------------------------------------------------------------
_CIRR_SETUP = """
from experiments.bench.bench_scoring import *
x = cirr_inputs({q}, {n}, {d})
idx = names({n})
ref_names = [idx[i] for i in x["reference"].tolist()]
tgt_names = [idx[i] for i in x["target"].tolist()]
members = [[idx[i] for i in row] for row in x["members"].tolist()]
subset = subset_of(x["members"], x["reference"])
"""
_CIRCO_SETUP = """
from experiments.bench.bench_scoring import *
x = circo_inputs({q}, {n}, {d})
idx = names({n})
gts = [[idx[i] for i in p] for p in x["positives"]]
tgts = [p[0] for p in gts]
qids = [str(i) for i in range({q})]
g_raw = x.pop("g") if {zscir} else x["g"]
prepared = prepare_gallery(g_raw) if {zscir} else None
del g_raw  # zscir keeps the prepared gallery in place of the raw features
"""


def subset_of(members: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[Q, members − 1] the img_set members other than the reference (zscir's ``subset`` argument)."""
    keep = members != reference[:, None]
    return members[keep].view(members.shape[0], -1)


def _mem(setup: str, ours: str, peer: str, **fmt: object) -> tuple[float, float]:
    def s(zscir: bool) -> str:
        return textwrap.dedent(setup.format(zscir=zscir, **fmt))

    return peak_rss_above_setup_mib(s(True), ours), peak_rss_above_setup_mib(s(False), peer)


def run(
    cirr: tuple[int, int] = (4181, 2297),
    circo_val: tuple[int, int] = (220, 123_403),
    circo_test: tuple[int, int] = (800, 123_403),
    dim: int = 768,
    reps: int = 5,
    circo_val_reps: int = 3,
) -> dict:
    rows: dict[str, dict] = {}
    # CIRR val
    x = cirr_inputs(*cirr, dim)
    idx = names(cirr[1])
    args_searle = (
        x["q"],
        x["g"],
        idx,
        [idx[i] for i in x["reference"].tolist()],
        [idx[i] for i in x["target"].tolist()],
        [[idx[i] for i in r] for r in x["members"].tolist()],
    )
    args_ours = (x["q"], x["g"], x["target"], x["reference"], subset_of(x["members"], x["reference"]))
    equal = same(zscir_cirr_val(*args_ours), searle_cirr_val(*args_searle), atol=1e-4)
    timing = compare(lambda: zscir_cirr_val(*args_ours), lambda: searle_cirr_val(*args_searle), reps=reps)
    m_ours, m_peer = _mem(
        _CIRR_SETUP,
        "zscir_cirr_val(x['q'], x['g'], x['target'], x['reference'], subset)",
        "searle_cirr_val(x['q'], x['g'], idx, ref_names, tgt_names, members)",
        q=cirr[0],
        n=cirr[1],
        d=dim,
    )
    size = f"Q={cirr[0]} N={cirr[1]} D={dim}"
    base = f"{SEARLE} src/validate.py:187-222, transcribed"
    rows["peer_cirr_val"] = timed_row(timing, "s", baseline_is=base, equal=equal, size=size)
    rows["peer_cirr_val_memory"] = row(m_ours, m_peer, MEM, False, baseline_is=base, equal=equal, size=size)

    # CIRCO val and test
    for name, (nq, n), reps_ in (("circo_val", circo_val, circo_val_reps), ("circo_test", circo_test, reps)):
        x = circo_inputs(nq, n, dim)
        idx = names(n)
        start = time.perf_counter()
        prepared = prepare_gallery(x["g"])
        prefilter = prefilter_pays(nq, n, 50, "cpu")
        if prefilter:
            prepared.bf16()
        prepare_s = time.perf_counter() - start
        if name == "circo_val":
            gts = [[idx[i] for i in p] for p in x["positives"]]
            tgts = [p[0] for p in gts]

            def ours(prepared=prepared, x=x):
                return zscir_circo_val(x["q"], prepared, x["positives"])

            def peer(x=x, idx=idx, tgts=tgts, gts=gts):
                return searle_circo_val(x["q"], x["g"], idx, tgts, gts)

            code = (
                "zscir_circo_val(x['q'], prepared, x['positives'])",
                "searle_circo_val(x['q'], x['g'], idx, tgts, gts)",
            )
            base = f"{SEARLE} src/validate.py:317-364, transcribed"
        else:
            qids = [str(i) for i in range(nq)]

            def ours(prepared=prepared, x=x, idx=idx, qids=qids):
                return zscir_circo_test(x["q"], prepared, idx, qids)

            def peer(x=x, idx=idx, qids=qids):
                return searle_circo_test(x["q"], x["g"], idx, qids)

            code = (
                "zscir_circo_test(x['q'], prepared, idx, qids)",
                "searle_circo_test(x['q'], x['g'], idx, qids)",
            )
            base = f"{SEARLE} src/generate_test_submission.py:223-234, transcribed"
        equal = same(ours(), peer(), atol=1e-4)
        timing = compare(ours, peer, reps=reps_)
        m_ours, m_peer = _mem(_CIRCO_SETUP, *code, q=nq, n=n, d=dim)
        size = f"Q={nq} N={n} D={dim}"
        incl = timing["baseline"]["median"] / (timing["ours"]["median"] + prepare_s)
        rows[f"peer_{name}"] = timed_row(
            timing,
            "s",
            baseline_is=base,
            equal=equal,
            size=size,
            prepare_s=round(prepare_s, 3),
            ratio_incl_prepare=round(incl, 3),
            prefilter=prefilter,
        )
        rows[f"peer_{name}_memory"] = row(
            m_ours, m_peer, MEM, False, baseline_is=base, equal=equal, size=size
        )
        del x, prepared
    return rows
