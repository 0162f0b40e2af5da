"""Each bench script runs end to end on tiny sizes and writes well-formed results (no timing assertions)."""

import json
import time

import pytest
import torch
from experiments.bench import run_all
from experiments.bench.common import compare, same

PEER_ROWS = {
    "peer_cirr_val",
    "peer_cirr_val_memory",
    "peer_circo_val",
    "peer_circo_val_memory",
    "peer_circo_test",
    "peer_circo_test_memory",
    "peer_topk",
    "peer_topk_memory",
    "peer_lincir_step",
    "peer_pli_step",
    "peer_cam_batch",
}
OWN_ROWS = {
    "topk",
    "topk_memory",
    "gallery_cache",
    "pli_dropping",
    "pli_dropping_step",
    "lincir_step",
    "cam_batch",
    "cam_cache",
    "framework_overhead",
}


@pytest.mark.slow
def test_bench_quick_writes_results_and_table(tmp_path):
    threads_before = torch.get_num_threads()
    results = run_all.run(quick=True, out_dir=tmp_path)
    assert torch.get_num_threads() == threads_before  # the pinned count does not leak
    written = json.loads((tmp_path / "results.json").read_text())
    assert set(written) == set(results)
    assert set(written) >= PEER_ROWS | OWN_ROWS
    for name in PEER_ROWS:
        assert written[name]["equal"] is True, name  # both sides' full results agreed in the run
        assert "SEARLE" in written[name]["baseline_is"] or "." in written[name]["baseline_is"], name
    for name, r in written.items():
        assert set(r) >= {"ours", "baseline", "unit", "ratio", "higher_is_better"}, name
        if r["ours"] is None:
            continue
        assert r["baseline_is"], name
        if "ours_min" in r:
            assert r["threads"] == 1, name
            assert isinstance(r["contended"], bool), name
            lo, hi = sorted((r["ours_min"], r["ours_max"]))
            assert lo <= r["ours"] <= hi, name
        if r["ratio"] is not None:
            expected = r["ours"] / r["baseline"] if r["higher_is_better"] else r["baseline"] / r["ours"]
            assert r["ratio"] == pytest.approx(expected)
    table = (tmp_path / "RESULTS.md").read_text()
    assert table.index("| peer_topk |") < table.index("| topk |")  # peer rows first
    assert "torch" in table
    assert "QUICK" in table
    if not torch.cuda.is_available():
        assert all(
            written[n]["ratio"] is None
            for n in ("gpu_pli_step", "gpu_pli_bf16", "gpu_cam_batch", "gpu_lincir")
        )


def test_compare_swaps_the_order_and_reports_the_spread():
    calls = []
    timing = compare(lambda: calls.append("o"), lambda: calls.append("b"), reps=4, warmup=1)
    assert calls == ["o", "b", "o", "b", "b", "o", "o", "b", "b", "o"]  # warm-up, then o b | b o | o b | b o
    for side in ("ours", "baseline"):
        assert timing[side]["min"] <= timing[side]["median"] <= timing[side]["max"]
    assert timing["reps"] == 4
    assert len(timing["load"]) == 2


def test_same_compares_everything():
    a = {"x": torch.arange(5), "y": [1.0, "z"]}
    assert same(a, {"x": torch.arange(5), "y": [1.0, "z"]})
    assert not same(a, {"x": torch.tensor([0, 1, 2, 3, 5]), "y": [1.0, "z"]})  # the last element differs
    assert not same(a, {"x": torch.arange(5), "y": [1.0 + 1e-9, "z"]})
    assert same(1.0, 1.0 + 1e-9, atol=1e-6)


@pytest.mark.slow
def test_gpu_bench_code_runs_on_the_tiny_clip_on_cpu():
    """The GPU rows' code, exercised without a GPU: tiny CLIP (77-token context), CPU."""
    from experiments.bench import bench_gpu

    rows = bench_gpu.run(
        device="cpu",
        pli_model="tiny77",
        lincir_model="tiny77",
        pli_batch=4,
        cam_batch=4,
        lincir_batch=8,
        reps=1,
    )
    assert set(rows) == set(bench_gpu.ROWS)
    for name, r in rows.items():
        assert r["ours"] > 0, name
        assert r["baseline"] > 0, name
        assert r["baseline_is"], name
    for name in ("gpu_pli_step", "gpu_cam_batch", "gpu_lincir"):
        assert rows[name]["equal"] is True, name
    assert rows["gpu_pli_bf16"]["flops_per_step"] > 0
    assert rows["gpu_pli_bf16"]["mfu"] is None  # no known peak for a CPU
    assert rows["gpu_lincir"]["ours_peak_mib"] is None  # no GPU memory counter on a CPU


def test_drift_between_two_runs_names_the_rows_outside_the_tolerance():
    def r(ratio):
        return {"ratio": ratio, "ours": 1.0, "baseline": ratio, "unit": "s", "higher_is_better": False}

    previous = {"a": r(2.0), "b": r(10.0), "c": r(None), "gone": r(3.0)}
    now = {"a": r(2.2), "b": r(8.0), "c": r(1.0), "new": r(4.0)}
    assert run_all.drift(now, previous) == pytest.approx({"a": 0.1, "b": -0.2})  # c, gone, new: no pair
    lines = "\n".join(run_all._reproducibility(now, previous))
    assert "2 ratios compared; 1 within ±15% of the previous run; outside: b." in lines
    assert "| b | 10 | 8 | **-20.0%** |" in lines
    assert "| a | 2 | 2.2 | +10.0% |" in lines


def test_compare_repeats_a_cheap_side_and_reports_its_mean():
    calls = []

    def ours():
        calls.append("o")
        time.sleep(0.02)

    timing = compare(ours, lambda: calls.append("b"), reps=2, warmup=1, ours_repeat=3)
    assert calls == ["o", "b", "o", "o", "o", "b", "b", "o", "o", "o"]  # warm-up once, then o×3 b | b o×3
    assert 0.02 <= timing["ours"]["min"] <= timing["ours"]["max"] < 0.05  # a per-call mean, not 3 calls' 0.06
