"""The scene world: pictures of a few coloured shapes, and questions about them whose answers are true by construction.

This is the baby LLaVA's whole universe (minivar/train.py trains on it; `python -m minivar.train --make-pope` turns
it into a POPE-format benchmark). It is a contract, so that anyone can draw the same distribution:

  * an image of any size: a plain light background (each channel 200–255; optionally mild noise, ±`noise` per pixel)
    with 1–4 shapes that do not overlap (their bounding boxes, grown by a 2-pixel margin, are disjoint);
  * each shape is a `circle`, `square` or `triangle` (isosceles, pointing up) whose box side is 15–35 % of the image's
    shorter side, in one of six saturated colours with every channel jittered by up to ±20;
  * shapes are placed so that their centres' x differ by at least 4 % of the width: "left to right" is never a tie.

Questions and answers (the exact words, one question per (image, question) pair):

    "Is there a {colour} {shape} in the image?"   → "Yes" / "No"   (negatives: random, popular, adversarial, as POPE)
    "What colour is the {shape}?"                 → the colour word   (asked only when exactly one such shape)
    "What shape is the {colour} object?"          → the shape word    (asked only when exactly one such colour)
    "How many shapes are there?"                  → a digit
    "Describe the image."                         → "A red circle, a blue square and a green triangle." (left to right)

One seed gives one dataset: every function takes a `random.Random` and draws from nothing else.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {                      # saturated RGB; each channel is jittered by up to ±20 when drawn
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (235, 215, 20), "purple": (140, 40, 180), "orange": (245, 130, 20),
}
JITTER = 20
SIZE_RANGE = (0.15, 0.35)        # a shape's box side as a fraction of the image's shorter side
MAX_SHAPES = 4
MARGIN = 2                       # pixels between two shapes' boxes
MIN_DX = 0.04                    # centres at least 4 % of the width apart in x: left-to-right order is well defined

KINDS = ("yesno", "colour", "shape", "count", "caption")
NEGATIVE_STRATEGIES = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class Shape:
    kind: str                    # circle, square, triangle
    colour: str                  # one of COLOURS
    rgb: tuple[int, int, int]    # the colour as drawn (jittered)
    box: tuple[int, int, int, int]   # left, top, right, bottom (pixels; right/bottom exclusive)

    @property
    def centre(self) -> tuple[float, float]:
        l, t, r, b = self.box
        return (l + r) / 2, (t + b) / 2

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]    # left to right
    noise: int = 0
    noise_seed: int = 0

    def image(self) -> Image.Image:
        return draw(self)


@dataclass(frozen=True)
class Question:
    kind: str                    # one of KINDS
    text: str
    answer: str
    label: str = ""              # for yes/no: "yes"/"no"; negatives also carry their strategy in `strategy`
    strategy: str = ""


def jitter(rgb, rng: random.Random) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-JITTER, JITTER))) for c in rgb)


def make_scene(rng: random.Random, width: int = 224, height: int = 224, n_shapes: int | None = None,
               noise: int = 0) -> Scene:
    """A random scene: 1–4 shapes (or `n_shapes`) placed without overlap; retried until they fit."""
    n = n_shapes if n_shapes is not None else rng.randint(1, MAX_SHAPES)
    if not 1 <= n <= MAX_SHAPES:
        raise ValueError(f"a scene has 1 to {MAX_SHAPES} shapes, got {n}")
    background = tuple(rng.randint(200, 255) for _ in range(3))
    short = min(width, height)
    while True:                  # rejection sampling: a whole new layout when one shape does not fit
        placed: list[Shape] = []
        for _ in range(n):
            for _attempt in range(50):
                side = max(3, round(short * rng.uniform(*SIZE_RANGE)))
                left, top = rng.randint(0, width - side), rng.randint(0, height - side)
                box = (left, top, left + side, top + side)
                cx = left + side / 2
                if all(not _overlap(box, s.box) and abs(cx - s.centre[0]) >= MIN_DX * width for s in placed):
                    colour = rng.choice(tuple(COLOURS))
                    placed.append(Shape(rng.choice(SHAPES), colour, jitter(COLOURS[colour], rng), box))
                    break
            else:
                break
        if len(placed) == n:
            shapes = tuple(sorted(placed, key=lambda s: s.centre[0]))
            return Scene(width, height, background, shapes, noise, rng.randrange(2 ** 31))


def _overlap(a, b) -> bool:
    return not (a[2] + MARGIN <= b[0] or b[2] + MARGIN <= a[0] or a[3] + MARGIN <= b[1] or b[3] + MARGIN <= a[1])


def draw(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image."""
    img = Image.new("RGB", (scene.width, scene.height), scene.background)
    if scene.noise:          # mild per-pixel noise on the background only (the shapes are drawn over it)
        import numpy as np
        g = np.random.default_rng(scene.noise_seed)
        base = np.asarray(img, dtype=np.int16)
        noisy = base + g.integers(-scene.noise, scene.noise + 1, size=base.shape, dtype=np.int16)
        img = Image.fromarray(noisy.clip(0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for s in scene.shapes:
        l, t, r, b = s.box
        if s.kind == "circle":
            d.ellipse((l, t, r - 1, b - 1), fill=s.rgb)
        elif s.kind == "square":
            d.rectangle((l, t, r - 1, b - 1), fill=s.rgb)
        else:
            d.polygon([((l + r - 1) / 2, t), (l, b - 1), (r - 1, b - 1)], fill=s.rgb)
    return img


# ---------------------------------------------------------------------------------------------------------------
# Questions


def yesno_question(colour: str, shape: str, present: bool, strategy: str = "") -> Question:
    return Question("yesno", f"Is there a {colour} {shape} in the image?", "Yes" if present else "No",
                    "yes" if present else "no", strategy)


def negative(scene: Scene, rng: random.Random, strategy: str, popularity=None) -> tuple[str, str] | None:
    """A (colour, shape) absent from the scene, chosen as POPE chooses negatives: `random` (any absent pair),
    `popular` (the absent pairs most frequent in the dataset, `popularity`: pair → count), `adversarial` (pairs that
    co-occur with what is there: a present shape in another colour, or a present colour on another shape).
    None when the strategy has no candidate for this scene."""
    present = {(s.colour, s.kind) for s in scene.shapes}
    absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
    if strategy == "random":
        pool = absent
    elif strategy == "popular":
        counts = popularity or {}
        top = max((counts.get(p, 0) for p in absent), default=0)
        pool = [p for p in absent if counts.get(p, 0) == top]
    elif strategy == "adversarial":
        kinds, colours = {s.kind for s in scene.shapes}, {s.colour for s in scene.shapes}
        pool = [(c, k) for (c, k) in absent if k in kinds or c in colours]
    else:
        raise ValueError(f"unknown negative strategy {strategy!r} (choose from {', '.join(NEGATIVE_STRATEGIES)})")
    return rng.choice(pool) if pool else None


def caption(scene: Scene) -> str:
    """"A red circle, a blue square and a green triangle." — the shapes left to right."""
    names = [f"a {s.name}" for s in scene.shapes]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def questions(scene: Scene, rng: random.Random, kind: str, strategy: str | None = None) -> Question | None:
    """One question of `kind` about `scene` (None when the scene cannot carry it, e.g. no unique shape)."""
    shapes = scene.shapes
    if kind == "yesno":
        if rng.random() < 0.5:
            s = rng.choice(shapes)
            return yesno_question(s.colour, s.kind, True)
        strategy = strategy or rng.choice(NEGATIVE_STRATEGIES)
        pair = negative(scene, rng, strategy)
        return None if pair is None else yesno_question(*pair, False, strategy)
    if kind == "colour":
        unique = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        return Question("colour", f"What colour is the {s.kind}?", s.colour)
    if kind == "shape":
        unique = [s for s in shapes if sum(t.colour == s.colour for t in shapes) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        return Question("shape", f"What shape is the {s.colour} object?", s.kind)
    if kind == "count":
        return Question("count", "How many shapes are there?", str(len(shapes)))
    if kind == "caption":
        return Question("caption", "Describe the image.", caption(scene))
    raise ValueError(f"unknown question kind {kind!r} (choose from {', '.join(KINDS)})")


def sample(rng: random.Random, kind: str | None = None, size_range=(96, 256), noise_prob: float = 0.2):
    """One (scene, question) of a random size and aspect, retried until the scene can carry the question."""
    while True:
        w, h = rng.randint(*size_range), rng.randint(*size_range)
        scene = make_scene(rng, w, h, noise=rng.choice((4, 8)) if rng.random() < noise_prob else 0)
        q = questions(scene, rng, kind or rng.choice(KINDS))
        if q is not None:
            return scene, q


def check(scene: Scene, q: Question) -> bool:
    """Is `q.answer` true of `scene`? Recomputed from the shapes themselves (the tests hold every question to it)."""
    import re
    shapes = scene.shapes
    if q.kind == "yesno":
        m = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", q.text)
        there = any(s.colour == m[1] and s.kind == m[2] for s in shapes)
        return q.answer == ("Yes" if there else "No")
    if q.kind == "colour":
        m = re.fullmatch(r"What colour is the (\w+)\?", q.text)
        match = [s for s in shapes if s.kind == m[1]]
        return len(match) == 1 and match[0].colour == q.answer
    if q.kind == "shape":
        m = re.fullmatch(r"What shape is the (\w+) object\?", q.text)
        match = [s for s in shapes if s.colour == m[1]]
        return len(match) == 1 and match[0].kind == q.answer
    if q.kind == "count":
        return q.answer == str(len(shapes))
    if q.kind == "caption":
        ordered = sorted(shapes, key=lambda s: s.centre[0])
        return q.answer == caption(Scene(scene.width, scene.height, scene.background, tuple(ordered)))
    return False
