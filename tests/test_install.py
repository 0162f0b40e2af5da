"""The built wheel works on its own: it carries its configs, and an installed ``zscir-train`` /
``zscir-eval`` / ``zscir-query`` started from any directory write there (``./outputs``, ``./data``),
never into site-packages.

The wheel is installed into a fresh virtual environment outside the repository whose only link to the
test environment is a ``.pth`` line naming that environment's site-packages: the dependencies (torch,
Lightning, ...) are reused, not downloaded, and the ``zscir`` imported is the wheel's (the test
environment's editable install is a ``.pth`` file there, which a ``.pth`` line does not process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import SMALL_WORLD
from custom_set import make_set

REPO = Path(__file__).resolve().parents[1]
TINY_WORLD = {**SMALL_WORLD, "corpus_train": 64, "corpus_val": 16, "text_captions": 64, "shard_size": 32}


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "ZSCIR_ROOT", "ZSCIR_DATA_DIR", "ZSCIR_OUTPUT_DIR", "ZSCIR_CONF_DIR")
    }
    # an empty user config folder: a developer's own local/default.yaml must not change this test
    return {**env, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "ZSCIR_CONFIG_DIR": str(tmp), **extra}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the sources (the build writes build/ and *.egg-info next to them)."""
    tmp = tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp / name)
    ignore = shutil.ignore_patterns("__pycache__", "local", "*.egg-info")
    shutil.copytree(REPO / "src", tmp / "src", ignore=ignore)
    dist = tmp / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(dist),
            ".",
        ],
        tmp,
        _env(tmp),
    )
    (built,) = dist.glob("zscir-*.whl")
    return built


def test_wheel_holds_every_config(wheel):
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    in_repo = {
        f"zscir/{p.relative_to(REPO / 'src' / 'zscir')}" for p in (REPO / "src/zscir/conf").rglob("*.yaml")
    }
    in_repo = {n for n in in_repo if not n.startswith("zscir/conf/local/")}
    assert "zscir/conf/train.yaml" in shipped
    assert shipped == in_repo


@pytest.mark.slow
def test_installed_wheel_trains_evaluates_and_queries_from_another_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zscir-test-deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    env = _env(tmp_path)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin/python"),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        tmp_path,
        env,
    )
    where = _run([str(venv / "bin/python"), "-c", "import zscir; print(zscir.__file__)"], tmp_path, env)
    assert Path(where.stdout.strip()).is_relative_to(site)

    installed = _files(site)
    work = tmp_path / "project"
    work.mkdir()
    synth = [f"synth.{k}={v}" for k, v in TINY_WORLD.items()]
    common = ["backbone=tiny", "eval.num_workers=0", "trainer.enable_progress_bar=false", *synth]
    _run(
        [
            str(venv / "bin/zscir-train"),
            "method=clip_pretrain",
            "data=synthetic",
            "data.num_workers=0",
            "data.batch_size=8",
            "trainer.max_steps=2",
            "eval_benchmarks=[synthetic_cirr]",
            *common,
        ],
        work,
        env,
    )
    (run,) = (work / "outputs/train/clip_pretrain").iterdir()
    assert (work / "data/synthetic/world.json").is_file()
    assert "synthetic_cirr/recall@1" in json.loads((run / "metrics.json").read_text())
    assert (run / "checkpoints/last.ckpt").is_file()

    # ZSCIR_OUTPUT_DIR moves outputs; the data stays under the current directory
    elsewhere = tmp_path / "elsewhere"
    _run(
        [str(venv / "bin/zscir-eval"), f"run_dir={run}", "benchmark=synthetic_cirr", *common],
        work,
        {**env, "ZSCIR_OUTPUT_DIR": str(elsewhere)},
    )
    (evaluation,) = (elsewhere / "eval/clip_pretrain").iterdir()
    assert json.loads((evaluation / "metrics.json").read_text())["recall@1"] >= 0

    # zscir-query with the trained run, on a folder of images; results and the gallery cache under ./outputs
    ids = make_set(work / "my_images")
    _run(
        [
            str(venv / "bin/zscir-query"),
            "--query",
            f"my_images/images/{ids[0]}",
            "same but red",
            "--gallery",
            "my_images/images",
            "--run",
            str(run),
            "-k",
            "3",
            "--device",
            "cpu",
        ],
        work,
        env,
    )
    (query,) = (work / "outputs/query").iterdir()
    assert len(json.loads((query / "results.json").read_text())["queries"][0]["results"]) == 3
    assert len(list((work / "outputs/cache/gallery").glob("*.pt"))) == 1
    assert _files(site) == installed  # nothing written into the installation
