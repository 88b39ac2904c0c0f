"""The demo model's data: reproducible scenes, a held-out split training never touches, and a
checker that reads rendered scenes back correctly."""

from __future__ import annotations

import numpy as np
import pytest

from serve.demo.checker import ATTRIBUTES, ShapeStats, read_scene, score
from serve.demo.data import (
    COLOURS,
    HELD_OUT_PERCENT,
    POSITIONS,
    SHAPES,
    evaluation_scenes,
    held_out_keys,
    is_held_out,
    render,
    seen_scenes,
    training_scene,
    vocabulary,
)


def test_scenes_are_a_pure_function_of_seed_and_index():
    a = [training_scene(3, i) for i in range(50)]
    b = [training_scene(3, i) for i in range(50)]
    assert a == b
    assert all(np.array_equal(render(x), render(y)) for x, y in zip(a[:5], b[:5], strict=True))
    other = [training_scene(4, i) for i in range(50)]
    assert a != other
    # Varied phrasing: many distinct captions, and every attribute value shows up.
    assert len({s.caption for s in a}) == 50
    many = [training_scene(0, i) for i in range(2000)]
    assert {s.shape for s in many} == set(SHAPES)
    assert {s.position for s in many} == set(POSITIONS)
    assert {s.colour for s in many} == set(COLOURS) == {s.background for s in many}
    assert {s.count for s in many} == {1, 2, 3}
    assert all(s.colour != s.background for s in many)


def test_training_never_sees_a_held_out_combination():
    keys = set(held_out_keys())
    total = len(COLOURS) * (len(COLOURS) - 1) * len(SHAPES) * len(POSITIONS)
    assert abs(len(keys) / total - HELD_OUT_PERCENT / 100) < 0.03
    assert all(is_held_out(*k) for k in keys)
    assert not any(training_scene(0, i).key in keys for i in range(5000))
    # ... yet every single attribute value, and every colour-shape pair, is trained on.
    seen = {(s.colour, s.shape) for s in (training_scene(0, i) for i in range(5000))}
    assert seen == {(c, s) for c in COLOURS for s in SHAPES}


def test_evaluation_scenes_are_held_out_with_complete_captions():
    scenes = evaluation_scenes(150)
    assert len(scenes) == 150 and len({s.key for s in scenes}) == len(held_out_keys())
    assert all(is_held_out(*s.key) for s in scenes)
    for s in scenes:
        assert s.colour in s.caption and s.background in s.caption
        assert s.shape in s.caption  # "star" is in "stars" too
        if s.count == 1:
            assert s.size in s.caption
    assert evaluation_scenes(150) == scenes
    assert evaluation_scenes(20, seed=1) != scenes[:20]


def test_seen_scenes_are_training_combinations_with_complete_captions():
    scenes = seen_scenes(100)
    assert seen_scenes(100) == scenes and seen_scenes(100, seed=1) != scenes
    assert not any(is_held_out(*s.key) for s in scenes)
    assert len({s.key for s in scenes}) > 80  # spread over the combinations, not one repeated
    for s in scenes:
        assert s.colour in s.caption and s.background in s.caption and s.shape in s.caption
        if s.count == 1:
            assert s.size in s.caption


def test_vocabulary_covers_every_caption_word():
    words = set(vocabulary())
    for i in range(500):
        assert set(training_scene(0, i).caption.replace(",", " ").split()) <= words


def test_checker_reads_rendered_scenes():
    """>= 95% per attribute on real rendered scenes (measured: 100%), held-out and training."""
    scenes = evaluation_scenes(150) + [training_scene(9, i) for i in range(150)]
    readings = [read_scene(render(s)) for s in scenes]
    rates = score(readings, scenes)
    assert set(rates) == {*ATTRIBUTES, "all"}
    for attribute, rate in rates.items():
        assert rate >= 0.95, (attribute, rate)


def test_checker_reads_scaled_and_blurred_scenes():
    """Generated images are softer than renders: a blurred render still reads right, and any
    image size works (positions are relative)."""
    from PIL import Image, ImageFilter

    scenes = evaluation_scenes(60)
    readings = []
    for s in scenes:
        img = Image.fromarray(render(s, size=128)).filter(ImageFilter.GaussianBlur(1.5))
        readings.append(read_scene(np.asarray(img)))
    rates = score(readings, scenes)
    for attribute in ("colour", "shape", "position", "background"):
        assert rates[attribute] >= 0.9, (attribute, rates)


def test_checker_can_fail():
    """A scene read against another caption scores low: the checker is not always 'yes'."""
    scenes = evaluation_scenes(80)
    shifted = scenes[1:] + scenes[:1]
    rates = score([read_scene(render(s)) for s in shifted], scenes)
    assert rates["colour"] < 0.5 and rates["shape"] < 0.6 and rates["all"] < 0.2
    blank = np.zeros((64, 64, 3), np.uint8)
    reading = read_scene(blank)
    assert reading.background == "black" and reading.colour is None and reading.count == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_statistics_are_measured_apart(shape):
    stats = ShapeStats.measure(n=120)
    mean = stats.shape_means[shape]
    assert stats.shape_of(mean) == shape
    assert stats.size_means["small"] < stats.size_means["large"]
