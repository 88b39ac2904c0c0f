"""The shipped demo model: the default model, a few MB of package data, and it draws what it is
asked (the README's prompts included)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from serve.demo import WEIGHTS_DIR, demo_model_path
from serve.demo.checker import read_scene
from serve.demo.model import DEFAULT_GUIDANCE
from serve.model import read_model_info, resolve_source
from serve.params import GenerationParams

ROOT = Path(__file__).resolve().parents[2]

# (prompt, what the image must show): colours, the shape and where it is. Seed 0, 20 steps, the
# model's own scheduler and guidance -- the defaults a user gets.
PROMPTS = [
    ("a red circle on the left on a blue background", dict(colour="red", background="blue", position="left")),
    (
        "a large yellow star in the center, black background",
        dict(colour="yellow", background="black", position="center"),
    ),
    (
        "a green triangle at the bottom against a white background",
        dict(colour="green", background="white", position="bottom"),
    ),
]


@pytest.fixture(scope="module")
def pipe():
    from serve.pipeline import Pipeline

    return Pipeline.load(demo_model_path(), device="cpu")


@pytest.mark.parametrize("prompt, expected", PROMPTS)
def test_three_prompts_draw_what_they_say(pipe, prompt, expected):
    p = GenerationParams(
        prompt=prompt,
        negative_prompt=None,
        width=64,
        height=64,
        num_inference_steps=20,
        guidance_scale=DEFAULT_GUIDANCE,
        seed=0,
        n=1,
        scheduler=None,
        output_format="png",
    )
    reading = read_scene(pipe.generate(p).pixels[0])
    assert {k: getattr(reading, k) for k in expected} == expected, reading


def test_default_model_is_the_shipped_demo_and_tiny_is_a_name(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_CACHE_DIR", str(tmp_path / "cache"))
    assert Path(resolve_source(None)) == WEIGHTS_DIR == Path(resolve_source("darkroom-demo"))
    info = read_model_info(resolve_source(None))
    assert info.name == "darkroom-demo" and info.native_size == (64, 64)
    tiny = Path(resolve_source("tiny"))
    assert tiny.is_relative_to(tmp_path / "cache") and read_model_info(tiny).name == "tiny"
    assert resolve_source(str(tmp_path)) == str(tmp_path)  # a folder is still a folder


def test_weights_are_a_few_mb_of_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    files = [f for f in WEIGHTS_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 10e6
    assert {f.parent.name for f in files if f.suffix == ".safetensors"} == {"unet", "vae", "text_encoder"}
    # A non-editable install carries every file: each matches a package-data pattern (the
    # weights' subfolders are namespace packages of serve.demo, so "*" patterns apply there).
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["*"]
    demo_patterns = config["package-data"]["serve.demo"]  # relative to serve/demo
    assert "serve*" in config["packages"]["find"]["include"]
    for f in files:
        relative = f.relative_to(WEIGHTS_DIR.parent).as_posix()
        assert any(fnmatch.fnmatch(f.name, p) for p in patterns) or any(
            fnmatch.fnmatch(relative, p) for p in demo_patterns
        ), f
