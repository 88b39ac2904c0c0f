"""Captioned synthetic scenes: what the demo model is trained on and evaluated with.

A scene is one to three identical shapes (circle, square, triangle, star) in a named colour, at
a named position (left, right, top, bottom, center), small or large, on a background of another
named colour. Every scene is a pure function of ``(seed, index)``, so a data set is reproducible
without storing it, and captions phrase the same scene several ways ("a small red circle on the
left, blue background", "a blue background with a red circle on the left").

Held out: a fixed tenth of the ``(colour, shape, position, background)`` combinations never
appears in training, whatever the caption says; evaluation prompts are built from those
combinations only, so adherence measures composition, not memorised captions.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: Native image side in pixels (the VAE maps 64x64 images to 16x16 latents).
IMAGE_SIZE = 64

#: Named colours, chosen far apart in RGB so a measured colour has one clear nearest name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (250, 225, 40),
    "green": (40, 170, 60),
    "blue": (30, 80, 220),
    "purple": (130, 50, 180),
    "pink": (250, 130, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
SIZES: tuple[str, ...] = ("small", "large")

#: Where a position puts a shape's centre, in pixels of a 64x64 image.
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (18.0, 32.0),
    "right": (46.0, 32.0),
    "top": (32.0, 18.0),
    "bottom": (32.0, 46.0),
    "center": (32.0, 32.0),
}
#: Half-extent of a shape in pixels: a small circle is 16 px across, a large one 28. (A 14-pixel
#: star spans under four latent cells; its points were the first thing the VAE lost.)
RADIUS = {"small": 8.0, "large": 14.0}
#: Centre-to-centre distance of shapes in a group (small only), along the position's axis.
GROUP_SPACING = 19.0
JITTER = 2  # +- pixels a single shape may move from its anchor

_COUNT_WORDS = {2: "two", 3: "three"}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "center": ("in the center", "in the middle", "in the center of the image"),
}
# {s}: subject ("a small red circle"), {p}: position phrase, {b}: background colour name, {ab}: the
# same with its article ("an orange").
_TEMPLATES_FULL = (
    "{s} {p} on {ab} background",
    "{s} {p}, {b} background",
    "{ab} background with {s} {p}",
    "{s} {p} against {ab} background",
    "a picture of {s} {p} on {ab} background",
)
_TEMPLATES_NO_POSITION = ("{s} on {ab} background", "{ab} background with {s}", "{s}, {b} background")
_TEMPLATES_NO_BACKGROUND = ("{s} {p}", "a picture of {s} {p}")
_TEMPLATES_SUBJECT_ONLY = ("{s}", "a picture of {s}")

#: Share of held-out (colour, shape, position, background) combinations, in percent.
HELD_OUT_PERCENT = 10


@dataclass(frozen=True)
class Scene:
    """One image's content and one caption for it."""

    colour: str
    shape: str
    position: str
    background: str
    size: str
    count: int
    offset: tuple[int, int]  # jitter of a single shape from its anchor, pixels
    caption: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.colour, self.shape, self.position, self.background)


def is_held_out(colour: str, shape: str, position: str, background: str) -> bool:
    """Whether a combination is reserved for evaluation (a stable hash, not Python's salted one)."""
    digest = hashlib.sha256(f"{colour}|{shape}|{position}|{background}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


@lru_cache(maxsize=1)
def held_out_keys() -> tuple[tuple[str, str, str, str], ...]:
    """Every held-out combination, in a fixed order."""
    return tuple(
        (c, s, p, b)
        for c in COLOURS
        for s in SHAPES
        for p in POSITIONS
        for b in COLOURS
        if b != c and is_held_out(c, s, p, b)
    )


def plural(shape: str) -> str:
    return shape + "s"


def subject(colour: str, shape: str, size: str | None, count: int) -> str:
    """ "a small red circle", "two yellow stars", "three small blue squares"."""
    words = [size] if size else []
    words += [colour, shape if count == 1 else plural(shape)]
    return " ".join([_COUNT_WORDS[count], *words]) if count > 1 else with_article(" ".join(words))


def with_article(words: str) -> str:
    """ "an orange star", "a red star"."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption_for(
    rng: random.Random,
    colour: str,
    shape: str,
    position: str,
    background: str,
    size: str,
    count: int,
    *,
    complete: bool = False,
) -> str:
    """A caption for the scene; ``complete`` names every attribute (what evaluation prompts do).

    Training captions sometimes leave out the size, position or background, so a prompt that
    does not mention them still means something (the model draws any of them).
    """
    say_size = complete or rng.random() < 0.6
    if count > 1 and not complete and rng.random() < 0.5:
        say_size = False  # groups are always small: "two yellow stars" is a full description
    say_position = complete or rng.random() < 0.85
    say_background = complete or rng.random() < 0.85
    if say_position and say_background:
        templates = _TEMPLATES_FULL
    elif say_background:
        templates = _TEMPLATES_NO_POSITION
    elif say_position:
        templates = _TEMPLATES_NO_BACKGROUND
    else:
        templates = _TEMPLATES_SUBJECT_ONLY
    template = rng.choice(templates)
    return template.format(
        s=subject(colour, shape, size if say_size else None, count),
        p=rng.choice(_POSITION_PHRASES[position]),
        b=background,
        ab=with_article(background),
    )


def _draw_attributes(rng: random.Random) -> tuple[str, str, str, str, str, int]:
    colours = list(COLOURS)
    while True:
        colour, background = rng.sample(colours, 2)
        shape = rng.choice(SHAPES)
        position = rng.choice(POSITIONS)
        if not is_held_out(colour, shape, position, background):
            break
    count = rng.choices((1, 2, 3), weights=(6, 2, 2))[0]
    size = "small" if count > 1 else rng.choice(SIZES)
    return colour, shape, position, background, size, count


def training_scene(seed: int, index: int) -> Scene:
    """Scene ``index`` of the training set ``seed``: never a held-out combination."""
    rng = random.Random(seed * 1_000_003 + index)
    colour, shape, position, background, size, count = _draw_attributes(rng)
    offset = (rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)) if count == 1 else (0, 0)
    caption = caption_for(rng, colour, shape, position, background, size, count)
    return Scene(colour, shape, position, background, size, count, offset, caption)


def evaluation_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` scenes from held-out combinations only, each with a complete caption.

    Cycles through the held-out combinations in a seeded order (so the first ``n`` cover as many
    different ones as possible); size and count are drawn per scene.
    """
    keys = list(held_out_keys())
    random.Random(seed).shuffle(keys)
    scenes = []
    for i in range(n):
        rng = random.Random(seed * 7_919 + i)
        colour, shape, position, background = keys[i % len(keys)]
        count = rng.choices((1, 2, 3), weights=(6, 2, 2))[0]
        size = "small" if count > 1 else rng.choice(SIZES)
        caption = caption_for(rng, colour, shape, position, background, size, count, complete=True)
        scenes.append(Scene(colour, shape, position, background, size, count, (0, 0), caption))
    return scenes


def seen_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` scenes from training combinations, each with a complete caption (as evaluation's).

    The same kind of prompt as ``evaluation_scenes`` on combinations the model was trained on:
    comparing the two tells underfitting (both low) from a failure to compose (only held-out low).
    """
    scenes = []
    for i in range(n):
        rng = random.Random(seed * 7_919 + 1_000_000 + i)
        colour, shape, position, background, size, count = _draw_attributes(rng)
        caption = caption_for(rng, colour, shape, position, background, size, count, complete=True)
        scenes.append(Scene(colour, shape, position, background, size, count, (0, 0), caption))
    return scenes


def shape_centres(scene: Scene) -> list[tuple[float, float]]:
    """Pixel centres of the scene's shapes: a group lies along its position's axis."""
    ax, ay = ANCHORS[scene.position]
    ax += scene.offset[0]
    ay += scene.offset[1]
    # Left/right groups stack vertically, the others sit in a row, so the group's centre of mass
    # stays on its anchor and every shape stays inside the image.
    along_x = scene.position not in ("left", "right")
    centres = []
    for i in range(scene.count):
        d = (i - (scene.count - 1) / 2) * GROUP_SPACING
        centres.append((ax + d, ay) if along_x else (ax, ay + d))
    return centres


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r  # a square as tall as the circle looks bigger; this evens out their areas
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -np.pi / 2 + k * np.pi / 5
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """The scene as ``uint8 (size, size, 3)``, anti-aliased by drawing at ``supersample`` x."""
    from PIL import Image, ImageDraw

    k = size / IMAGE_SIZE * supersample
    canvas = Image.new("RGB", (size * supersample,) * 2, COLOURS[scene.background])
    draw = ImageDraw.Draw(canvas)
    fill = COLOURS[scene.colour]
    r = RADIUS[scene.size]
    for cx, cy in shape_centres(scene):
        if scene.shape == "circle":
            draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=fill)
        else:
            draw.polygon([(x * k, y * k) for x, y in _polygon(scene.shape, cx, cy, r)], fill=fill)
    image = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def vocabulary() -> list[str]:
    """Every word a caption can contain (what the demo tokenizer learns its merges from)."""
    words: set[str] = set(COLOURS) | set(SHAPES) | {plural(s) for s in SHAPES} | set(SIZES)
    words |= set(_COUNT_WORDS.values()) | {"a", "an"}
    texts = [*_TEMPLATES_FULL, *_TEMPLATES_NO_POSITION, *_TEMPLATES_NO_BACKGROUND, *_TEMPLATES_SUBJECT_ONLY]
    texts += [p for phrases in _POSITION_PHRASES.values() for p in phrases]
    for text in texts:
        for word in text.replace(",", " ").split():
            if not word.startswith("{"):
                words.add(word)
    return sorted(words)
