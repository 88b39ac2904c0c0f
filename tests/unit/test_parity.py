"""Parity with diffusers' StableDiffusionPipeline: the seed contract of DESIGN.md.

Every image equals diffusers' output within 3 levels per 8-bit channel: per scheduler, CFG on
and off, with and without negative prompts, n > 1, non-square sizes, and many different
requests inside one Denoiser call.
"""

from __future__ import annotations

import numpy as np
import pytest

from serve.params import SCHEDULER_NAMES
from serve.pipeline import Pipeline
from tests.conftest import make_params as params
from tests.conftest import max_level_diff

TOLERANCE = 3


@pytest.fixture(scope="module")
def pipe(tiny_model) -> Pipeline:
    return Pipeline.load(tiny_model, device="cpu")


# (name, overrides): each case is run for every scheduler.
CASES = {
    "cfg_negative_n2_nonsquare": dict(negative_prompt="blurry, low quality", n=2, width=64, height=48),
    "cfg_no_negative": dict(prompt="a red fox in the snow", seed=7),
    "no_cfg_nonsquare": dict(guidance_scale=1.0, width=48, height=72, seed=99),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_single_request_matches_diffusers(pipe, reference, scheduler, case):
    p = params(scheduler=scheduler, **CASES[case])
    got = np.stack(pipe.generate(p).pixels)
    want = reference(p)
    assert got.shape == (p.n, p.height, p.width, 3)
    assert max_level_diff(got, want) <= TOLERANCE


def test_default_scheduler_and_guidance_zero(pipe, reference):
    p = params(guidance_scale=0.0, num_inference_steps=4)
    assert max_level_diff(np.stack(pipe.generate(p).pixels), reference(p)) <= TOLERANCE


def test_first_of_n_equals_n1(pipe):
    """diffusers draws the n latents in one randn call: image 0 of n=2 is the n=1 image."""
    one = pipe.generate(params(n=1)).pixels[0]
    two = pipe.generate(params(n=2)).pixels
    assert max_level_diff(one, two[0]) <= TOLERANCE
    assert max_level_diff(two[0], two[1]) > TOLERANCE


def test_one_denoiser_call_holds_many_different_requests(pipe, reference):
    """One generate_batch = one Denoiser call with mixed schedulers, steps, CFG, sizes, n."""
    batch = []
    for i, name in enumerate(SCHEDULER_NAMES):
        batch.append(
            params(
                prompt=f"request {i}: a castle on an island",
                negative_prompt="blurry" if i % 2 else None,
                scheduler=name,
                num_inference_steps=3 + i,
                guidance_scale=1.0 if i % 3 == 0 else 5.0 + i,
                seed=1000 + i,
                n=1 + i % 2,
                width=64 if i % 4 else 48,
                height=64,
            )
        )
    calls_before = pipe.denoiser.model_calls
    results = pipe.generate_batch(batch)
    # Requests shared UNet calls: more samples per call than any one request has.
    assert max(pipe.denoiser.last_batch_sizes) > 4
    assert pipe.denoiser.model_calls - calls_before < sum(len(r.params.prompt) for r in results)
    for p, r in zip(batch, results, strict=True):
        assert r.seed == p.seed
        assert max_level_diff(np.stack(r.pixels), reference(p)) <= TOLERANCE, p


def test_parity_check_can_fail(pipe, reference):
    """The tolerance is tight enough to tell requests apart: a wrong seed, prompt or negative
    prompt all exceed it, so the parity tests above would catch a mix-up."""
    p = params()
    got = np.stack(pipe.generate(p).pixels)
    for other in (params(seed=1235), params(prompt="a dog"), params(negative_prompt="ugly")):
        assert max_level_diff(got, reference(other)) > TOLERANCE
