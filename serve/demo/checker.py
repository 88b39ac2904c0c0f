"""Reading a generated image back into words: background, colour, shape, position, size, count.

Measured statistics, not a trained classifier, on purpose: a classifier trained on the same
synthetic scenes as the generator would share its blind spots (it could call any blob of the
right colour a "circle" because that is what it saw most), and its errors would be hard to
explain. Every step here can be checked by eye on one image:

1. background: the median of the 2-pixel border, named by the nearest palette colour;
2. foreground: pixels farther from the background than half the image's strongest contrast
   (at least 30 levels); connected components smaller than a third of the largest are noise;
3. colour: the median of the components' interior pixels (edges blend with the background),
   named by the nearest palette colour;
4. position: the components' joint centre of mass, named by the nearest anchor
   (``data.ANCHORS``);
5. shape: per component, the 3rd, 4th and 5th Fourier harmonics of its outline's radius
   around its centre (three lobes: triangle, four: square, five: star, none: circle); the
   shape is the class whose mean harmonics, *measured on rendered scenes* (sharp and blurred,
   ``ShapeStats.measure``), are nearest in units of their spread; components vote by area;
6. size: the components' mean side (bounding box), nearest of the measured small and large
   means (about 13 and 24 pixels); count: the number of components.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from serve.demo.data import ANCHORS, COLOURS, SHAPES, SIZES, Scene, render, training_scene

logger = logging.getLogger(__name__)

_BORDER = 2
_BLUR_SIGMAS = (0.0, 0.7, 1.2)
_MIN_SPREAD = 0.01
_MIN_CONTRAST = 30.0
_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)

#: Attributes a reading is scored on, in report order.
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "position", "background", "size", "count")


@dataclass(frozen=True)
class Reading:
    """What the checker saw; ``None`` where it found no foreground at all."""

    background: str
    colour: str | None
    shape: str | None
    position: str | None
    size: str | None
    count: int

    def matches(self, scene: Scene) -> dict[str, bool]:
        """Per attribute: does the image show what the scene's caption asked for?"""
        return {
            "colour": self.colour == scene.colour,
            "shape": self.shape == scene.shape,
            "position": self.position == scene.position,
            "background": self.background == scene.background,
            "size": self.size == scene.size,
            "count": self.count == scene.count,
        }


def nearest_colour(rgb: np.ndarray) -> str:
    distances = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float32), axis=1)
    return _PALETTE_NAMES[int(np.argmin(distances))]


_ANGLE_BINS = 48


def _descriptors(mask: np.ndarray) -> tuple[tuple[float, float, float], float]:
    """((h3, h4, h5), side) of one component's boolean mask.

    ``hk`` is the k-th Fourier harmonic of the outline's radius around the centre of mass,
    relative to the mean radius: an upright triangle's outline has three lobes (h3 = 0.30), a
    square four (h4 = 0.15), a five-pointed star five (h5 = 0.30), a circle none (all < 0.04).
    Blur shrinks a star's h5 (0.17 at sigma 1 pixel for a small one) but moves no energy to
    another harmonic, so softer images do not read as another shape, as extent or solidity
    would (a blurred star has a triangle's solidity).
    """
    from scipy import ndimage

    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    ey, ex = np.nonzero(mask & ~ndimage.binary_erosion(mask))
    # Corners of the edge pixels: the outline at pixel precision, whatever the shape's size.
    px = np.concatenate([ex + dx for dx in (0, 1) for dy in (0, 1)])
    py = np.concatenate([ey + dy for dx in (0, 1) for dy in (0, 1)])
    angle_bin = ((np.arctan2(py - cy, px - cx) + np.pi) / (2 * np.pi) * _ANGLE_BINS).astype(int) % _ANGLE_BINS
    radius = np.zeros(_ANGLE_BINS)
    np.maximum.at(radius, angle_bin, np.hypot(px - cx, py - cy))
    empty = radius == 0
    if empty.all():
        return (0.0, 0.0, 0.0), 1.0
    if empty.any():  # tiny outlines leave gaps between angles: interpolate around the circle
        k = np.arange(_ANGLE_BINS)
        radius[empty] = np.interp(k[empty], k[~empty], radius[~empty], period=_ANGLE_BINS)
    spectrum = np.abs(np.fft.rfft(radius)) * 2 / (_ANGLE_BINS * radius.mean())
    side = float(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
    return (float(spectrum[3]), float(spectrum[4]), float(spectrum[5])), side


@dataclass(frozen=True)
class ShapeStats:
    """Mean outline harmonics (h3, h4, h5) per shape and mean side per size, measured on
    rendered scenes."""

    shape_means: dict[str, tuple[float, ...]]
    shape_spreads: dict[str, tuple[float, ...]]
    size_means: dict[str, float]

    @classmethod
    def measure(cls, n: int = 400, seed: int = 12345) -> ShapeStats:
        """Descriptors of every component of ``n`` rendered training scenes, averaged per class.

        Each scene is measured sharp and blurred (Gaussian, sigma 0.7 or 1.2 pixels, in turn):
        decoded images are softer than renders (a VAE's reconstruction of a small star has
        rounded points), and a mean taken on sharp renders only would call soft stars triangles.
        """
        from PIL import Image, ImageFilter

        per_shape: dict[str, list[tuple[float, ...]]] = {s: [] for s in SHAPES}
        per_size: dict[str, list[float]] = {s: [] for s in SIZES}
        for i in range(n):
            scene = training_scene(seed, i)
            image = render(scene)
            sigma = _BLUR_SIGMAS[i % len(_BLUR_SIGMAS)]
            if sigma:
                image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))
            for mask in _components(image)[1]:
                descriptor, side = _descriptors(mask)
                per_shape[scene.shape].append(descriptor)
                per_size[scene.size].append(side)
        shape_means = {s: tuple(np.mean(v, axis=0).tolist()) for s, v in per_shape.items()}
        # Spread per class and harmonic, floored so that a very regular class (a square's h3 is
        # exactly 0) cannot make its axis infinitely strict.
        spreads = {s: tuple(np.maximum(np.std(v, axis=0), _MIN_SPREAD).tolist()) for s, v in per_shape.items()}
        size_means = {s: float(np.mean(v)) for s, v in per_size.items()}
        return cls(shape_means, spreads, size_means)

    def shape_of(self, descriptor: tuple[float, ...]) -> str:
        """The most likely class under independent Gaussians per harmonic (measured mean and
        spread): a star's h5 varies a lot with blur, a circle's hardly, so a soft star with
        h5 = 0.09 is a star although 0.09 is nearer the circle's mean (0.02) than the star's."""
        x = np.array(descriptor)

        def cost(shape: str) -> float:
            mean, spread = np.array(self.shape_means[shape]), np.array(self.shape_spreads[shape])
            return float(np.sum(((x - mean) / spread) ** 2 / 2 + np.log(spread)))

        return min(self.shape_means, key=cost)

    def size_of(self, side: float) -> str:
        return min(self.size_means, key=lambda s: abs(self.size_means[s] - side))


@lru_cache(maxsize=1)
def default_stats() -> ShapeStats:
    stats = ShapeStats.measure()
    logger.debug("shape statistics measured on rendered scenes: %s", stats)
    return stats


def _components(image: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(background RGB, boolean masks of the foreground components that are not noise)."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate(
        [img[:_BORDER].reshape(-1, 3), img[-_BORDER:].reshape(-1, 3), img[:, :_BORDER].reshape(-1, 3)]
        + [img[:, -_BORDER:].reshape(-1, 3)]
    )
    background = np.median(border, axis=0)
    distance = np.linalg.norm(img - background, axis=-1)
    contrast = float(np.percentile(distance, 99.5))
    if contrast < _MIN_CONTRAST:
        return background, []
    labels, n = ndimage.label(distance > max(_MIN_CONTRAST, 0.5 * contrast))
    if n == 0:
        return background, []
    areas = ndimage.sum_labels(np.ones_like(distance), labels, index=np.arange(1, n + 1))
    keep = [i + 1 for i, a in enumerate(areas) if a >= max(4.0, areas.max() / 3)]
    return background, [labels == k for k in keep]


def read_scene(image: np.ndarray, stats: ShapeStats | None = None) -> Reading:
    """Read one ``uint8 (H, W, 3)`` image (any size; positions are relative to it)."""
    from scipy import ndimage

    stats = stats or default_stats()
    background, masks = _components(image)
    bg_name = nearest_colour(background)
    if not masks:
        return Reading(background=bg_name, colour=None, shape=None, position=None, size=None, count=0)
    img = np.asarray(image, dtype=np.float32)[..., :3]
    union = np.logical_or.reduce(masks)
    interior = ndimage.binary_erosion(union)
    pixels = img[interior] if interior.sum() >= 4 else img[union]
    colour = nearest_colour(np.median(pixels, axis=0))

    h, w = union.shape
    ys, xs = np.nonzero(union)
    # Anchors are in 64x64 pixels; scale the centre of mass into that frame.
    cx, cy = xs.mean() * 64 / w + 0.5, ys.mean() * 64 / h + 0.5
    position = min(ANCHORS, key=lambda p: (ANCHORS[p][0] - cx) ** 2 + (ANCHORS[p][1] - cy) ** 2)

    votes: dict[str, float] = {}
    sides = []
    for mask in masks:
        descriptor, side = _descriptors(mask)
        shape = stats.shape_of(descriptor)
        votes[shape] = votes.get(shape, 0.0) + float(mask.sum())  # bigger components weigh more
        sides.append(side * 64 / max(h, w))
    shape = max(votes, key=votes.__getitem__)
    size = stats.size_of(float(np.mean(sides)))
    return Reading(background=bg_name, colour=colour, shape=shape, position=position, size=size, count=len(masks))


def score(readings: list[Reading], scenes: list[Scene]) -> dict[str, float]:
    """Share of images that show each attribute as asked, plus ``all`` (colour, shape and
    position together)."""
    matches = [r.matches(s) for r, s in zip(readings, scenes, strict=True)]
    rates = {a: float(np.mean([m[a] for m in matches])) for a in ATTRIBUTES}
    rates["all"] = float(np.mean([m["colour"] and m["shape"] and m["position"] for m in matches]))
    return rates


def breakdown(readings: list[Reading], scenes: list[Scene]) -> dict[str, dict[str, float]]:
    """Per attribute and asked-for value, the share drawn as asked (``{"shape": {"star": 0.7,
    ...}}``): where the model is weak, and whether a failure mode inflates one value (a
    shapeless blob reads as a circle, so a high circle rate beside low others means blobs)."""
    out: dict[str, dict[str, float]] = {}
    for attribute in ("colour", "shape", "position", "background"):
        hits: dict[str, list[bool]] = {}
        for r, s in zip(readings, scenes, strict=True):
            hits.setdefault(getattr(s, attribute), []).append(r.matches(s)[attribute])
        out[attribute] = {value: float(np.mean(v)) for value, v in sorted(hits.items())}
    return out
