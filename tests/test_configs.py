"""Every config file composes and validates; typos fail at start-up with their name."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from zscir.cli.config import CONF_DIR, benchmark_configs, plain, validate_config

GROUP_FILES = {
    g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml"))
    for g in ("backbone", "method", "data", "benchmark", "trainer", "logger", "experiment")
}


def test_every_group_has_configs():
    for group, names in GROUP_FILES.items():
        assert names, f"conf/{group}/ is empty"


@pytest.mark.parametrize("task", ["train", "eval"])
@pytest.mark.parametrize("experiment", GROUP_FILES["experiment"])
def test_every_experiment_composes_and_validates(compose, experiment, task):
    """zscir-eval experiment=<x> evaluates a paper experiment's (released) checkpoint: every experiment
    composes under eval.yaml too, whatever training-only groups (data) and keys (checkpoint) it sets."""
    cfg = compose(task, [f"experiment={experiment}"])
    validate_config(cfg, task)
    assert cfg.experiment_name == experiment


@pytest.mark.parametrize(
    ("group", "name"),
    [(g, n) for g in ("backbone", "method", "data", "trainer", "logger") for n in GROUP_FILES[g]],
)
def test_every_group_option_composes(compose, group, name):
    if (group, name) == ("logger", "tensorboard"):
        pytest.importorskip("tensorboard", reason="logger=tensorboard needs pip install 'zscir[tensorboard]'")
    cfg = compose("train", [f"{group}={name}"])
    validate_config(cfg, "train")
    resolved = plain(cfg[group])
    assert resolved is not None


@pytest.mark.parametrize("name", GROUP_FILES["benchmark"])
def test_every_benchmark_config_composes_for_eval(compose, name):
    cfg = compose("eval", [f"benchmark={name}", "backbone=tiny"])  # the synthetic CLIP only fits its world
    validate_config(cfg, "eval")
    (bench,) = benchmark_configs(cfg)
    assert bench["kind"]
    assert Path(bench["root"]).is_absolute()


def test_unknown_method_key_fails_with_its_name(compose):
    cfg = compose("train", ["method=sum", "+method.img_wieght=0.5"])
    with pytest.raises(Exception, match="img_wieght"):
        validate_config(cfg, "train")


def test_unknown_override_is_refused_by_hydra(compose):
    with pytest.raises(Exception, match="lr_typo"):
        compose("train", ["method.optim.lr_typo=1"])


def test_unknown_group_option_is_named(compose):
    with pytest.raises(Exception, match="lincri"):
        compose("train", ["method=lincri"])


def test_unknown_benchmark_name_lists_the_known_ones(compose):
    cfg = compose("train", ["eval_benchmarks=[synthetic_cirr,cirrr]"])
    with pytest.raises(ValueError, match=r"cirrr.*synthetic_cirr"):
        benchmark_configs(cfg)


def test_wrong_type_is_refused(compose):
    cfg = compose("train", ["method=sum", "method.img_weight=heavy"])
    with pytest.raises(Exception, match="img_weight"):
        validate_config(cfg, "train")


def test_config_groups_mirror_code_folders():
    src = Path(__file__).resolve().parents[1] / "src" / "zscir"
    assert (src / "backbones").is_dir()
    assert (src / "methods").is_dir()
    assert (src / "benchmarks").is_dir()
    assert OmegaConf.load(CONF_DIR / "train.yaml")["defaults"][0] == {"paths": "default"}


@pytest.mark.parametrize("group", ["backbone", "benchmark", "method"])
def test_every_config_selects_a_registered_class_by_kind(group):
    """One selector key for the three groups: every conf/<group>/*.yaml names a registered ``kind``."""
    from zscir.backbones import BACKBONES, backbone_builder
    from zscir.benchmarks import BENCHMARKS, benchmark_class
    from zscir.methods import METHODS, method_class

    registry, lookup = {
        "backbone": (BACKBONES, backbone_builder),
        "benchmark": (BENCHMARKS, benchmark_class),
        "method": (METHODS, method_class),
    }[group]
    files = sorted((CONF_DIR / group).glob("*.yaml"))
    assert files
    for file in files:
        yaml = OmegaConf.load(file)
        assert "kind" in yaml, f"{file} selects its class without kind"
        kind = yaml["kind"]
        assert kind in registry, file
        assert lookup(kind).__name__ == registry[kind].split(":")[1], file
        if group == "method":
            assert kind == file.stem, file  # method=<file> selects the method of that kind
            assert "name" not in yaml, f"{file}: a method has no name besides its kind"
        if group == "benchmark":
            assert benchmark_class(kind).kind == kind, file
    assert method_class("sum") is not method_class("text_only")  # distinct classes, not one stand-in


def test_every_benchmark_config_is_composed_by_name_for_both_entry_points(compose):
    files = sorted(p.stem for p in (CONF_DIR / "benchmark").glob("*.yaml"))
    for task in ("train", "eval"):
        cfg = compose(task, ["benchmarks.cirr.root=/data/CIRR", "eval_benchmarks=[cirr]"])
        assert sorted(cfg.benchmarks) == files
        (bench,) = benchmark_configs(cfg)
        assert bench["root"] == "/data/CIRR"
        assert bench["kind"] == "cirr"


def test_method_yamls_agree_with_their_dataclass_defaults():
    """A method YAML may set a key to a value other than its dataclass default only on purpose: the known
    differences are listed here, so a default changed in one place and not the other fails."""
    from zscir.methods import method_class, parse_config

    on_purpose = {  # (method, key): why the YAML differs from the dataclass
        ("cam_ti", "cam_cache_dir"): "the YAML puts the CAM cache under the run's output folder",
        **{
            (
                method,
                key,
            ): "the dataclass has no default (a required input); the YAML names the synthetic world's"
            for method in ("searle", "searle_oti")
            for key in ("vocabulary", "phrases")
        },
        ("searle", "oti_cache_dir"): "the YAML puts the OTI-target cache under the run's output folder",
    }
    for file in sorted((CONF_DIR / "method").glob("*.yaml")):
        yaml = OmegaConf.to_container(OmegaConf.load(file))
        cls = method_class(yaml["kind"])
        defaults = plain(OmegaConf.structured(cls.Config(kind=yaml["kind"])))
        # interpolations resolve only inside a composed run; a stand-in string keeps their keys checked
        parse_config(
            cls.Config, {k: "<interpolated>" if str(v).startswith("${") else v for k, v in yaml.items()}
        )
        for key, value in yaml.items():
            if (yaml["kind"], key) in on_purpose:
                continue
            assert defaults[key] == value, (
                f"{file.name}: {key}={value!r}, dataclass default {defaults[key]!r}"
            )


def test_eval_of_an_experiment_ignores_its_training_settings(compose, tmp_path):
    """zscir-eval experiment=<x> on another benchmark than the experiment's: its checkpoint.monitor (on the
    experiment's training benchmark) and data group must not stop the evaluation, and a benchmark named on
    the command line replaces the experiment's eval_benchmarks."""
    from zscir.cli.evaluate import command_line_benchmark, evaluate

    args = command_line_benchmark(["experiment=pli_clip_b32_imagenet", "benchmark=synthetic_circo"])
    overrides = ["backbone=tiny", "trainer=cpu", f"paths.run_dir={tmp_path / 'run'}", *args]
    cfg = compose("eval", overrides)
    assert {"data", "checkpoint"} <= set(cfg)  # composed, with a monitor on eval_benchmarks[0] (now none)
    metrics = evaluate(cfg)
    assert "map@10" in metrics  # CIRCO's metric: the named benchmark, not the experiment's cirr
    saved = OmegaConf.load(tmp_path / "run" / "resolved_config.yaml")
    assert "data" not in saved
    assert "checkpoint" not in saved


def test_a_command_line_benchmark_wins_over_an_experiments_eval_benchmarks():
    from zscir.cli.evaluate import command_line_benchmark

    assert command_line_benchmark(["experiment=x", "benchmark=circo"])[0] == "eval_benchmarks=[]"
    for kept in (
        ["experiment=x", "benchmark=circo", "eval_benchmarks=[cirr]"],  # the user named both
        ["experiment=x"],  # the experiment's benchmarks
        ["benchmark=circo"],  # no experiment: nothing to replace
        ["experiment=x", "benchmark.split=test"],  # a setting of the default benchmark, not a choice
    ):
        assert command_line_benchmark(kept) == kept
