"""The shapes world: scenes of 1–3 coloured shapes, their renderings, captions and one-step edits.

Everything is a pure function of explicit ``random.Random`` / ``numpy`` generators, so a world
generated twice from the same seed is byte-identical. Captions and modification texts use templates
with synonyms so that the text encoder has to generalise over phrasing, and a configurable set of
(colour, shape) pairs is held out of the training corpora but used by the benchmarks (unseen
compositions, as in real zero-shot CIR).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangle", "three-sided shape"),
    "cross": ("cross", "plus sign", "cross"),
    "diamond": ("diamond", "rhombus", "diamond"),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 210, 45),
    "purple": (145, 60, 195),
    "orange": (245, 140, 30),
}
SIZES: dict[str, tuple[tuple[str, ...], float]] = {  # words, radius as a fraction of the image side
    "small": (("small", "little", "tiny"), 0.085),
    "large": (("large", "big", "huge"), 0.15),
}
SLOTS: dict[str, tuple[float, tuple[str, ...]]] = {  # x centre as a fraction, phrases
    "left": (0.19, ("on the left", "at the left", "on the left side")),
    "middle": (0.5, ("in the middle", "in the center", "in the centre")),
    "right": (0.81, ("on the right", "at the right", "on the right side")),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (22, 22, 28),
    "gray": (118, 118, 122),
    "white": (232, 232, 226),
}
#: (colour, shape) pairs never shown in the training corpora by default.
DEFAULT_HELD_OUT: tuple[tuple[str, str], ...] = (
    ("purple", "triangle"),
    ("yellow", "square"),
    ("green", "cross"),
    ("orange", "circle"),
)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    slot: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # sorted by slot: left, middle, right
    background: str

    def with_objects(self, objects: list[Obj] | tuple[Obj, ...]) -> Scene:
        return replace(self, objects=tuple(sorted(objects, key=lambda o: list(SLOTS).index(o.slot))))

    def pairs(self) -> set[tuple[str, str]]:
        return {(o.colour, o.shape) for o in self.objects}


# ---- sampling ---------------------------------------------------------------------------------------
def sample_object(rng: random.Random, slot: str, held_out: set[tuple[str, str]]) -> Obj:
    while True:
        obj = Obj(rng.choice(list(SHAPES)), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), slot)
        if (obj.colour, obj.shape) not in held_out:
            return obj


def sample_scene(
    rng: random.Random,
    held_out: set[tuple[str, str]] = frozenset(),
    min_objects: int = 1,
    max_objects: int = 3,
) -> Scene:
    n = rng.randint(min_objects, max_objects)
    slots = rng.sample(list(SLOTS), n)
    objs = [sample_object(rng, s, held_out) for s in slots]
    return Scene((), rng.choice(list(BACKGROUNDS))).with_objects(objs)


# ---- rendering --------------------------------------------------------------------------------------
def render(scene: Scene, size: int, nuisance: int) -> Image.Image:
    """Draw ``scene`` at ``size``×``size``; ``nuisance`` seeds vertical jitter, shading and pixel noise."""
    rng = np.random.default_rng(nuisance)
    scale = 2  # supersample, then downsample: smooth edges without relying on ImageDraw anti-aliasing
    big = size * scale
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    shade = rng.uniform(-12, 12, size=3).astype(np.float32)
    ramp = np.linspace(-1, 1, big, dtype=np.float32)[:, None, None] * rng.uniform(-10, 10)
    canvas = np.clip(np.broadcast_to(bg + shade, (big, big, 3)) + ramp, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(canvas))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        r = SIZES[obj.size][1] * big
        cx = SLOTS[obj.slot][0] * big + rng.uniform(-0.03, 0.03) * big
        cy = big * 0.5 + rng.uniform(-0.2, 0.2) * big
        _draw_shape(draw, obj.shape, cx, cy, r, COLOURS[obj.colour])
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    noise = rng.normal(0, 4.0, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.88
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ---- captions ---------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: Obj, rng: random.Random, p_size: float = 0.7, p_slot: float = 0.5) -> str:
    words = []
    if rng.random() < p_size:
        words.append(rng.choice(SIZES[obj.size][0]))
    shape = rng.choice(SHAPES[obj.shape])
    if rng.random() < 0.2:  # relative clause: "a small circle that is blue"
        words.append(shape)
        phrase = f"{_article(words[0])} {' '.join(words)} {rng.choice(['that is', 'which is', 'coloured'])} {obj.colour}"
    else:
        words += [obj.colour, shape]
        phrase = f"{_article(words[0])} {' '.join(words)}"
    if rng.random() < p_slot:
        phrase += " " + rng.choice(SLOTS[obj.slot][1])
    return phrase


def caption(scene: Scene, rng: random.Random) -> str:
    """A natural description of the scene, with random order, synonyms and optional details."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    parts = [object_phrase(o, rng) for o in objs]
    body = (
        parts[0]
        if len(parts) == 1
        else ", ".join(parts[:-1]) + rng.choice([" and ", " next to ", " and "]) + parts[-1]
    )
    prefix = rng.choice(["", "", "a picture of ", "an image of ", "a photo of ", "there is ", "this shows "])
    if len(objs) > 1 and rng.random() < 0.15:
        prefix = ("two" if len(objs) == 2 else "three") + " shapes: "
    text = prefix + body
    if rng.random() < 0.3:
        text += f" on a {scene.background} background"
    absent = [s for s in SHAPES if s not in {o.shape for o in scene.objects}]
    if absent and rng.random() < 0.15:  # true negative statements, as real captions sometimes make
        text += rng.choice([", with no {}", " and no {}", ", without any {}"]).format(
            rng.choice(SHAPES[rng.choice(absent)])
        )
    return text


# ---- edits ------------------------------------------------------------------------------------------
EDIT_KINDS = ("recolour", "reshape", "resize", "add", "remove", "background")


def _refer(scene: Scene, obj: Obj, rng: random.Random) -> str:
    """The shortest unambiguous way to name ``obj`` in ``scene`` (shape; colour + shape; shape + place)."""
    shape = rng.choice(SHAPES[obj.shape])
    if sum(o.shape == obj.shape for o in scene.objects) == 1:
        return shape
    if sum((o.shape, o.colour) == (obj.shape, obj.colour) for o in scene.objects) == 1:
        return f"{obj.colour} {shape}"
    return f"{shape} {rng.choice(SLOTS[obj.slot][1])}"


def apply_random_edit(
    scene: Scene,
    rng: random.Random,
    kind: str,
    prefer_pairs: set[tuple[str, str]] = frozenset(),
) -> Scene | None:
    """Return ``scene`` changed by one edit of ``kind``, or None if that kind does not apply.

    ``prefer_pairs``: when the edit introduces a (colour, shape), pick one of these if possible (used to
    put held-out compositions into the benchmarks).
    """
    objs = list(scene.objects)

    def pick_pair(options: list[tuple[str, str]]) -> tuple[str, str]:
        preferred = [p for p in options if p in prefer_pairs]
        return rng.choice(preferred) if preferred and rng.random() < 0.6 else rng.choice(options)

    if kind in ("recolour", "reshape", "resize", "remove") and not objs:
        return None
    if kind == "recolour":
        i = rng.randrange(len(objs))
        colour, _ = pick_pair([(c, objs[i].shape) for c in COLOURS if c != objs[i].colour])
        objs[i] = replace(objs[i], colour=colour)
    elif kind == "reshape":
        i = rng.randrange(len(objs))
        _, shape = pick_pair([(objs[i].colour, s) for s in SHAPES if s != objs[i].shape])
        objs[i] = replace(objs[i], shape=shape)
    elif kind == "resize":
        i = rng.randrange(len(objs))
        objs[i] = replace(objs[i], size="small" if objs[i].size == "large" else "large")
    elif kind == "add":
        free = [s for s in SLOTS if s not in {o.slot for o in objs}]
        if not free:
            return None
        colour, shape = pick_pair([(c, s) for c in COLOURS for s in SHAPES])
        objs.append(Obj(shape, colour, rng.choice(list(SIZES)), rng.choice(free)))
    elif kind == "remove":
        if len(objs) < 2:
            return None
        objs.pop(rng.randrange(len(objs)))
    elif kind == "background":
        return replace(scene, background=rng.choice([b for b in BACKGROUNDS if b != scene.background]))
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    return scene.with_objects(objs)


def describe_edit(a: Scene, b: Scene, rng: random.Random) -> tuple[str, str]:
    """The modification text that turns scene ``a`` into scene ``b`` (one edit apart), and its kind."""
    if a.objects == b.objects and a.background != b.background:
        bg = b.background
        return rng.choice(
            [
                f"make the background {bg}",
                f"change the background to {bg}",
                f"use a {bg} background",
                f"same shapes on a {bg} background",
            ]
        ), "background"
    slots_a = {o.slot: o for o in a.objects}
    slots_b = {o.slot: o for o in b.objects}
    if len(b.objects) > len(a.objects):
        (slot,) = set(slots_b) - set(slots_a)
        o = slots_b[slot]
        what = f"{rng.choice(SIZES[o.size][0])} {o.colour} {rng.choice(SHAPES[o.shape])}"
        where = rng.choice(SLOTS[slot][1])
        return rng.choice(
            [
                f"add {_article(what)} {what}",
                f"add {_article(what)} {what} {where}",
                f"put {_article(what)} {what} {where}",
                f"also show {_article(what)} {what}",
            ]
        ), "add"
    if len(b.objects) < len(a.objects):
        (slot,) = set(slots_a) - set(slots_b)
        ref = _refer(a, slots_a[slot], rng)
        return rng.choice(
            [f"remove the {ref}", f"take away the {ref}", f"without the {ref}", f"get rid of the {ref}"]
        ), "remove"
    (slot,) = [s for s in slots_a if slots_a[s] != slots_b[s]]
    old, new = slots_a[slot], slots_b[slot]
    ref = _refer(a, old, rng)
    if old.colour != new.colour:
        c, shape = new.colour, rng.choice(SHAPES[new.shape])
        return rng.choice(
            [
                f"make the {ref} {c}",
                f"change the {ref} to {c}",
                f"the {ref} should be {c}",
                f"with a {c} {shape} instead",
                f"has a {c} {shape} instead of the {old.colour} one",
                f"same but the {shape} is {c}",
            ]
        ), "recolour"
    if old.shape != new.shape:
        s = rng.choice(SHAPES[new.shape])
        return rng.choice(
            [
                f"turn the {ref} into {_article(s)} {s}",
                f"replace the {ref} with {_article(s)} {s}",
                f"with {_article(new.colour)} {new.colour} {s} instead of the {ref}",
                f"has {_article(s)} {s} instead of {_article(ref)} {ref}",
            ]
        ), "reshape"
    bigger = new.size == "large"
    shape = rng.choice(SHAPES[new.shape])
    if len(a.objects) == 1 and rng.random() < 0.4:
        return ("make it bigger" if bigger else "make it smaller"), "resize"
    return rng.choice(
        [
            f"make the {ref} {'bigger' if bigger else 'smaller'}",
            f"{'enlarge' if bigger else 'shrink'} the {ref}",
            f"with a {'bigger' if bigger else 'smaller'} {shape}",
            f"the {ref} is {rng.choice(SIZES[new.size][0])} now",
        ]
    ), "resize"


# ---- concept vocabulary and phrases (SEARLE's inputs) ----------------------------------------------
def concept_vocabulary() -> list[str]:
    """The world's concept names, the counterpart of Open Images' class names for SEARLE: every shape
    word, every colour with every shape word ("red disc"), and the backgrounds ("gray background")."""
    shapes = list(dict.fromkeys(w for words in SHAPES.values() for w in words))
    return [
        *shapes,
        *(f"{c} {s}" for c in COLOURS for s in shapes),
        *(f"{b} background" for b in BACKGROUNDS),
    ]


def concept_phrases(concept: str, rng: random.Random, n: int = 24) -> list[str]:
    """``n`` short sentences that contain ``concept`` once, in the shape of SEARLE's language-model
    phrases ("a photo of {concept} that ..."), written from the world's own words (no language model).

    The continuations say things that can be true in this world: a size, a place, a neighbour, a
    background, or for a bare shape word a colour.
    """
    shapes = [w for words in SHAPES.values() for w in words]
    background = concept.endswith(" background")
    out: list[str] = []
    while len(out) < n:
        other = f"{rng.choice(list(COLOURS))} {rng.choice(shapes)}"
        if background:
            tails = [
                f"shows {_article(other)} {other}",
                f"has {_article(other)} {other} {rng.choice(SLOTS[rng.choice(list(SLOTS))][1])}",
                "holds two shapes",
                "is plain",
            ]
            head = f"a photo of a {concept} that"
        else:
            tails = [
                f"is {rng.choice(SIZES[rng.choice(list(SIZES))][0])}",
                f"is {rng.choice(SLOTS[rng.choice(list(SLOTS))][1])}",
                f"is next to {_article(other)} {other}",
                f"is on a {rng.choice(list(BACKGROUNDS))} background",
                f"sits {rng.choice(SLOTS[rng.choice(list(SLOTS))][1])} of the picture",
            ]
            if concept in shapes:
                tails.append(f"is {rng.choice(list(COLOURS))}")
            head = f"a photo of {_article(concept)} {concept} that"
        phrase = f"{head} {rng.choice(tails)}"
        if phrase.count(concept) == 1:
            out.append(phrase)
    return out
