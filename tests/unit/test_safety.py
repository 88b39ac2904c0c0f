"""The image safety check keeps diffusers' StableDiffusionSafetyChecker contract (no downloads)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from serve.errors import ModelLoadError
from serve.safety import ImageSafetyChecker, checker_folder
from serve.tiny.safety import write_tiny_safety_checker


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)


def test_tiny_checkers_flag_all_or_nothing(tmp_path, images):
    flag_all = ImageSafetyChecker.load(write_tiny_safety_checker(tmp_path / "all", "flag-all"))
    flag_none = ImageSafetyChecker.load(write_tiny_safety_checker(tmp_path / "none", "flag-none"))
    assert flag_all.check(images) == [True] * len(images)
    assert flag_none.check(images) == [False] * len(images)
    assert flag_all.check(images[:0]) == []


def test_the_tiny_checker_is_deterministic(tmp_path):
    a = write_tiny_safety_checker(tmp_path / "a", "flag-all") / "safety_checker" / "model.safetensors"
    b = write_tiny_safety_checker(tmp_path / "b", "flag-all") / "safety_checker" / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()


def test_verdicts_equal_diffusers_run_safety_checker(tiny_model, tmp_path, images):
    """Thresholds set so some images pass and some do not: ours must say what diffusers says."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    checker = ImageSafetyChecker.load(write_tiny_safety_checker(tmp_path / "c", "flag-none"))
    model = checker.model
    with torch.no_grad():
        pixels = checker.feature_extractor(list(map(_pil, images)), return_tensors="pt").pixel_values
        embeds = model.visual_projection(model.vision_model(pixels)[1])
        cos = cosine_distance(embeds, model.concept_embeds)[:, 0]
        model.concept_embeds_weights[0] = cos.median()  # about half the images score above it
    ours = checker.check(images)
    assert 0 < sum(ours) < len(images), ours
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=model, feature_extractor=checker.feature_extractor
    )
    _, theirs = pipe.run_safety_checker(images.astype(np.float32) / 255.0, "cpu", torch.float32)
    assert ours == [bool(x) for x in theirs]


def _pil(img):
    from PIL import Image

    return Image.fromarray(img)


def test_checker_folder_from_a_model_folder(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    with pytest.raises(ModelLoadError, match="safety_checker"):
        checker_folder("model", model)
    write_tiny_safety_checker(model, "flag-all")
    assert checker_folder("model", model) == model
    assert checker_folder(str(model), "/elsewhere") == model
    assert ImageSafetyChecker.load(checker_folder("model", model)).check(np.zeros((1, 64, 64, 3), np.uint8)) == [True]
