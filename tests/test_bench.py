"""Each bench script runs end to end on tiny sizes and writes well-formed results (no timing assertions)."""

import json

import pytest
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
