"""The seed contract on the shipped demo model: Darkroom's stages give diffusers' own
StableDiffusionPipeline images (within 3 levels per channel), as for the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from serve.demo import demo_model_path
from serve.pipeline import Pipeline
from tests.conftest import diffusers_reference, max_level_diff
from tests.conftest import make_params as params

TOLERANCE = 3
PROMPT = "a small red star on the left on a blue background"


@pytest.fixture(scope="module")
def demo_model() -> str:
    return str(demo_model_path())


@pytest.fixture(scope="module")
def pipe(demo_model) -> Pipeline:
    return Pipeline.load(demo_model, device="cpu")


@pytest.fixture(scope="module")
def reference(demo_model):
    return diffusers_reference(demo_model)


CASES = {
    "cfg_negative_n2_nonsquare": dict(prompt=PROMPT, negative_prompt="a green square", n=2, width=64, height=48),
    "no_cfg_large": dict(prompt="a yellow circle in the center", guidance_scale=1.0, width=96, height=96, seed=7),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpmpp_2m", "ddim"])
def test_demo_model_matches_diffusers(pipe, reference, scheduler, case):
    p = params(scheduler=scheduler, num_inference_steps=8, **CASES[case])
    got = np.stack(pipe.generate(p).pixels)
    assert got.shape == (p.n, p.height, p.width, 3)
    assert max_level_diff(got, reference(p)) <= TOLERANCE


def test_many_requests_in_one_denoiser_call(pipe, reference):
    batch = [
        params(prompt=PROMPT, seed=1),
        params(prompt="three pink triangles at the bottom", scheduler="euler", seed=2, num_inference_steps=5),
        params(prompt="a large white square, black background", guidance_scale=1.0, seed=3, n=2),
    ]
    for p, r in zip(batch, pipe.generate_batch(batch), strict=True):
        assert max_level_diff(np.stack(r.pixels), reference(p)) <= TOLERANCE, p


def test_parity_check_can_fail(pipe, reference):
    """Another seed, prompt or negative prompt is far outside the tolerance on this model."""
    p = params(prompt=PROMPT)
    got = np.stack(pipe.generate(p).pixels)
    for other in (
        params(prompt=PROMPT, seed=1235),
        params(prompt="a green square"),
        params(prompt=PROMPT, negative_prompt="red"),
    ):
        assert max_level_diff(got, reference(other)) > TOLERANCE
