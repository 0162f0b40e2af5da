"""Pic2Word: the mapping and what trains, the released checkpoint format, the optimiser and schedule of the
official code, the random-crop training transform, FashionIQ's Pic2Word query text, DDP with gathered
negatives (2 ranks on gloo == 1 process), a train → checkpoint → evaluate round trip and a resumed run.
(The loss and the pseudo-word splice against the official code: tests/parity/test_pic2word_official.py.)"""

import csv
import math
import os
import signal
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torchvision import transforms as T

from benchmark_fixtures import FIQ_VAL, make_fashioniq
from reliability_helpers import PAUSING_TRAIN, base_overrides, kill_group, start, tail, wait_for
from zscir.benchmarks import build_benchmark
from zscir.cli.callbacks import PREEMPTED_EXIT_CODE
from zscir.cli.config import compose_config
from zscir.cli.evaluate import evaluate
from zscir.cli.train import train
from zscir.data.loaders import DataConfig, build_train_loader, random_crop_transform
from zscir.methods import build_method
from zscir.methods.pic2word import PROMPTS, load_img2text_checkpoint

warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step called without a Trainer

TINY = {"name": "tiny", "kind": "open_clip", "model": "tiny"}


def pic2word(**config) -> torch.nn.Module:
    return build_method(TINY, {"kind": "pic2word", **config})


@pytest.fixture(scope="module")
def method():
    return pic2word()


def pixels(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# ---- the mapping, what trains ---------------------------------------------------------------------------
def test_mapping_is_the_official_im2text_shape(method):
    """2 × [Linear(d→512), Dropout(0.1), ReLU] then Linear(512→token width); on ViT-L/14 768→512→512→768."""
    shapes = {n: tuple(p.shape) for n, p in method.img2text.named_parameters()}
    d, e = method.encoder.embed_dim, method.encoder.token_dim
    assert shapes == {
        "layers.0.0.weight": (512, d),
        "layers.0.0.bias": (512,),
        "layers.1.0.weight": (512, 512),
        "layers.1.0.bias": (512,),
        "fc_out.weight": (e, 512),
        "fc_out.bias": (e,),
    }
    kinds = [type(m).__name__ for m in method.img2text.layers[0]]
    assert kinds == ["Linear", "Dropout", "ReLU"]
    assert method.img2text.layers[0][1].p == 0.1


def test_only_the_mapping_trains_and_clip_stays_in_eval_mode():
    m = pic2word()
    m.train()
    towers = [mod for t in ("image", "text") for top in m.encoder.tower_modules(t) for mod in top.modules()]
    assert not any(mod.training for mod in towers)
    assert m.img2text.training
    m.loss(pixels()).backward()
    trained = {n for n, p in m.named_parameters() if p.grad is not None}
    assert trained == {f"img2text.{n}" for n, _ in m.img2text.named_parameters()}
    assert all(not p.requires_grad for p in m.encoder.parameters())


def test_logit_scale_is_the_backbones_own_unless_set(method):
    expected = float(method.encoder.model.logit_scale.exp())
    assert method.logit_scale == pytest.approx(expected)
    assert pic2word(logit_scale=100.0).logit_scale == 100.0


def test_prompts_and_unknown_prompt():
    assert pic2word().template == "a photo of $ , {caption}"
    assert pic2word(prompt="shared").template == "a photo of $ that {caption}" == PROMPTS["shared"]
    with pytest.raises(ValueError, match="prompt must be one of"):
        pic2word(prompt="searle")


def test_compose_puts_the_mapped_token_into_the_pic2word_prompt(method):
    method.eval()
    batch = {"pixels": pixels(2), "texts": ["is red", "is blue"]}
    ids = method.encoder.tokenize(["a photo of $ , is red", "a photo of $ , is blue"])
    expected = method.encoder.encode_text_with_pseudo(ids, method.pseudo_tokens(batch["pixels"]))
    torch.testing.assert_close(method.compose(batch), expected)
    shared = pic2word(prompt="shared")
    shared.load_state_dict(method.state_dict())
    shared.eval()
    assert not torch.allclose(shared.compose(batch), expected)


# ---- the released checkpoint format ---------------------------------------------------------------------
def released_file(path, mapping: torch.nn.Module) -> None:
    """What the official trainer saves (src/main.py:225-233), from a DDP run: ``module.`` prefixes."""
    torch.save(
        {
            "epoch": 30,
            "kind": "pic2word",
            "state_dict": {"module.logit_scale": torch.tensor(4.6052)},
            "state_dict_img2text": {f"module.{k}": v.clone() for k, v in mapping.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": []},
        },
        path,
    )


def test_released_checkpoint_loads_by_path(tmp_path, method):
    source = pic2word()
    torch.nn.init.normal_(source.img2text.fc_out.weight)  # weights unlike any fresh init
    released_file(tmp_path / "pic2word_model.pt", source.img2text)
    loaded = pic2word(checkpoint=str(tmp_path / "pic2word_model.pt"))
    for (name, a), b in zip(loaded.img2text.state_dict().items(), source.img2text.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(loaded.img2text.fc_out.weight, method.img2text.fc_out.weight)


def test_bad_checkpoints_are_refused_clearly(tmp_path, method):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_img2text_checkpoint(method.img2text, tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "clip_only.pt")
    with pytest.raises(KeyError, match="state_dict_img2text"):
        load_img2text_checkpoint(method.img2text, tmp_path / "clip_only.pt")
    released_file(tmp_path / "wide.pt", pic2word(middle_dim=64).img2text)
    with pytest.raises(ValueError, match="middle_dim"):
        load_img2text_checkpoint(method.img2text, tmp_path / "wide.pt")


# ---- optimiser and schedule -----------------------------------------------------------------------------
def official_cosine_lr(base_lr: float, warmup_length: int, steps: int, step: int) -> float:
    """third_party/open_clip/scheduler.py:7-20 (``cosine_lr``), the official per-iteration schedule."""
    if step < warmup_length:
        return base_lr * (step + 1) / warmup_length
    e, es = step - warmup_length, steps - warmup_length
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr


def test_optimiser_is_the_official_adamw_without_decay_on_biases():
    m = pic2word(optim={"warmup_steps": 10})
    m._trainer = SimpleNamespace(estimated_stepping_batches=40)
    config = m.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    # src/main.py:127-145: names with bn/ln/bias/logit_scale get no weight decay, the rest wd; README: 0.1
    names = {id(p): n for n, p in m.img2text.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    assert groups == {
        0.0: ["fc_out.bias", "layers.0.0.bias", "layers.1.0.bias"],
        0.1: ["fc_out.weight", "layers.0.0.weight", "layers.1.0.weight"],
    }
    g = optimizer.param_groups[0]
    assert (g["betas"], g["eps"]) == ((0.9, 0.98), 1e-6)  # src/params.py:28 for ViT models
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([official_cosine_lr(1e-4, 10, 40, s) for s in range(40)], rel=1e-9)


# ---- the training transform -----------------------------------------------------------------------------
def test_random_crop_transform_is_the_official_training_transform(method):
    """Pic2Word's model/clip.py:107-115 (and open_clip's is_train=True): RandomResizedCrop(n_px, scale
    (0.9, 1.0), bicubic), RGB, ToTensor, the evaluation Normalize."""
    train_t = random_crop_transform(method.encoder.image_transform, [0.9, 1.0])
    crop = next(t for t in train_t.transforms if isinstance(t, T.RandomResizedCrop))
    assert (crop.size, crop.scale, crop.interpolation) == ((64, 64), (0.9, 1.0), T.InterpolationMode.BICUBIC)
    norm = next(t for t in train_t.transforms if isinstance(t, T.Normalize))
    assert tuple(norm.mean) == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    image = Image.new("P", (90, 70))  # a palette image: converted to RGB first
    out = [train_t(image) for _ in range(2)]
    assert out[0].shape == (3, 64, 64)
    noise = Image.effect_noise((90, 70), 64).convert("RGB")
    torch.manual_seed(0)
    a = train_t(noise)
    assert not torch.equal(a, train_t(noise))  # a random crop each time
    torch.manual_seed(0)
    assert torch.equal(a, train_t(noise))  # drawn from torch's RNG: seeded runs repeat
    with pytest.raises(ValueError, match="random_crop_scale"):
        random_crop_transform(method.encoder.image_transform, [0.0, 1.0])
    with pytest.raises(ValueError, match="Normalize"):
        random_crop_transform(T.Compose([T.ToTensor()]), [0.9, 1.0])


def test_train_loader_uses_the_random_crop_only_when_asked(small_world, method):
    corpus = str(small_world / "synthetic" / "corpus" / "train")
    plain = DataConfig(kind="image_caption", path=corpus, batch_size=4, num_workers=0, max_samples=8)
    loader = build_train_loader(plain, method.encoder.image_transform)
    assert loader.dataset.transform is method.encoder.image_transform
    cropped = build_train_loader(
        DataConfig(**{**plain.__dict__, "random_crop_scale": [0.9, 1.0]}), method.encoder.image_transform
    )
    assert any(isinstance(t, T.RandomResizedCrop) for t in cropped.dataset.transform.transforms)
    assert next(iter(cropped))["pixels"].shape == (4, 3, 64, 64)


# ---- FashionIQ under Pic2Word's query text -------------------------------------------------------------
def test_fashioniq_pic2word_protocol_is_one_caption_order_unstripped(tmp_path):
    root = make_fashioniq(tmp_path / "fiq")
    official = build_benchmark("fashioniq", str(root), "val", category="dress")
    ours = build_benchmark("fashioniq", str(root), "val", category="dress", protocol="pic2word")
    caps = [t["captions"] for t in FIQ_VAL["dress"]]
    # official src/data.py:227-228: cap1, cap2 = captions; 'a photo of * , {} and {}'.format(cap2, cap1)
    assert [q.texts for q in ours.queries] == [(f"{c[1]} and {c[0]}",) for c in caps]
    assert ours.queries[1].texts == ("has sleeves? and  is white, ",)  # nothing stripped
    assert [q.texts for q in official.queries] != [q.texts for q in ours.queries]
    assert [g.image_id for g in ours.gallery] == [g.image_id for g in official.gallery]
    assert [q.target_ids for q in ours.queries] == [q.target_ids for q in official.queries]
    assert ours.metric_names == ("pic2word/recall@10", "pic2word/recall@50")


# ---- DDP: gathered negatives ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_with_gathered_negatives_give_the_single_process_gradients(tmp_path):
    """2 gloo ranks × 3 and 5 rows == 1 process × 8 rows: the loss and the mapping's gradients. The
    official aggregation (gathered copies without gradients, src/trainer.py:111-145) computes the same loss
    but, after DDP's gradient averaging, half the gradient."""
    from helpers.dist_workers import pic2word_loss_and_grads, pic2word_worker

    out = tmp_path / "ranks.pt"
    mp.spawn(pic2word_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    results = torch.load(out, weights_only=True)
    loss, grads = pic2word_loss_and_grads(slice(0, 8), gather=True)
    for name in ("gathered", "official"):
        torch.testing.assert_close(results[name]["loss"], loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(results["gathered"]["grads"], grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(results["official"]["grads"], grads):
        torch.testing.assert_close(a, b / 2, rtol=1e-5, atol=1e-7)
    # control: each rank on its own rows only is another objective
    assert not torch.allclose(results["local"]["loss"], loss, atol=1e-4)


# ---- train → checkpoint → evaluate, and resume -----------------------------------------------------------
RUN = [
    "method=pic2word",
    "backbone=tiny",
    "data=synthetic",
    "data.batch_size=16",
    "data.max_samples=64",
    "data.random_crop_scale=[0.9,1.0]",
    "trainer=cpu",
    "trainer.precision=32-true",
    "trainer.deterministic=true",
    "trainer.log_every_n_steps=1",
    "method.optim.lr=1e-3",
    "method.optim.warmup_steps=2",
    "eval_benchmarks=[synthetic_cirr]",
]


def losses(run) -> list[float]:
    rows = []
    for file in sorted((run / "csv").glob("version_*/metrics.csv")):
        with open(file, newline="") as f:
            rows += [
                (int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")
            ]
    return [loss for _, loss in sorted(rows)]


@pytest.mark.slow
def test_train_checkpoint_evaluate_round_trip(compose, tmp_path):
    metrics = train(compose("train", [*RUN, "trainer.max_epochs=2"]))
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert sorted(state) == sorted(f"img2text.{n}" for n, _ in pic2word().img2text.named_parameters())
    fresh = pic2word().img2text.state_dict()
    assert not torch.equal(state["img2text.fc_out.weight"], fresh["fc_out.weight"])  # it trained
    assert len(losses(run)) == 8  # 2 epochs × 4 batches
    eval_args = ["backbone=tiny", "method=pic2word", "eval_benchmarks=[synthetic_cirr]"]
    again = evaluate(compose("eval", [*eval_args, f"ckpt_path={ckpt}", f"paths.run_dir={tmp_path / 'e'}"]))
    assert {f"synthetic_cirr/{k}": v for k, v in again.items()} == pytest.approx(metrics, abs=1e-6)
    untrained = evaluate(compose("eval", [*eval_args, f"paths.run_dir={tmp_path / 'e0'}"]))
    assert untrained != again


@pytest.mark.slow
def test_preempted_run_resumes_to_the_uninterrupted_result(small_world, tmp_path):
    """SIGTERM in the middle of epoch 0 (before step 2: the batch in flight finishes, last.ckpt is written
    at step 3, exit status 143), then resume=last: the losses, weights and metrics of a run never
    stopped; the mapping's dropout and the random crops continue from the saved state."""
    overrides = [*base_overrides(small_world, tmp_path / "outputs"), *RUN, "trainer.max_epochs=2"]
    reference = tmp_path / "reference"
    expected_metrics = train(compose_config("train", [*overrides, f"paths.run_dir={reference}"]))
    run, log, marker = tmp_path / "run", tmp_path / "1.log", tmp_path / "paused"
    proc = start(
        [str(PAUSING_TRAIN), *overrides, f"hydra.run.dir={run}"],
        log,
        ZSCIR_PAUSE_AT_STEP="2",
        ZSCIR_PAUSE_MARKER=str(marker),
    )
    try:
        assert wait_for(marker, proc, log).split() == ["2", "0", "2"]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=180) == PREEMPTED_EXIT_CODE, tail(log)
    finally:
        kill_group(proc)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    metrics = train(compose_config("train", [*overrides, f"paths.run_dir={run}", "resume=last"]))
    assert metrics == expected_metrics
    assert losses(run) == pytest.approx(losses(reference), rel=1e-6, abs=0)
    assert len(losses(run)) == 8
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6)
