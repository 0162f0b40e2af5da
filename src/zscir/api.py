"""The Python API: zscir from a script or a notebook, without Hydra.

    import zscir
    method = zscir.load_method("sum", backbone="tiny")          # or zscir.load_run("outputs/train/lincir/<stamp>")
    queries = zscir.compose_queries(method, [Image.open("ref.jpg")], ["is red and has no sleeves"])
    gallery = zscir.encode_gallery(method, sorted(Path("shop").glob("*.jpg")), cache_dir="outputs/cache/gallery")
    indices, scores = zscir.retrieve(queries, gallery, k=10)
    metrics = zscir.evaluate(method, zscir.load_benchmark("circo", "/data/CIRCO", "val"))

Backbones and methods are named as in the configs (``zscir/conf/backbone/<name>.yaml``, the method
registry) or given as dicts; method options are the method's ``Config`` fields. Features are L2-normalised
float32 on the method's device. The command-line tools (``zscir.cli``) build on these same pieces.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from zscir.backbones import backbone_fingerprint
from zscir.backbones.base import PLACEHOLDER
from zscir.benchmarks import Benchmark, ImageRef, build_benchmark
from zscir.benchmarks.base import gallery_files_digest
from zscir.methods import RetrievalMethod, build_method
from zscir.retrieval.cache import GalleryCache, cache_key
from zscir.retrieval.search import normalize, topk_search
from zscir.utils.images import load_rgb, to_rgb
from zscir.utils.io import file_stamp
from zscir.utils.run_config import RUN_CONFIG, load_run_config

log = logging.getLogger("zscir")

#: the configs shipped inside the package
PACKAGE_CONF = Path(__file__).resolve().parent / "conf"

#: an image given to the API: a PIL image or a file
ImageInput = Image.Image | str | Path


def data_dir() -> Path:
    """``paths.data_dir`` of the configs (where named backbones find their weights): ``$ZSCIR_DATA_DIR``,
    else ``$ZSCIR_ROOT/data``, else ``./data``."""
    if os.environ.get("ZSCIR_DATA_DIR"):
        return Path(os.environ["ZSCIR_DATA_DIR"]).expanduser()
    return Path(os.environ.get("ZSCIR_ROOT") or os.getcwd()) / "data"


def output_dir() -> Path:
    """``paths.output_dir`` of the configs: ``$ZSCIR_OUTPUT_DIR``, else ``$ZSCIR_ROOT/outputs``, else
    ``./outputs``."""
    if os.environ.get("ZSCIR_OUTPUT_DIR"):
        return Path(os.environ["ZSCIR_OUTPUT_DIR"]).expanduser()
    return Path(os.environ.get("ZSCIR_ROOT") or os.getcwd()) / "outputs"


def backbone_config(backbone: str | dict) -> dict:
    """A backbone config: ``backbone`` itself when it is a dict, else the shipped
    ``zscir/conf/backbone/<backbone>.yaml`` with ``${paths.data_dir}`` set to :func:`data_dir`.

    Raises:
        ValueError: no backbone config of that name (the message lists them).
    """
    if not isinstance(backbone, str):
        return dict(backbone)
    path = PACKAGE_CONF / "backbone" / f"{backbone}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (PACKAGE_CONF / "backbone").glob("*.yaml"))
        raise ValueError(f"no backbone config {backbone!r}; known: {', '.join(known)} (or pass a dict)")
    node = OmegaConf.create({"paths": {"data_dir": str(data_dir())}, "backbone": OmegaConf.load(path)})
    return OmegaConf.to_container(node.backbone, resolve=True)


def check_template(method: RetrievalMethod) -> None:
    """Refuse a prompt template that lost its slots before any image is encoded: a method whose
    default ``template`` holds the pseudo-word ``$`` (LinCIR, CAM-TI) needs ``$`` and ``{caption}`` in
    the one it is given.

    Raises:
        ValueError: naming the template and what it lacks.
    """
    default = getattr(type(method).Config(), "template", None)
    template = getattr(method.cfg, "template", None)
    if not isinstance(default, str) or PLACEHOLDER not in default or template is None:
        return
    missing = [slot for slot in (PLACEHOLDER, "{caption}") if slot not in template]
    if missing:
        raise ValueError(
            f"{method.cfg.kind}: template {template!r} has no {' and no '.join(repr(m) for m in missing)} "
            f"slot; '$' is where the reference image's pseudo-word goes and '{{caption}}' the modification "
            f"text, e.g. {default!r}"
        )


def load_method(
    method: str | dict,
    backbone: str | dict,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    **options: object,
) -> RetrievalMethod:
    """A method ready to retrieve (eval mode, on ``device``).

    Args:
        method: a method kind (``sum``, ``lincir``, ...) or a method config dict with ``kind``.
        backbone: a backbone config name (``tiny``, ``clip_vit_l14``, ...) or a backbone config dict.
        checkpoint: a zscir checkpoint of this method and backbone (``<run>/checkpoints/last.ckpt``).
        device: default: CUDA when available, else CPU.
        options: method options on top of the config (e.g. ``img_weight=0.75``, ``template=...``).

    Raises:
        KeyError: an unknown method. ValueError: an unknown option, a template without its slots, a
        checkpoint of another method or backbone, a config dict that selects with ``name`` (renamed to
        ``kind``). BackboneLoadError: weights that cannot be loaded.
    """
    config = {"kind": method} if isinstance(method, str) else dict(method)
    config.update(options)
    model = build_method(backbone_config(backbone), config)
    check_template(model)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def find_runs(directory: Path) -> list[Path]:
    """Run directories (holding ``resolved_config.yaml``) under ``directory``."""
    return sorted(p.parent for p in Path(directory).rglob(RUN_CONFIG))


def run_config(run_dir: str | Path) -> tuple[DictConfig, Path | None]:
    """A training run's saved config and the checkpoint to evaluate: the one its final metrics were
    computed with (``run_info.json``: the best by ``checkpoint.monitor``, else the last), else — for a
    run still going or interrupted — its ``last.ckpt``; None for a method that trains nothing. A config
    written by an earlier zscir is read with today's keys (:func:`~zscir.utils.run_config.load_run_config`).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or is not a run directory (a sweep directory is
            named as such, with its runs).
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={run_dir} does not exist")
    if not (run_dir / RUN_CONFIG).is_file():
        inside = find_runs(run_dir)
        hint = (
            f"; it holds {len(inside)} run(s) (a sweep directory?), e.g. {inside[0]}. Evaluate them all with "
            f"`zscir-eval -m run_dir={','.join(str(r) for r in inside[:2])}{',...' if len(inside) > 2 else ''} benchmark=...`"
            if inside
            else "; pass the directory of a zscir-train run (outputs/train/<method>/<run>)"
        )
        raise FileNotFoundError(f"{run_dir} is not a zscir run directory (no resolved_config.yaml){hint}")
    saved = load_run_config(run_dir)
    ckpts = run_dir / "checkpoints"
    info_file = run_dir / "run_info.json"
    recorded = json.loads(info_file.read_text()).get("checkpoint") if info_file.is_file() else None
    candidates = [run_dir / recorded] if recorded else []
    candidates += [ckpts / "last.ckpt"]
    ckpt = next((c for c in candidates if c.is_file()), None)
    if recorded and ckpt != run_dir / recorded:
        log.warning("%s: checkpoint %s is gone; using %s", run_dir, recorded, ckpt)
    return saved, ckpt


def load_checkpoint(method: RetrievalMethod, path: str | Path) -> None:
    """Load a zscir checkpoint into ``method`` after checking it was trained with this method and backbone.

    Raises:
        FileNotFoundError: no such file. ValueError: not a Lightning checkpoint, or one of another
        method or backbone.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    method.on_load_checkpoint(checkpoint)
    method.load_state_dict(checkpoint["state_dict"])
    method.weights_tag = f"{path.resolve()}:{file_stamp(path)}"  # part of the gallery cache key


def load_run(
    run_dir: str | Path, device: str | torch.device | None = None, **options: object
) -> RetrievalMethod:
    """The method a ``zscir-train`` run trained, with its backbone and checkpoint (:func:`run_config`);
    ``options`` override the run's method options (e.g. ``template=...``).

    Raises:
        FileNotFoundError: not a run directory, or a run of a method that trains but has no checkpoint.
    """
    saved, ckpt = run_config(run_dir)
    config, backbone = (OmegaConf.to_container(saved[k], resolve=True) for k in ("method", "backbone"))
    model = load_method(config, backbone, ckpt, device, **options)
    if ckpt is None and model.trains:
        raise FileNotFoundError(
            f"run {run_dir} trained {config['kind']} but has no checkpoint (checkpoints/)"
        )
    return model


# ---- queries and galleries -------------------------------------------------------------------------
def _image(item: ImageInput) -> Image.Image:
    return to_rgb(item) if isinstance(item, Image.Image) else load_rgb(Path(item).expanduser())


@torch.no_grad()
def compose_queries(
    method: RetrievalMethod,
    images: Sequence[ImageInput | None],
    texts: Sequence[str],
    batch_size: int = 64,
) -> Tensor:
    """Query features [Q, D] (L2-normalised) of (reference image, modification text) pairs, composed by
    the method; a ``None`` image makes a text-only query (a blank reference, as benchmarks without one).

    Raises:
        ValueError: ``images`` and ``texts`` differ in length. ImageLoadError: an unreadable image file.
    """
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} reference images but {len(texts)} texts: give one text per image")
    encoder, out = method.encoder, []
    method.eval()
    for start in range(0, len(texts), batch_size):
        chunk = range(start, min(start + batch_size, len(texts)))
        pixels = torch.stack(
            [
                encoder.image_transform(_image(images[i]))
                if images[i] is not None
                else torch.zeros(3, encoder.image_size, encoder.image_size)
                for i in chunk
            ]
        )
        batch = {
            "pixels": pixels.to(method.device),
            "texts": [texts[i] for i in chunk],
            "query_ids": list(chunk),
        }
        out.append(normalize(method.compose(batch)))
    if not out:
        return torch.empty(0, encoder.embed_dim, device=method.device)
    return torch.cat(out)


class _Images(Dataset):
    def __init__(self, images: Sequence[ImageInput], transform: object):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform(_image(self.images[i]))


def gallery_cache_key(method: RetrievalMethod, files: Sequence[str | Path]) -> str:
    """The gallery cache key of image ``files`` encoded by ``method``: its backbone weights, checkpoint,
    gallery encoder, image transform and numeric precision (the caller's autocast), and each file's path and :func:`~zscir.utils.io.file_stamp`
    (an image added, removed, replaced or touched changes it)."""
    refs = [ImageRef(str(f), Path(f).expanduser().resolve()) for f in files]
    return cache_key(
        backbone=backbone_fingerprint(method.backbone_cfg),
        weights=method.weights_tag,
        encoder=type(method).encode_gallery.__qualname__,
        gallery=[str(r.path) for r in refs],
        files=gallery_files_digest(refs),
        transform=method.encoder.transform_id,
        precision=method.feature_precision(under_trainer=False),  # encode_gallery runs outside any Trainer
    )


@torch.no_grad()
def encode_gallery(
    method: RetrievalMethod,
    images: Sequence[ImageInput],
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Tensor:
    """Gallery features [N, D] (L2-normalised) of ``images``, in order.

    With ``cache_dir`` and image files (not PIL images), the features are stored there and reused while
    every file is unchanged (:func:`gallery_cache_key`).

    Raises:
        ImageLoadError: an image file is missing or cannot be decoded (the message names it).
    """
    files = all(isinstance(i, str | Path) for i in images)
    cache = GalleryCache(cache_dir) if cache_dir is not None and files and images else None
    if cache is not None:
        ids = [str(Path(i).expanduser().resolve()) for i in images]
        key = gallery_cache_key(method, images)
        feats = cache.load(key, ids)
        if feats is not None:
            log.info("gallery features of %d images loaded from %s", len(images), cache.path(key))
            return normalize(feats.to(method.device))
    method.eval()
    loader = DataLoader(
        _Images(images, method.encoder.image_transform), batch_size=batch_size, num_workers=num_workers
    )
    feats = [
        method.encode_gallery(pixels.to(method.device)).float()
        for pixels in tqdm(loader, desc=f"gallery ({len(images)} images)", disable=not progress, leave=False)
    ]
    out = torch.cat(feats) if feats else torch.empty(0, method.encoder.embed_dim, device=method.device)
    if cache is not None:
        cache.save(key, ids, out)
    return normalize(out)


def retrieve(queries: Tensor, gallery: Tensor, k: int = 10) -> tuple[Tensor, Tensor]:
    """The top-``k`` gallery indices [Q, k] and cosine scores [Q, k] per query, best first (ties: the
    lower gallery index first; :func:`zscir.retrieval.search.topk_search`)."""
    return topk_search(queries, gallery, k)


def load_benchmark(kind: str, root: str | Path, split: str = "val", **options: object) -> Benchmark:
    """A benchmark in its layout (``cirr``, ``circo``, ``fashioniq``, ``genecis``, ``custom``, ...);
    ``options`` are the benchmark class's own (e.g. FashionIQ ``category``, custom ``annotations``)."""
    return build_benchmark(kind, str(root), split, **options)


def evaluate(
    method: RetrievalMethod,
    benchmarks: Benchmark | Sequence[Benchmark],
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """Score ``method`` on labelled benchmarks with the same loop as ``zscir-eval`` (one device):
    ``{metric: percent}`` for one benchmark, ``{"<benchmark>/<metric>": percent}`` for several.
    ``cache_dir``: reuse gallery features of unchanged galleries."""
    benchmarks = [benchmarks] if isinstance(benchmarks, Benchmark) else list(benchmarks)
    cache = GalleryCache(cache_dir) if cache_dir is not None else None
    method.attach_benchmarks(benchmarks, batch_size=batch_size, num_workers=num_workers, cache=cache)
    on_gpu = method.device.type == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=[method.device.index or 0] if on_gpu else 1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.test(method, verbose=False)
    if len(benchmarks) == 1:
        return dict(method.eval_results[benchmarks[0].name]["metrics"])
    return {f"{b.name}/{k}": v for b in benchmarks for k, v in method.eval_results[b.name]["metrics"].items()}
