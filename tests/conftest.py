"""Session-wide fixtures: the tiny model (made once) and diffusers' reference pipeline."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may download anything
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from serve.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def reference(tiny_model):
    """``reference(params) -> uint8 (n, H, W, 3)``: diffusers' own StableDiffusionPipeline output."""
    return diffusers_reference(tiny_model)


def diffusers_reference(model: str):
    """``run(params) -> uint8 (n, H, W, 3)``: diffusers' StableDiffusionPipeline on ``model``."""
    import torch
    from diffusers import StableDiffusionPipeline

    from serve.schedulers import scheduler_class

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    default_class = type(pipe.scheduler).__name__

    def run(p) -> np.ndarray:
        pipe.scheduler = scheduler_class(p.scheduler, default_class).from_config(config)
        out = pipe(
            p.prompt,
            negative_prompt=p.negative_prompt,
            height=p.height,
            width=p.width,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(p.seed),
            num_images_per_prompt=p.n,
            output_type="np",
        )
        return (out.images * 255).round().astype("uint8")

    return run


def max_level_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest per-channel difference in 8-bit levels (the seed contract allows 3)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def make_params(**kw):
    """A GenerationParams for parity tests: a small CFG request at 64x64, overridden by ``kw``."""
    from serve.params import GenerationParams

    base = dict(
        prompt="a lighthouse at dusk",
        negative_prompt=None,
        width=64,
        height=64,
        num_inference_steps=6,
        guidance_scale=7.5,
        seed=1234,
        n=1,
        scheduler=None,
        output_format="png",
    )
    base.update(kw)
    return GenerationParams(**base)
