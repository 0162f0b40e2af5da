"""Experiment operations: multirun sweeps, the DDP + multirun guard, W&B (offline), zscir-report over
sweeps, retrieval grids and re-evaluation from a run directory."""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import small_world_overrides
from zscir.benchmarks import build_benchmark
from zscir.cli import config, launch
from zscir.cli.evaluate import evaluate, load_run
from zscir.cli.launch import check_launch, relaunches_script
from zscir.cli.report import main as report_main
from zscir.cli.report import report
from zscir.cli.tracking import batch_size_of, wandb_safe
from zscir.cli.train import train
from zscir.evaluation.visualize import GT_COLOR, grid_size, pick_queries, render_grid, retrieve
from zscir.retrieval.search import target_ranks

SRC = Path(__file__).resolve().parents[1] / "src"


# ---- helpers ----------------------------------------------------------------------------------------
def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file (LevelDB-log framing of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, out = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if n == 0 and kind == 0:
            pos += left - 7
            continue
        buf += data[pos : pos + n]
        pos += n
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def wandb_run(run_dir: Path) -> dict:
    """The one offline W&B run under ``run_dir``: id, name, group, tags, history and summary keys."""
    (run_file,) = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    # wandb.finish() can return before W&B's service has written the last records: wait for the exit record
    for _ in range(120):
        records = wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.5)
    out = {"history": {}, "summary": {}, "config": set()}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group, tags=list(r.run.tags))
            out["config"] |= {u.key for u in r.run.config.update}
        elif kind == "config":
            out["config"] |= {u.key for u in r.config.update}
        elif kind == "history":
            for item in r.history.item:
                out["history"].setdefault("/".join(item.nested_key) or item.key, []).append(item.value_json)
        elif kind == "summary":
            for item in r.summary.update:
                out["summary"]["/".join(item.nested_key) or item.key] = item.value_json
    return out


def cli_env() -> dict:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


def train_cli(small_world: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "zscir.cli.train",
        *args,
        f"paths.data_dir={small_world}",
        f"paths.output_dir={out}",
        "eval.num_workers=0",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
        *small_world_overrides(),
    ]
    return subprocess.run(command, env=cli_env(), cwd=out.parent, capture_output=True, text=True, timeout=600)


# ---- sweeps -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_methods_two_seeds_sweep_then_report(small_world, tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    done = train_cli(
        small_world,
        out,
        "-m",
        "method=image_only,clip_pretrain",
        "seed=0,1",
        "backbone=tiny",
        "logger=[csv,wandb]",
        "logger.wandb.examples=2",
        "eval_benchmarks=[synthetic_cirr]",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "data.batch_size=32",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = [p for p in (out / "train" / "multirun").iterdir() if not p.is_symlink()]
    assert (out / "train" / "multirun" / "latest").resolve() == sweep.resolve()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == [
        "0_image_only_tiny_seed0",
        "1_image_only_tiny_seed1",
        "2_clip_pretrain_tiny_seed0",
        "3_clip_pretrain_tiny_seed1",
    ]
    for job in jobs:
        run = sweep / job
        info = json.loads((run / "run_info.json").read_text())
        assert (info["method"], info["seed"]) == (job.split("_tiny")[0][2:], int(job[-1]))
        assert (run / "train.log").stat().st_size > 0  # each job logs into its own directory
        assert (run / "csv").is_dir()
    assert (sweep / "2_clip_pretrain_tiny_seed0" / "checkpoints" / "last.ckpt").is_file()

    # one W&B run per job (wandb.finish between jobs), id = name = <sweep>_<job>, one group per sweep
    runs = {job: wandb_run(sweep / job) for job in jobs}
    assert [r["id"] for r in runs.values()] == [f"{sweep.name}_{job}" for job in jobs]
    assert all(r["name"] == r["id"] and r["group"] == sweep.name for r in runs.values())
    assert "method:clip_pretrain" in runs[jobs[2]]["tags"]
    assert "benchmark:synthetic_cirr" in runs[jobs[0]]["tags"]
    assert "train/loss" in runs[jobs[2]]["history"]
    assert "train/loss" not in runs[jobs[0]]["history"]  # a baseline trains nothing

    # the report command on the sweep: 2 rows, mean ± std over the 2 seeds
    report_main([str(out / "train" / "multirun" / "latest")])
    lines = (sweep / "results.md").read_text().splitlines()
    assert lines[2].startswith("| method | seeds | synthetic_cirr/recall@1")
    rows = list(csv.DictReader((sweep / "results.csv").read_text().splitlines()))
    assert [r["method"] for r in rows] == ["image_only", "clip_pretrain"]
    assert all(r["seeds"] == "2" for r in rows)
    for row, first in zip(rows, (jobs[0], jobs[2])):
        second = jobs[jobs.index(first) + 1]
        a, b = (json.loads((sweep / j / "metrics.json").read_text()) for j in (first, second))
        for key in ("synthetic_cirr/recall@5", "synthetic_cirr/recall_subset@1"):
            assert float(row[key]) == pytest.approx((a[key] + b[key]) / 2, abs=1e-4)
            assert float(row[f"{key} std"]) == pytest.approx(abs(a[key] - b[key]) / 2**0.5, abs=1e-4)
    # a zero-shot baseline on a fixed backbone does not depend on the seed
    assert float(rows[0]["synthetic_cirr/recall@1 std"]) == 0.0
    assert (sweep / "results.png").stat().st_size > 1000


@pytest.mark.slow
def test_multirun_refuses_ddp_that_relaunches_the_script(small_world, tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    done = train_cli(small_world, out, "-m", "method=image_only,sum", "trainer=ddp_cpu", "backbone=tiny")
    assert done.returncode != 0
    assert "re-running this" in done.stderr
    assert "ddp_spawn" in done.stderr
    assert not list(out.rglob("metrics.json"))


def test_launch_guard_rules(compose, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert relaunches_script({"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
    assert relaunches_script({"accelerator": "cpu", "devices": 1, "strategy": "ddp", "num_nodes": 2})
    assert not relaunches_script({"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"})
    assert not relaunches_script({"accelerator": "cpu", "devices": 1, "strategy": "ddp"})
    assert not relaunches_script({"accelerator": "cpu", "devices": "auto", "strategy": "auto"})

    ddp = compose("train", ["trainer=ddp_cpu"])
    check_launch(ddp, multirun=False)  # a single run: Lightning's own re-launch is fine
    with pytest.raises(RuntimeError, match="whole sweep"):
        check_launch(ddp, multirun=True)
    check_launch(compose("train", ["trainer=ddp_cpu", "trainer.strategy=ddp_spawn"]), multirun=True)
    single = compose("train", [])
    check_launch(single, multirun=True)
    monkeypatch.setenv("WORLD_SIZE", "4")  # a sweep started under torchrun: every rank would run it
    with pytest.raises(RuntimeError, match="every process"):
        check_launch(single, multirun=True)


def test_run_stamp_agrees_across_processes_of_one_launch(monkeypatch):
    for var in ("ZSCIR_RUN_ID", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    alone = launch.run_stamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", alone)
    assert launch.run_stamp() != alone  # two single-process runs in the same second do not collide
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert launch.run_stamp() != launch.run_stamp()  # one task: an allocation may host several runs
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    assert launch.run_stamp() == "slurm-4242-3"
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "5b1e0c2a-9d")
    assert launch.run_stamp() == "torchrun-5b1e0c2a-9d"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # plain torchrun: the workers share their parent
    assert launch.run_stamp() == launch.run_stamp()
    assert launch.run_stamp().startswith("torchrun-")
    monkeypatch.setenv("ZSCIR_RUN_ID", "my-run")
    assert launch.run_stamp() == "my-run"


def test_hparams_search_grid_composes(compose):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", ["hparams_search=compare"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params.seed == "0,1,2"


@pytest.mark.parametrize("name", ["pli_optuna", "lincir_optuna", "cam_ti_optuna"])
def test_optuna_search_configs(name):
    """Needs the optional sweeper plugin (pip install 'zscir[optuna]') and the method's config."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    method = name.removesuffix("_optuna")
    if not (config.CONF_DIR / "method" / f"{method}.yaml").is_file():
        pytest.skip(f"conf/method/{method}.yaml is not there yet")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", [f"hparams_search={name}"], return_hydra_config=True)
    assert cfg.method.kind == method
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, key  # every searched key exists in the method


# ---- W&B --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wandb_offline_run_holds_config_losses_lr_throughput_metrics_and_examples(compose, tmp_path):
    import wandb

    cfg = compose(
        "train",
        [
            "method=clip_pretrain",
            "backbone=tiny",
            "logger=wandb",
            "logger.wandb.examples=2",
            "tags=[smoke]",
            "eval_benchmarks=[synthetic_cirr]",
            "trainer.max_steps=3",
            "trainer.log_every_n_steps=1",
            "data.batch_size=32",
        ],
    )
    metrics = train(cfg)
    assert wandb.run is None  # finished: the next run in this process starts its own
    run = wandb_run(tmp_path / "run")
    assert run["id"] == run["name"] == "run"  # the run directory's name
    assert run["group"] == "clip_pretrain"
    assert {"smoke", "method:clip_pretrain", "backbone:tiny", "benchmark:synthetic_cirr"} <= set(run["tags"])
    assert {"method", "backbone", "trainer", "seed"} <= run["config"]
    history = run["history"]
    assert all(float(v) > 0 for v in history["train/loss"])  # InfoNCE of a random model: positive
    assert "lr-AdamW" in history
    assert all(float(v) > 0 for v in history["train/samples_per_sec"])
    assert float(history["test/synthetic_cirr/recall@5"][-1]) == pytest.approx(
        metrics["synthetic_cirr/recall@5"], abs=1e-4
    )
    assert float(run["summary"]["final/synthetic_cirr/recall@1"]) == pytest.approx(
        metrics["synthetic_cirr/recall@1"], abs=1e-4
    )
    assert run["summary"]["examples/synthetic_cirr/_type"] == '"table-file"'
    assert run["summary"]["examples/synthetic_cirr/nrows"] == "2"


def test_unreachable_wandb_never_fails_a_run(compose, tmp_path, monkeypatch, caplog):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    wandb.teardown()  # W&B caches its settings per process: make it read this environment
    try:
        cfg = compose(
            "train",
            ["method=image_only", "backbone=tiny", "logger=wandb", "eval_benchmarks=[synthetic_cirr]"],
        )
        metrics = train(cfg)
    finally:
        monkeypatch.undo()
        wandb.teardown()
    assert "synthetic_cirr/recall@1" in metrics
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(metrics)
    assert "logger wandb could not start" in caplog.text
    assert not list((tmp_path / "run").glob("wandb/*run-*/run-*.wandb"))  # no W&B run, not even offline


def test_wandb_names_and_batch_sizes():
    assert wandb_safe("2026-11-23_10-00-00_ab12cd") == "2026-11-23_10-00-00_ab12cd"
    assert wandb_safe("a/b:c d") == "a-b-c-d"
    long_a, long_b = wandb_safe("x" * 80 + "a"), wandb_safe("x" * 80 + "b")
    assert len(long_a) == 64
    assert long_a != long_b
    assert batch_size_of({"index": torch.arange(7), "caption": ["a"] * 7}) == 7
    assert batch_size_of({"caption": ["a", "b"]}) == 2
    assert batch_size_of((torch.zeros(5, 3), ["t"] * 5)) == 5
    assert batch_size_of({"skipped": 3}) == 0


# ---- retrieval grids --------------------------------------------------------------------------------
def test_visualize_writes_grids_with_ground_truth_outlined(compose, tmp_path):
    run = tmp_path / "e"
    metrics = evaluate(
        compose(
            "eval",
            [
                "method=sum",
                "backbone=tiny",
                "benchmark=synthetic_cirr",
                f"paths.run_dir={run}",
                "visualize=3",
                "visualize_k=4",
            ],
        )
    )
    grids = sorted((run / "retrievals" / "synthetic_cirr").glob("*.png"))
    assert len(grids) == 3
    width, height = 8 + 6 * (128 + 8), 8 + 3 * 14 + 8 + 128 + 2 * 14 + 8  # reference + 4 results + target
    assert grid_size(4, labelled=True) == (width, height)
    for grid in grids:
        with Image.open(grid) as image:
            assert image.size == (width, height)
            x_target = 8 + 5 * (128 + 8)
            assert image.convert("RGB").getpixel((x_target + 1, 8 + 3 * 14 + 8 + 64)) == GT_COLOR

    # the grids rank exactly as the metric does: recall@k from their target ranks equals the run's
    feats = dict(np.load(run / "features.npz"))
    cfg = compose("eval", ["benchmark=synthetic_cirr"])
    bench = build_benchmark("cirr", cfg.benchmark.root, "val", name="synthetic_cirr")
    q, g = bench.features_from_arrays(feats)
    items = retrieve(bench, q, g, list(range(len(bench.queries))), k=5)
    ranks = torch.tensor([it.target_rank for it in items])
    for k in (1, 5, 10):
        assert (ranks <= k).float().mean().item() * 100 == pytest.approx(metrics[f"recall@{k}"], abs=1e-3)
    index = bench.gallery_index()
    reference = torch.tensor([index[qq.reference.image_id] for qq in bench.queries])
    target = torch.tensor([index[qq.target_ids[0]] for qq in bench.queries])
    assert ranks.tolist() == (target_ranks(q, g, target, exclude=reference) + 1).tolist()  # 0-based there
    assert all(index[it.query.reference.image_id] not in it.ranked for it in items)  # CIRR removes it


def test_grid_of_an_unlabelled_split_has_no_target_column(compose):
    cfg = compose("eval", ["benchmark=synthetic_cirr", "benchmark.split=test1"])
    bench = build_benchmark("cirr", cfg.benchmark.root, "test1", name="synthetic_cirr")
    q = torch.randn(len(bench.queries), 8, generator=torch.Generator().manual_seed(0))
    g = torch.randn(len(bench.gallery), 8, generator=torch.Generator().manual_seed(1))
    (item,) = retrieve(bench, q, g, [2], k=3)
    assert item.target_rank is None
    assert len(item.ranked) == 3
    assert render_grid(bench, item, k=3, tile=64).size == grid_size(3, labelled=False, tile=64)
    assert grid_size(3, labelled=False, tile=64) == (8 + 4 * 72, 8 + 42 + 8 + 64 + 28 + 8)
    assert pick_queries(10, 3) == [0, 4, 9]
    assert pick_queries(3, 8) == [0, 1, 2]


# ---- re-evaluation from a run directory -------------------------------------------------------------
@pytest.mark.slow
def test_reevaluation_from_a_run_dir_reproduces_the_training_metrics(compose, tmp_path):
    cfg = compose(
        "train",
        [
            "method=clip_pretrain",
            "backbone=tiny",
            "seed=3",
            "label=my_clip",
            "eval_benchmarks=[synthetic_cirr]",
            "trainer.max_steps=2",
            "trainer.precision=32-true",
            "data.batch_size=32",
        ],
    )
    trained = train(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "run_info.json").read_text())["checkpoint"] == "checkpoints/last.ckpt"
    # no method/backbone/seed overrides: all of it comes from the run directory
    again = evaluate(
        compose("eval", [f"run_dir={run}", "benchmark=synthetic_cirr", f"paths.run_dir={tmp_path / 'e'}"])
    )
    assert again == pytest.approx({k.split("/", 1)[1]: v for k, v in trained.items()}, abs=1e-4)
    info = json.loads((tmp_path / "e" / "run_info.json").read_text())
    assert (info["method"], info["backbone"], info["seed"], info["label"]) == (
        "clip_pretrain",
        "tiny",
        3,
        "my_clip",
    )
    assert info["checkpoint"] == str(run / "checkpoints" / "last.ckpt")

    # the checkpoint the run's metrics came from wins over last.ckpt
    best = run / "checkpoints" / "epoch_000.ckpt"
    best.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    info_file = run / "run_info.json"
    info_file.write_text(
        json.dumps({**json.loads(info_file.read_text()), "checkpoint": "checkpoints/epoch_000.ckpt"})
    )
    assert load_run(run)[1] == best

    # an evaluation of a run is filed under that run's method
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        hcfg = hydra_compose(
            "eval", [f"run_dir={run}", f"paths.output_dir={tmp_path}"], return_hydra_config=True
        )
    assert f"{tmp_path}/eval/clip_pretrain/" in hcfg.hydra.run.dir
    OmegaConf.set_readonly(hcfg, False)
    hcfg.hydra.job.num = 7
    assert hcfg.hydra.sweep.subdir == "7_clip_pretrain_tiny_seed3"

    # a trained method without its checkpoint is refused rather than evaluated at random init
    best.unlink()
    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate(compose("eval", [f"run_dir={run}", f"paths.run_dir={tmp_path / 'f'}"]))


def test_run_dir_that_is_not_a_run_is_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a zscir run directory"):
        load_run(tmp_path / "empty")
    for job in ("0_sum_tiny_seed0", "1_sum_tiny_seed1"):
        (tmp_path / "sweep" / job).mkdir(parents=True)
        (tmp_path / "sweep" / job / "resolved_config.yaml").write_text("method: {kind: sum}\n")
    with pytest.raises(FileNotFoundError, match=r"holds 2 run\(s\) .*zscir-eval -m run_dir="):
        load_run(tmp_path / "sweep")


# ---- zscir-report over sweeps -----------------------------------------------------------------------
def _fake_run(
    root: Path,
    name: str,
    label: str,
    seed: int,
    method_cfg: dict,
    metrics: dict,
    benchmark: str = "synthetic_cirr",
    task: str = "train",
) -> None:
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    info = {"task": task, "label": label, "method": method_cfg["kind"], "backbone": "tiny", "seed": seed}
    (run / "run_info.json").write_text(json.dumps({**info, "benchmarks": [benchmark]}))
    config = {
        "seed": seed,
        "method": method_cfg,
        "backbone": {"name": "tiny"},
        "paths": {"run_dir": str(run)},  # differs between every run: never a swept setting
        "trainer": {"max_epochs": 1, "enable_progress_bar": seed == 0},
    }
    if task == "train":
        config["data"] = {"batch_size": 32}  # evaluations have no data section: not a swept setting either
    (run / "resolved_config.yaml").write_text(OmegaConf.to_yaml(config))


def test_report_splits_rows_by_the_swept_setting_and_plots_it(tmp_path):
    sweep = tmp_path / "sweep"
    job = 0
    for weight in (0.5, 1.0):
        for seed in (0, 1):
            r1 = 10 * weight + seed  # recall@1: mean 10*w + 0.5, std sqrt(0.5)
            _fake_run(
                sweep,
                f"{job}_sum",
                "sum",
                seed,
                {"kind": "sum", "img_weight": weight},
                {"synthetic_cirr/recall@1": r1},
            )
            job += 1
    for seed in (0, 1):
        _fake_run(
            sweep,
            f"{job}_image_only",
            "image_only",
            seed,
            {"kind": "image_only"},
            {"synthetic_cirr/recall@1": 3.0},
        )
        job += 1
    paths = report([sweep], tmp_path / "report")
    rows = list(csv.DictReader(paths["csv"].read_text().splitlines()))
    assert [(r["method"], r["method.img_weight"]) for r in rows] == [
        ("sum", "0.5"),
        ("sum", "1"),
        ("image_only", "–"),
    ]
    assert [float(r["synthetic_cirr/recall@1"]) for r in rows] == pytest.approx([5.5, 10.5, 3.0])
    assert [float(r["synthetic_cirr/recall@1 std"]) for r in rows] == pytest.approx(
        [0.5**0.5, 0.5**0.5, 0.0], abs=1e-4
    )
    assert paths["markdown"].read_text().splitlines()[2].startswith("| method | method.img_weight | seeds |")
    assert paths["sweep_plot"].name == "results_method.img_weight.png"
    assert paths["sweep_plot"].stat().st_size > 1000


def test_report_of_runs_without_a_swept_setting_keeps_the_plain_table(tmp_path):
    for i, label in enumerate(("image_only", "sum")):
        _fake_run(
            tmp_path / "runs", f"{i}_{label}", label, 0, {"kind": label}, {"synthetic_cirr/recall@1": 1.0 + i}
        )
    paths = report([tmp_path / "runs"], tmp_path / "report")
    assert paths["markdown"].read_text().splitlines()[2] == "| method | synthetic_cirr/recall@1 |"
    assert "sweep_plot" not in paths


def test_report_merges_a_sweep_with_its_re_evaluations(tmp_path):
    for seed in (0, 1):
        cirr = {"synthetic_cirr/recall@1": 10.0 + seed}
        _fake_run(tmp_path / "train", f"{seed}_sum", "sum", seed, {"kind": "sum"}, cirr)
        # zscir-eval run_dir=... benchmark=synthetic_circo: plain metric names, some with a "/"
        circo = {"map@10": 20.0 + 2 * seed, "semantic_map@10/negation": 5.0}
        _fake_run(
            tmp_path / "eval", f"{seed}_sum", "sum", seed, {"kind": "sum"}, circo, "synthetic_circo", "eval"
        )
    paths = report([tmp_path / "train", tmp_path / "eval"], tmp_path / "report")
    (row,) = list(csv.DictReader(paths["csv"].read_text().splitlines()))
    assert row["seeds"] == "2"  # two seeds, not four runs
    assert float(row["synthetic_cirr/recall@1"]) == pytest.approx(10.5)
    assert float(row["synthetic_circo/map@10"]) == pytest.approx(21.0)
    assert float(row["synthetic_circo/map@10 std"]) == pytest.approx(2**0.5, abs=1e-4)
    assert float(row["synthetic_circo/semantic_map@10/negation"]) == pytest.approx(5.0)
