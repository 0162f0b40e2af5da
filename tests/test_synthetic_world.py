import hashlib
import json
import random

from zscir.benchmarks import build_benchmark
from zscir.data.corpora import load_image_caption_corpus, load_text_corpus
from zscir.data.synthetic import SynthConfig, generate_world
from zscir.data.synthetic import world as W

TINY = dict(
    corpus_train=40,
    corpus_val=10,
    text_captions=30,
    shard_size=16,
    cirr_val_sets=2,
    cirr_test_sets=1,
    circo_val=3,
    circo_test=2,
    circo_pool=5,
)


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = generate_world(tmp_path / "a", SynthConfig(seed=7, **TINY))
    b = generate_world(tmp_path / "b", SynthConfig(seed=7, **TINY))
    c = generate_world(tmp_path / "c", SynthConfig(seed=8, **TINY))
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)


def test_world_is_reused_when_complete_and_regenerated_when_settings_change(tmp_path):
    root = generate_world(tmp_path / "w", SynthConfig(**TINY))
    marker = root / "world.json"
    stamp = marker.stat().st_mtime_ns
    generate_world(root, SynthConfig(**TINY))
    assert marker.stat().st_mtime_ns == stamp
    generate_world(root, SynthConfig(**{**TINY, "corpus_train": 20}))
    assert json.loads(marker.read_text())["corpus_train"] == 20
    assert len(load_image_caption_corpus(root / "corpus" / "train")) == 20  # no stale shards


def test_official_layouts_are_read_by_the_real_loaders(small_world):
    root = small_world / "synthetic"
    cirr = build_benchmark("cirr", root / "cirr", "val")
    assert (root / "cirr" / "cirr" / "captions" / "cap.rc2.val.json").is_file()
    assert all(r.path.parent.name == "dev" and r.path.is_file() for r in cirr.gallery)
    assert len(cirr.gallery) == 6 * 6
    assert len(cirr.queries) == 6 * 7
    for q in cirr.queries:
        assert len(q.subset_ids) == 5
        assert q.reference.image_id not in q.subset_ids
        assert q.target_ids[0] in q.subset_ids
    test1 = build_benchmark("cirr", root / "cirr", "test1")
    assert not test1.labelled
    assert len(test1.queries) == 3 * 7
    circo = build_benchmark("circo", root / "circo", "val")
    assert all(1 <= len(q.target_ids) <= 4 for q in circo.queries)
    assert any(len(q.target_ids) > 1 for q in circo.queries)
    assert all(r.path.name == f"{int(r.image_id):012d}.jpg" for r in circo.gallery)
    ref_ids = {q.reference.image_id for q in circo.queries}
    assert ref_ids <= {r.image_id for r in circo.gallery}  # references stay in the index


def test_held_out_compositions_are_absent_from_training_but_in_benchmarks(small_world):
    root = small_world / "synthetic"
    held_out = {tuple(p) for p in SynthConfig().held_out}
    for caption in load_text_corpus(root / "text" / "captions.txt"):
        for colour, shape in held_out:
            for word in W.SHAPES[shape]:
                assert f"{colour} {word}" not in caption
    import tarfile

    for shard in sorted((root / "corpus" / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    scene = json.loads(tar.extractfile(m).read())
                    assert not {(o["colour"], o["shape"]) for o in scene["objects"]} & held_out
    # benchmark targets use them (the edits prefer held-out pairs)
    seen = 0
    for s in range(200):
        rng = random.Random(s)
        base = W.sample_scene(rng)
        edited = W.apply_random_edit(base, rng, "recolour", held_out)
        seen += bool(edited.pairs() & held_out)
    assert seen > 20


def test_modification_text_names_the_change():
    rng = random.Random(0)
    a = W.Scene((W.Obj("circle", "red", "small", "left"), W.Obj("square", "blue", "large", "right")), "gray")
    b = a.with_objects([W.Obj("circle", "green", "small", "left"), a.objects[1]])
    text, kind = W.describe_edit(a, b, rng)
    assert kind == "recolour"
    assert "green" in text
    c = a.with_objects([a.objects[1]])
    text, kind = W.describe_edit(a, c, rng)
    assert kind == "remove"
    assert any(w in text for w in W.SHAPES["circle"])
