"""Each bench script runs end to end on tiny sizes and writes well-formed results (no timing assertions)."""

import json

import pytest
import torch
from experiments.bench import run_all


@pytest.mark.slow
def test_bench_quick_writes_results_and_table(tmp_path):
    results = run_all.run(quick=True, out_dir=tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert set(written) == set(results)
    assert {
        "topk",
        "topk_memory",
        "gallery_cache",
        "pli_dropping",
        "pli_dropping_step",
        "lincir_step",
        "cam_batch",
        "cam_cache",
        "framework_overhead",
    } <= set(written)
    for name, r in written.items():
        assert set(r) >= {"ours", "baseline", "unit", "ratio", "higher_is_better"}, name
        if r["ratio"] is not None:
            expected = r["ours"] / r["baseline"] if r["higher_is_better"] else r["baseline"] / r["ours"]
            assert r["ratio"] == pytest.approx(expected)
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| topk |" in table
    assert "torch" in table
    assert "QUICK" in table
    if not torch.cuda.is_available():
        assert all(written[name]["ratio"] is None for name in ("gpu_pli_bf16", "gpu_cam_batch", "gpu_lincir"))


@pytest.mark.slow
def test_gpu_bench_code_runs_on_the_tiny_clip_on_cpu():
    """The GPU rows' code, exercised without a GPU: tiny CLIP, CPU, bf16 autocast on CPU."""
    from experiments.bench import bench_gpu

    rows = bench_gpu.run(
        device="cpu", pli_model="tiny", lincir_model="tiny", pli_batch=4, cam_batch=4, lincir_batch=8, reps=1
    )
    assert set(rows) == {"gpu_pli_bf16", "gpu_cam_batch", "gpu_lincir"}
    for name, r in rows.items():
        assert r["ours"] > 0, name
        assert r["baseline"] > 0, name
    assert rows["gpu_pli_bf16"]["flops_per_step"] > 0
    assert rows["gpu_pli_bf16"]["mfu"] is None  # no known peak for a CPU
    assert rows["gpu_lincir"]["baseline"] == pytest.approx(444.44, abs=0.01)
