"""Kill and resume: a run killed mid-epoch (SIGKILL) or pre-empted (SIGTERM) and resumed from its last
checkpoint ends exactly like a run that was never interrupted; checkpoints are never half-written; a run
directory is never silently reused. (The DDP variant is in test_ddp.py.)"""

from __future__ import annotations

import csv
import multiprocessing
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

import zscir.data.samplers as samplers
from reliability_helpers import (
    PAUSING_TRAIN,
    TINY_CLIP_RUN,
    base_overrides,
    checkpoint,
    kill_group,
    loss_trajectory,
    max_weight_difference,
    start,
    tail,
    wait_for,
)
from zscir.cli.callbacks import PREEMPTED_EXIT_CODE, AtomicCheckpointIO, ResumeState
from zscir.cli.config import compose_config
from zscir.cli.train import resolve_resume, train
from zscir.data.samplers import ResumableDataLoader, ResumableSampler
from zscir.utils.io import remove_stale_temp_files


@pytest.fixture(autouse=True)
def _restore_determinism_flag():
    """trainer.deterministic=true switches torch to deterministic algorithms process-wide; undo it."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def uninterrupted(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """The reference: the same run, never interrupted (in this process). Returns (metrics, run dir)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    cfg = compose_config(
        "train",
        [*base_overrides(small_world, out / "outputs"), *TINY_CLIP_RUN, f"paths.run_dir={out / 'run'}"],
    )
    metrics = train(cfg)
    torch.use_deterministic_algorithms(False)
    return metrics, out / "run"


def _versions(run: Path) -> list[list[int]]:
    """The steps each launch of a run trained, launch by launch (a resumed run adds a CSV log version)."""
    out = []
    for file in sorted((run / "csv").glob("version_*/metrics.csv")):
        with open(file, newline="") as f:
            out.append(sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")))
    return out


def _interrupt(overrides: list[str], run: Path, step: int, sig: int, log: Path) -> tuple[int, list[str]]:
    """Launch (or resume) the run, let it pause before optimizer step ``step``, send ``sig``.

    Returns the exit status and where it paused: [global step, epoch, batch index in the epoch].
    """
    marker = run.parent / f"paused_before_step_{step}"
    proc = start(
        [str(PAUSING_TRAIN), *overrides, f"hydra.run.dir={run}"],
        log,
        ZSCIR_PAUSE_AT_STEP=str(step),
        ZSCIR_PAUSE_MARKER=str(marker),
    )
    try:
        where = wait_for(marker, proc, log).split()
        os.kill(proc.pid, sig)
        rc = proc.wait(timeout=180)
    finally:
        kill_group(proc)
    return rc, where


@pytest.mark.slow
def test_killed_and_preempted_run_resumes_to_the_uninterrupted_result(small_world, tmp_path, uninterrupted):
    """One run, interrupted three times, each resumed from what the interruption left on disk:

    1. SIGKILL in the middle of epoch 0 (before step 2): resume from the periodic step checkpoint;
    2. SIGKILL right after epoch 0 (before step 4): resume from the end-of-epoch checkpoint;
    3. SIGTERM in the middle of epoch 1 (before step 6): the batch in flight finishes, last.ckpt is
       written at step 7, exit status 143; resume from that.
    The result — metrics, per-step losses, weights — is the uninterrupted run's.
    """
    run = tmp_path / "run"
    overrides = [
        *base_overrides(small_world, tmp_path / "outputs"),
        *TINY_CLIP_RUN,
        "checkpoint.every_n_train_steps=2",
    ]
    last = run / "checkpoints" / "last.ckpt"

    rc, where = _interrupt(overrides, run, 2, signal.SIGKILL, tmp_path / "1.log")
    assert (rc, where) == (-signal.SIGKILL, ["2", "0", "2"])
    assert checkpoint(last)["global_step"] == 2  # complete and loadable

    rc, where = _interrupt([*overrides, "resume=last"], run, 4, signal.SIGKILL, tmp_path / "2.log")
    assert (rc, where) == (-signal.SIGKILL, ["4", "1", "0"]), tail(tmp_path / "2.log")
    at_epoch_end = checkpoint(last)
    assert at_epoch_end["global_step"] == 4
    assert at_epoch_end["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 1  # epoch 0 done

    log = tmp_path / "3.log"
    rc, where = _interrupt([*overrides, "resume=last"], run, 6, signal.SIGTERM, log)
    assert (rc, where) == (PREEMPTED_EXIT_CODE, ["6", "1", "2"]), tail(log)
    assert "SIGTERM: saved" in log.read_text()
    assert "Traceback" not in log.read_text(), tail(log)
    assert checkpoint(last)["global_step"] == 7  # no periodic save at odd steps: the signal wrote it
    assert not (run / "metrics.json").exists()

    metrics = train(compose_config("train", [*overrides, f"paths.run_dir={run}", "resume=last"]))
    assert _versions(run) == [[0, 1], [2, 3], [4, 5, 6], [7]]  # no batch trained twice, none skipped
    reference_metrics, reference_run = uninterrupted
    assert metrics == reference_metrics
    assert loss_trajectory(run) == pytest.approx(loss_trajectory(reference_run), rel=1e-6, abs=0)
    final, reference = checkpoint(last), checkpoint(reference_run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == reference["global_step"] == 8
    assert max_weight_difference(final, reference) <= 1e-6


# ---- the pieces, one at a time (fast) ------------------------------------------------------------------
class _Range(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _epoch(loader: ResumableDataLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [b.tolist() for b in loader]


def test_data_order_is_a_function_of_seed_and_epoch_only():
    a, b = ResumableDataLoader(_Range(40), 8, seed=3), ResumableDataLoader(_Range(40), 8, seed=3)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 5) == _epoch(b, 5)  # b never iterated epochs 1-4: no hidden generator state
    assert _epoch(a, 1) != _epoch(a, 0)
    assert sorted(i for batch in _epoch(a, 2) for i in batch) == list(range(40))
    assert _epoch(ResumableDataLoader(_Range(40), 8, seed=4), 0) != _epoch(a, 0)


def test_world_of_two_times_b_sees_the_batches_of_one_times_2b(monkeypatch):
    single = _epoch(ResumableDataLoader(_Range(64), 16, seed=0), 1)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(samplers, "_world", lambda rank=rank: (rank, 2))
        shards.append(_epoch(ResumableDataLoader(_Range(64), 8, seed=0), 1))
    assert [sorted(r0 + r1) for r0, r1 in zip(*shards)] == [sorted(b) for b in single]


def test_resumed_loader_continues_after_the_last_trained_batch():
    full = _epoch(ResumableDataLoader(_Range(50), 8, seed=1), 2)
    loader = ResumableDataLoader(_Range(50), 8, seed=1)
    loader.sampler.set_epoch(2)
    it = iter(loader)
    trained = [next(it).tolist() for _ in range(3)]
    position = loader.position()
    assert position["epoch"] == 2
    assert position["batches"] == 3
    fresh = ResumableDataLoader(_Range(50), 8, seed=1)
    fresh.resume(position)
    assert trained + _epoch(fresh, 2) == full
    assert fresh.position()["batches"] == len(full)  # counts the skipped batches too
    assert _epoch(fresh, 3) == _epoch(ResumableDataLoader(_Range(50), 8, seed=1), 3)  # one-shot skip


def test_mid_epoch_resume_with_other_data_settings_is_refused():
    loader = ResumableDataLoader(_Range(50), 8, seed=1)
    position = {**loader.position(), "batches": 2}
    with pytest.raises(ValueError, match=r"batch_size 16 -> 8"):
        loader.resume({**position, "batch_size": 16})
    loader.resume({**position, "batch_size": 16, "batches": 99})  # after a whole epoch it is fine


def test_resume_state_restores_rng_and_data_position():
    loader = ResumableDataLoader(_Range(32), 4, seed=0)
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(_combined_loader=SimpleNamespace(flattened=[loader])))
    saver = ResumeState()
    saver.setup(trainer, None, "fit")
    loader.sampler.set_epoch(1)
    it = iter(loader)
    next(it)
    torch.manual_seed(7)
    state = saver.state_dict()
    expected = (torch.rand(3), [b.tolist() for b in it])
    torch.manual_seed(123)  # a fresh process would be somewhere else entirely

    restored_loader = ResumableDataLoader(_Range(32), 4, seed=0)
    restored = SimpleNamespace(
        fit_loop=SimpleNamespace(_combined_loader=SimpleNamespace(flattened=[restored_loader]))
    )
    loader_side = ResumeState()
    loader_side.load_state_dict(state)
    loader_side.on_train_start(restored, None)
    assert torch.equal(torch.rand(3), expected[0])
    assert _epoch(restored_loader, 1) == expected[1]


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    path, writing = tmp_path / "last.ckpt", tmp_path / "writing"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(4)}, path)

    def child() -> None:
        def slow_save(obj: object, f: object) -> None:  # half a checkpoint, then the kill arrives
            f.write(b"\0" * 1_000_000)
            f.flush()
            writing.touch()
            time.sleep(120)

        torch.save = slow_save
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(4)}, path)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not writing.exists():
            assert proc.is_alive(), "the writer died before it started writing"
            assert time.monotonic() < deadline, "the writer never started"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == -signal.SIGKILL
    kept = torch.load(path, weights_only=True)
    assert kept["global_step"] == 1
    assert torch.equal(kept["w"], torch.ones(4))
    leftovers = sorted(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(leftovers) == 1  # the killed write's temp file; a resumed run removes it:
    assert remove_stale_temp_files(tmp_path) == leftovers
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_run_directory_that_holds_a_run_is_not_reused_silently(compose, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"previous run")
    with pytest.raises(FileExistsError, match=r"already holds a run.*resume=last"):
        train(compose("train", ["method=sum", "backbone=tiny"]))
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"metrics\.json"):
        train(compose("train", ["method=sum", "backbone=tiny"]))


def test_resume_values(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume(None, run) is None  # a fresh directory
    assert resolve_resume("last", run) is None  # nothing to resume yet: first launch of a requeued job
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / "checkpoints" / ".last.ckpt.abc.tmp").write_bytes(b"half")
    assert resolve_resume("last", run) == str(run / "checkpoints" / "last.ckpt")
    assert not (run / "checkpoints" / ".last.ckpt.abc.tmp").exists()  # a killed write's leftovers
    with pytest.raises(FileNotFoundError, match=r"resume='lats'.*resume=last"):
        resolve_resume("lats", run)


def test_resumable_sampler_is_kept_by_lightning_under_ddp():
    # Lightning replaces any sampler that is not a DistributedSampler; ours must survive that check
    from torch.utils.data import DistributedSampler

    assert isinstance(ResumableSampler(10), DistributedSampler)
