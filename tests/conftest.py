"""Session-wide fixtures: the tiny models (made once each) and diffusers' reference pipelines."""

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


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    from serve.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", family="sdxl"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> str:
    """The dev-style tiny Flux model (guidance embedding)."""
    from serve.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux", family="flux", variant="dev"))


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> str:
    """The schnell-style tiny Flux model (no guidance)."""
    from serve.tiny import write_tiny_model

    return str(
        write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux-schnell", family="flux", variant="schnell")
    )


def _diffusers_reference(pipe, *, negative_prompt: bool, flow: bool = False):
    """``run(params, **pipeline_kwargs) -> uint8 (n, H, W, 3)`` over one loaded diffusers pipeline.

    Like ``reference``: a fresh scheduler per call (the model's own class when ``params.scheduler``
    is None), the request's seed on a CPU generator, ``n`` images per prompt. ``negative_prompt``
    says whether the pipeline takes ``params.negative_prompt`` (FluxPipeline ignores it unless
    ``true_cfg_scale > 1``, so Flux callers pass it in ``pipeline_kwargs``). ``flow``: scheduler
    names resolve among the flow-matching schedulers (Flux), else among the UNet ones.
    """
    import torch

    from serve.schedulers import FLOW_SCHEDULERS, UNET_SCHEDULERS, scheduler_class

    accepted = FLOW_SCHEDULERS if flow else UNET_SCHEDULERS

    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    default_class = type(pipe.scheduler).__name__

    def run(p, **pipeline_kwargs) -> np.ndarray:
        pipe.scheduler = scheduler_class(p.scheduler, default_class, accepted).from_config(config)
        if negative_prompt:
            pipeline_kwargs.setdefault("negative_prompt", p.negative_prompt)
        out = pipe(
            p.prompt,
            height=p.height,
            width=p.width,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(p.seed),
            num_images_per_prompt=p.n,
            output_type="np",
            **pipeline_kwargs,
        )
        return (out.images * 255).round().astype("uint8")

    return run


@pytest.fixture(scope="session")
def reference_sdxl(tiny_sdxl):
    """``reference_sdxl(params, **kw) -> uint8 (n, H, W, 3)``: diffusers' StableDiffusionXLPipeline output."""
    from diffusers import StableDiffusionXLPipeline

    return _diffusers_reference(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), negative_prompt=True)


@pytest.fixture(scope="session")
def reference_flux(tiny_flux):
    """``reference_flux(params, **kw) -> uint8 (n, H, W, 3)``: diffusers' FluxPipeline output (dev-style).

    ``params.negative_prompt`` is not passed (pass ``negative_prompt=`` and ``true_cfg_scale=`` in
    ``kw`` for true CFG); ``max_sequence_length`` is FluxPipeline's default, 512, unless given.
    """
    from diffusers import FluxPipeline

    return _diffusers_reference(FluxPipeline.from_pretrained(tiny_flux), negative_prompt=False, flow=True)


@pytest.fixture(scope="session")
def reference_flux_schnell(tiny_flux_schnell):
    """``reference_flux_schnell(params, **kw)``: like ``reference_flux``, on the schnell-style model."""
    from diffusers import FluxPipeline

    return _diffusers_reference(FluxPipeline.from_pretrained(tiny_flux_schnell), negative_prompt=False, flow=True)


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
