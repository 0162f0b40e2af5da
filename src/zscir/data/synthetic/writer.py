"""Write the shapes world to disk in the formats the real-data loaders read.

Layout under ``root``::

    world.json                           manifest, written last (its presence means "complete")
    corpus/{train,val}/shard-00000.tar   webdataset shards: <key>.png, <key>.txt, <key>.json (scene)
    text/captions.txt                    text-only caption corpus, one caption per line
    cirr/                                CIRR in the layout SEARLE/LinCIR read (cirr/captions, cirr/image_splits, dev/, test1/)
    circo/                               CIRCO as its README describes (annotations/, COCO2017_unlabeled/)
    concepts/class-descriptions.csv      concept vocabulary in Open Images' class-description format
    concepts/concept_to_phrases.pkl      {concept: [phrase, ...]}, the format of SEARLE's phrase files

Every item is generated from a generator seeded by ``(seed, part, index)``, so the output is
byte-identical for the same seed and sizes, and independent of generation order.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import random
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from zscir.data.synthetic import world as W
from zscir.utils.io import atomic_write_bytes, atomic_write_text

FORMAT_VERSION = 1


@dataclass
class SynthConfig:
    """Sizes and seed of a synthetic world (the defaults are what ``make demo`` uses)."""

    seed: int = 0
    image_size: int = 64
    corpus_train: int = 20000
    corpus_val: int = 1000
    text_captions: int = 20000
    shard_size: int = 1000
    cirr_val_sets: int = 80
    cirr_test_sets: int = 40
    circo_val: int = 120
    circo_test: int = 60
    circo_pool: int = 1500
    held_out: list[list[str]] = field(default_factory=lambda: [list(p) for p in W.DEFAULT_HELD_OUT])


def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random("-".join(str(p) for p in (seed, *parts)))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _jpg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _scene_json(scene: W.Scene) -> dict:
    return {"background": scene.background, "objects": [asdict(o) for o in scene.objects]}


# ---- image-caption corpus ---------------------------------------------------------------------------
def corpus_samples(cfg: SynthConfig, split: str, n: int) -> Iterator[tuple[str, bytes, str, dict]]:
    held_out = {tuple(p) for p in cfg.held_out}
    for i in range(n):
        rng = _rng(cfg.seed, "corpus", split, i)
        scene = W.sample_scene(rng, held_out)
        image = W.render(scene, cfg.image_size, rng.getrandbits(32))
        yield f"{split}{i:07d}", _png(image), W.caption(scene, rng), _scene_json(scene)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_corpus(root: Path, cfg: SynthConfig, split: str, n: int) -> None:
    out = root / "corpus" / split
    out.mkdir(parents=True, exist_ok=True)
    samples = corpus_samples(cfg, split, n)
    for shard in tqdm(range((n + cfg.shard_size - 1) // cfg.shard_size), desc=f"synth corpus/{split} shards"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(min(cfg.shard_size, n - shard * cfg.shard_size)):
                key, png, text, meta = next(samples)
                _tar_add(tar, f"{key}.png", png)
                _tar_add(tar, f"{key}.txt", text.encode())
                _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        atomic_write_bytes(out / f"shard-{shard:05d}.tar", buf.getvalue())


def write_text_corpus(root: Path, cfg: SynthConfig) -> None:
    held_out = {tuple(p) for p in cfg.held_out}
    lines = []
    for i in range(cfg.text_captions):
        rng = _rng(cfg.seed, "text", i)
        lines.append(W.caption(W.sample_scene(rng, held_out), rng))
    atomic_write_text(root / "text" / "captions.txt", "\n".join(lines) + "\n")


# ---- CIRR -------------------------------------------------------------------------------------------
def _variants(base: W.Scene, rng: random.Random, n: int, prefer: set) -> list[W.Scene]:
    """``n`` distinct scenes, each one edit away from ``base`` (different edits where possible)."""
    out: list[W.Scene] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        kinds = list(W.EDIT_KINDS)
        rng.shuffle(kinds)
        for kind in kinds:
            scene = W.apply_random_edit(base, rng, kind, prefer)
            if scene is not None and scene != base and scene not in out:
                out.append(scene)
                break
        if attempts > 100:
            raise RuntimeError("could not find enough distinct edits")  # cannot happen with 5 edit kinds
    return out


def write_cirr(root: Path, cfg: SynthConfig) -> None:
    prefer = {tuple(p) for p in cfg.held_out}
    pairid = 10000
    for split, folder, n_sets in (("val", "dev", cfg.cirr_val_sets), ("test1", "test1", cfg.cirr_test_sets)):
        records, split_map, images = [], {}, []
        for s in range(n_sets):
            rng = _rng(cfg.seed, "cirr", split, s)
            set_id = 100 + 7 * s + rng.randrange(7)
            base = W.sample_scene(rng)
            scenes = [base, *_variants(base, rng, 5, prefer)]
            slots = list(range(6))
            rng.shuffle(slots)  # where each scene sits among the NLVR2-style names
            names = [f"{folder}-{set_id}-{slots[j] // 2}-img{slots[j] % 2}" for j in range(6)]
            for name, scene in zip(names, scenes):
                images.append((name, scene, rng.getrandbits(32)))
            members = sorted(names, key=lambda n: rng.random())
            pairs = [(0, j) for j in range(1, 6)] + [(j, 0) for j in rng.sample(range(1, 6), 2)]
            for ref, tgt in pairs:
                pairid += 1 + rng.randrange(3)
                text, _ = W.describe_edit(scenes[ref], scenes[tgt], rng)
                record = {"pairid": pairid, "reference": names[ref], "caption": text}
                if split == "val":
                    record["target_hard"] = names[tgt]
                    record["target_soft"] = {names[tgt]: 1.0}
                record["img_set"] = {"id": set_id, "members": members, "reference_rank": rng.randrange(6)}
                if split == "val":
                    record["img_set"]["target_rank"] = rng.randrange(6)
                records.append(record)
        order = list(range(len(images)))
        _rng(cfg.seed, "cirr-order", split).shuffle(order)
        for i in tqdm(order, desc=f"synth cirr/{split} images"):
            name, scene, nuisance = images[i]
            split_map[name] = f"./{folder}/{name}.png"
            atomic_write_bytes(
                root / "cirr" / folder / f"{name}.png", _png(W.render(scene, cfg.image_size, nuisance))
            )
        atomic_write_text(
            root / "cirr" / "cirr" / "captions" / f"cap.rc2.{split}.json", json.dumps(records, indent=1)
        )
        atomic_write_text(
            root / "cirr" / "cirr" / "image_splits" / f"split.rc2.{split}.json",
            json.dumps(split_map, indent=1),
        )


# ---- CIRCO ------------------------------------------------------------------------------------------
CIRCO_ASPECTS = {
    "recolour": ["compare_change"],
    "reshape": ["compare_change", "direct_addressing"],
    "resize": ["comparative_statement"],
    "add": ["addition"],
    "remove": ["negation"],
    "background": ["spatial_relations_background"],
}


def write_circo(root: Path, cfg: SynthConfig) -> None:
    prefer = {tuple(p) for p in cfg.held_out}
    id_rng = _rng(cfg.seed, "circo-ids")
    used: set[int] = set()

    def new_id() -> int:
        while (i := id_rng.randrange(1, 600000)) in used:
            pass
        used.add(i)
        return i

    index: list[tuple[int, W.Scene, int]] = []
    annotations: dict[str, list[dict]] = {"val": [], "test": []}
    for split, n in (("val", cfg.circo_val), ("test", cfg.circo_test)):
        for q in range(n):
            rng = _rng(cfg.seed, "circo", split, q)
            ref = W.sample_scene(rng)
            kind = rng.choice(
                [k for k in W.EDIT_KINDS if W.apply_random_edit(ref, random.Random(0), k) is not None]
            )
            target = W.apply_random_edit(ref, rng, kind, prefer)
            text, kind = W.describe_edit(ref, target, rng)
            ref_id = new_id()
            index.append((ref_id, ref, rng.getrandbits(32)))
            gts = []
            for _ in range(
                rng.randint(1, 4)
            ):  # several valid targets: same content, other rendering/background
                gt_scene = target
                if kind != "background" and rng.random() < 0.5:
                    gt_scene = W.Scene(target.objects, rng.choice(list(W.BACKGROUNDS)))
                gts.append(new_id())
                index.append((gts[-1], gt_scene, rng.getrandbits(32)))
            for neg in _variants(ref, rng, 3, prefer):  # hard negatives: other edits of the same reference
                if neg != target:
                    index.append((new_id(), neg, rng.getrandbits(32)))
            kept = [o for o in ref.objects if o in target.objects]
            concept = W.object_phrase(kept[0] if kept else ref.objects[0], rng, p_size=0, p_slot=0)
            record = {
                "reference_img_id": ref_id,
                "relative_caption": text,
                "shared_concept": concept,
                "id": q,
            }
            if split == "val":
                record = {
                    "reference_img_id": ref_id,
                    "target_img_id": gts[0],
                    "relative_caption": text,
                    "shared_concept": concept,
                    "gt_img_ids": gts,
                    "id": q,
                    "semantic_aspects": CIRCO_ASPECTS[kind],
                }
            annotations[split].append(record)
    for p in range(cfg.circo_pool):
        rng = _rng(cfg.seed, "circo-pool", p)
        index.append((new_id(), W.sample_scene(rng), rng.getrandbits(32)))
    _rng(cfg.seed, "circo-order").shuffle(index)
    base = root / "circo"
    infos = []
    for image_id, scene, nuisance in tqdm(index, desc="synth circo images"):
        file_name = f"{image_id:012d}.jpg"
        atomic_write_bytes(
            base / "COCO2017_unlabeled" / "unlabeled2017" / file_name,
            _jpg(W.render(scene, cfg.image_size, nuisance)),
        )
        infos.append(
            {
                "license": 1,
                "file_name": file_name,
                "coco_url": "",
                "height": cfg.image_size,
                "width": cfg.image_size,
                "date_captured": "",
                "id": image_id,
            }
        )
    info = {
        "info": {"description": "zscir synthetic shapes world (CIRCO layout)"},
        "images": infos,
        "licenses": [],
        "categories": [],
    }
    atomic_write_text(
        base / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json", json.dumps(info)
    )
    for split, records in annotations.items():
        atomic_write_text(base / "annotations" / f"{split}.json", json.dumps(records, indent=1))


# ---- concepts ---------------------------------------------------------------------------------------
#: the concept files of a world, relative to its root
CONCEPT_FILES = ("concepts/class-descriptions.csv", "concepts/concept_to_phrases.pkl")


def write_concepts(root: Path, cfg: SynthConfig) -> None:
    """The world's concept vocabulary (``LabelName,DisplayName`` rows) and phrases per concept: what
    SEARLE's concept association and phrase regularisation read (:func:`world.concept_vocabulary`)."""
    names = W.concept_vocabulary()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["LabelName", "DisplayName"])
    writer.writerows([f"/synthetic/{name.replace(' ', '_')}", name] for name in names)
    phrases = {name: W.concept_phrases(name, _rng(cfg.seed, "phrases", name)) for name in names}
    csv_file, pkl_file = (root / f for f in CONCEPT_FILES)
    atomic_write_bytes(pkl_file, pickle.dumps(phrases, protocol=4))
    atomic_write_text(csv_file, buf.getvalue())


def ensure_concepts(root: str | Path, cfg: SynthConfig) -> None:
    """Write the concept files of a world generated before they existed (they take a moment, no images)."""
    root = Path(root)
    if not all((root / f).is_file() for f in CONCEPT_FILES):
        write_concepts(root, cfg)


# ---- everything -------------------------------------------------------------------------------------
def world_manifest(cfg: SynthConfig) -> dict:
    """The ``world.json`` of the world ``cfg`` generates: the file format version and every setting."""
    return {"format_version": FORMAT_VERSION, **asdict(cfg)}


def generate_world(root: str | Path, cfg: SynthConfig | None = None, force: bool = False) -> Path:
    """Generate (or reuse) the synthetic world under ``root``; returns ``root``.

    An existing world is reused when its manifest matches ``cfg``; a partial or different one is
    regenerated.
    """
    cfg = cfg or SynthConfig()
    root = Path(root)
    manifest = world_manifest(cfg)
    marker = root / "world.json"
    if not force and marker.is_file() and json.loads(marker.read_text()) == manifest:
        ensure_concepts(root, cfg)
        return root
    marker.unlink(missing_ok=True)
    for part in (
        "corpus",
        "text",
        "cirr",
        "circo",
        "concepts",
    ):  # no stale shards or images from another configuration
        shutil.rmtree(root / part, ignore_errors=True)
    write_corpus(root, cfg, "train", cfg.corpus_train)
    write_corpus(root, cfg, "val", cfg.corpus_val)
    write_text_corpus(root, cfg)
    write_cirr(root, cfg)
    write_circo(root, cfg)
    write_concepts(root, cfg)
    atomic_write_text(marker, json.dumps(manifest, indent=1))
    return root
