"""SchedulerFactory: a deep copy of a never-stepped template is the scheduler ``from_config`` makes,
and requests never share state through it."""

from __future__ import annotations

import pytest
import torch

from serve.errors import InvalidRequestError
from serve.model import read_model_info
from serve.schedulers import UNET_SCHEDULERS, SchedulerFactory, make_scheduler, step_kwargs


@pytest.fixture(scope="module")
def info(tiny_model):
    return read_model_info(tiny_model)


def _run(scheduler, steps: int = 6, seed: int = 0) -> torch.Tensor:
    """A few steps over a fixed latent with a made-up noise prediction (the model's stand-in)."""
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, 8, 8, generator=g) * scheduler.init_noise_sigma
    kwargs = step_kwargs(scheduler, torch.Generator().manual_seed(seed + 1))
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        pred = torch.tanh(x * 0.3 + float(t) / 1000.0)
        latents = scheduler.step(pred, t, latents, **kwargs, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("name", [None, *UNET_SCHEDULERS])
def test_a_copy_runs_as_a_fresh_scheduler(info, name):
    factory = SchedulerFactory(info.scheduler_config, info.scheduler_class)
    fresh = _run(make_scheduler(name, info.scheduler_config, info.scheduler_class))
    first = factory.new(name)
    assert type(first) is type(make_scheduler(name, info.scheduler_config, info.scheduler_class))
    assert torch.equal(_run(first), fresh)
    # The first copy was stepped (multistep history, step index): the next one starts clean.
    second = factory.new(name)
    assert second is not first
    assert torch.equal(_run(second), fresh)


def test_copies_share_no_state(info):
    factory = SchedulerFactory(info.scheduler_config, info.scheduler_class)
    a, b = factory.new("pndm"), factory.new("pndm")
    a.set_timesteps(10)
    assert b.num_inference_steps is None
    _run(a)
    assert b.ets == [] and b.counter == 0  # PNDM's history lives in each copy


def test_unknown_names_raise_every_time(info):
    factory = SchedulerFactory(info.scheduler_config, info.scheduler_class)
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="unknown scheduler"):
            factory.new("nope")


def test_step_kwargs_match_the_uncached_helper(info):
    factory = SchedulerFactory(info.scheduler_config, info.scheduler_class)
    g = torch.Generator()
    for name in UNET_SCHEDULERS:
        s = factory.new(name)
        assert factory.step_kwargs(s, g) == step_kwargs(s, g)
        assert factory.step_kwargs(s, g, eta=0.5) == step_kwargs(s, g, eta=0.5)
