"""DDP on CPU (gloo, 2 processes): the same numbers as one process.

* contrastive training with gathered negatives: 2 processes × batch B == 1 process × batch 2B (the
  helper's gradients exactly; a whole training run's loss trajectory and weights within float noise,
  across a SIGTERM — every rank saves at the agreed step and exits 143 — and a DDP resume);
* evaluation through ``zscir-train`` on benchmarks with an odd number of queries and gallery images
  (the sampler pads) == 1 process, exactly; one run directory for all processes.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.multiprocessing as mp

from conftest import SMALL_WORLD
from reliability_helpers import (
    PAUSING_TRAIN,
    TINY_CLIP_RUN,
    base_overrides,
    checkpoint,
    kill_group,
    loss_trajectory,
    max_weight_difference,
    run_train,
    start,
    tail,
    wait_for,
)
from zscir.benchmarks import build_benchmark
from zscir.cli.callbacks import PREEMPTED_EXIT_CODE
from zscir.cli.config import compose_config
from zscir.cli.train import train
from zscir.data.synthetic import SynthConfig, generate_world

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

DDP_TRAIN = [*TINY_CLIP_RUN, "eval_benchmarks=[]", "trainer=ddp_cpu", "data.batch_size=8"]


@pytest.fixture(autouse=True)
def _restore_determinism_flag():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_gathered_contrastive_loss_gives_the_single_process_gradients(tmp_path):
    from helpers.dist_workers import CASES, gather_worker, loss_and_grads

    out = tmp_path / "ranks.pt"
    mp.spawn(gather_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    results = torch.load(out, weights_only=True)
    for name, (sizes, _, loss_kind) in CASES.items():
        # one process holding both ranks' rows
        loss, grads = loss_and_grads(slice(0, sum(sizes)), sum(sizes), gather=True, loss_kind=loss_kind)
        same = torch.allclose(results[name]["loss"], loss, atol=1e-6) and all(
            torch.allclose(a, b, atol=1e-6) for a, b in zip(results[name]["grads"], grads)
        )
        # control: without gathering, each rank sees only its own B - 1 negatives: another objective
        assert same == ("local_only" not in name), name


def test_ddp_training_matches_one_process_with_double_batch_across_a_preemption(small_world, tmp_path):
    """2 processes × batch 8 with gathered negatives == 1 process × batch 16, step by step, also after a
    SIGTERM (to rank 0 only, as a user's kill would send it) and a DDP resume."""
    single = tmp_path / "single"
    one_process = [*base_overrides(small_world, tmp_path / "outputs"), *TINY_CLIP_RUN, "eval_benchmarks=[]"]
    train(compose_config("train", [*one_process, "data.batch_size=16", f"paths.run_dir={single}"]))
    reference = loss_trajectory(single)
    assert sorted(reference) == list(range(8))

    run, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "preempted.log"
    overrides = [*base_overrides(small_world, tmp_path / "outputs"), *DDP_TRAIN]
    proc = start(
        [str(PAUSING_TRAIN), *overrides, f"hydra.run.dir={run}"],
        log,
        ZSCIR_PAUSE_AT_STEP="5",
        ZSCIR_PAUSE_MARKER=str(marker),
    )
    try:
        assert wait_for(marker, proc, log).split() == ["5", "1", "1"]
        os.kill(proc.pid, signal.SIGTERM)  # rank 1 learns it from rank 0 at the end of the batch
        rc = proc.wait(timeout=180)
    finally:
        kill_group(proc)
    assert rc == PREEMPTED_EXIT_CODE, tail(log)
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1 ran, in the same run directory
    assert checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    before = loss_trajectory(run)
    assert sorted(before) == list(range(6))
    assert before == pytest.approx({k: reference[k] for k in before}, rel=1e-5), "DDP != 1 process"

    run_train([*overrides, f"hydra.run.dir={run}", "resume=last"], tmp_path / "resumed.log")
    after = loss_trajectory(run)
    assert after == pytest.approx(reference, rel=1e-5), "the resumed DDP steps differ"
    a, b = checkpoint(run / "checkpoints" / "last.ckpt"), checkpoint(single / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    assert max_weight_difference(a, b) < 1e-4  # a step's update is ~lr = 1e-4; summation order differs


# ---- evaluation -----------------------------------------------------------------------------------------
ODD_WORLD = dict(
    SMALL_WORLD,
    corpus_train=64,
    corpus_val=16,
    text_captions=64,
    shard_size=64,
    cirr_val_sets=5,
    cirr_test_sets=1,
    circo_val=7,
    circo_test=1,
    circo_pool=20,
)


def test_ddp_evaluation_equals_one_process_with_odd_query_and_gallery_counts(tmp_path):
    data = tmp_path / "data"
    generate_world(data / "synthetic", SynthConfig(**ODD_WORLD))
    sizes = {
        kind: (len(b.queries), len(b.gallery))
        for kind in ("cirr", "circo")
        if (b := build_benchmark(kind, data / "synthetic" / kind, "val"))
    }
    assert all(q % 2 == 1 for q, _ in sizes.values()), sizes  # the DistributedSampler must pad
    assert sizes["circo"][1] % 2 == 1, sizes  # and the gallery shards are uneven
    world = [f"synth.{k}={v}" for k, v in ODD_WORLD.items()]
    common = [
        "method=sum",
        "backbone=tiny",
        f"paths.data_dir={data}",
        "eval.num_workers=0",
        "eval.batch_size=4",
        "eval.cache_gallery=false",  # both runs encode their galleries (sharded over the 2 ranks)
        "trainer.enable_progress_bar=false",
        *world,
    ]
    run_train([*common, "trainer=ddp_cpu", f"paths.output_dir={tmp_path / 'ddp'}"], tmp_path / "ddp.log")
    (run,) = (tmp_path / "ddp" / "train" / "sum").iterdir()  # one run directory for both processes
    assert (run / "train_ddp_process_1.log").is_file()
    ddp = json.loads((run / "metrics.json").read_text())
    # Lightning gives each CPU DDP rank cores // ranks threads; the one-process run uses as many, because
    # BLAS kernels pick their blocking by thread count and a 1-ulp feature change can flip a near-tie
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    try:
        single = train(
            compose_config(
                "train",
                [*common, f"paths.output_dir={tmp_path / 'one'}", f"paths.run_dir={tmp_path / 'one'}"],
            )
        )
    finally:
        torch.set_num_threads(threads)
    assert {"synthetic_cirr/recall@1", "synthetic_circo/map@10"} <= set(ddp)
    assert ddp == single
