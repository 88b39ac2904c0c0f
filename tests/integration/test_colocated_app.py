"""The colocated profile on a real Ray Serve cluster: one Ingress deployment runs every stage.

Same images as the split app for the same seeds (and as diffusers, the seed contract), a
concurrent burst batched in its Denoiser, readiness naming the three stages, one deployment.
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest

from serve.api import parse_generation_request
from serve.imageio import decode_image
from tests.conftest import max_level_diff
from tests.integration.conftest import app_args, deploy

pytestmark = pytest.mark.integration

BODIES = [
    {"prompt": "a small boat", "seed": 4, "num_inference_steps": 5, "n": 2, "size": "48x64"},
    {"prompt": "a red fox", "seed": 9, "num_inference_steps": 7, "scheduler": "euler_a", "negative_prompt": "fog"},
    {"prompt": "a castle", "seed": 1, "num_inference_steps": 4, "guidance_scale": 1.0},
    {"prompt": "a lighthouse", "seed": 2, "num_inference_steps": 6, "scheduler": "dpmpp_2m"},
]


@pytest.fixture(scope="module")
def colocated_url(ray_serve, tiny_model, tmp_path_factory):
    from ray import serve

    storage = tmp_path_factory.mktemp("colocated-outputs")
    # 30 ms per step (test hook, as the split app's fixture): the burst certainly overlaps.
    args = app_args(tiny_model, str(storage), profile="colocated", debug_step_delay_s=0.03)
    url = deploy("colocated", "/colocated", args, ray_serve)
    yield url
    serve.delete("colocated")


async def _burst(url: str) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as client:
        rs = await asyncio.gather(
            *(client.post(f"{url}/v1/images/generations", json={**b, "response_format": "b64_json"}) for b in BODIES)
        )
    for r in rs:
        assert r.status_code == 200, r.text
    return [r.json() for r in rs]


def _pixels(payload: dict):
    import numpy as np

    return np.stack([decode_image(base64.b64decode(d["b64_json"])) for d in payload["data"]])


def test_colocated_app_equals_split_app_and_diffusers(colocated_url, local_app, reference):
    colocated = asyncio.run(_burst(colocated_url))
    split = asyncio.run(_burst(local_app["url"]))
    for got, other, body in zip(colocated, split, BODIES, strict=True):
        a = _pixels(got)
        assert max_level_diff(a, _pixels(other)) <= 3  # same seeds, same images as the split app
        params = parse_generation_request(body).to_params(default_size=(64, 64))
        assert max_level_diff(a, reference(params)) <= 3  # and as diffusers
        assert [d["seed"] for d in got["data"]] == [body["seed"]] * body.get("n", 1)
    # The burst shared Denoiser steps inside the one replica.
    assert max(p["timings"]["denoise_batch"] for p in colocated) >= 2


def test_colocated_app_is_one_deployment_that_names_its_stages(colocated_url):
    from ray import serve

    app = serve.status().applications["colocated"]
    assert sorted(app.deployments) == ["Ingress"]
    ready = httpx.get(f"{colocated_url}/readyz", timeout=30).json()
    assert ready["checks"] == {"TextEncoder": "ok", "Denoiser": "ok", "Decoder": "ok", "storage": "ok"}
    r = httpx.post(f"{colocated_url}/v1/images/generations", json={"prompt": "a hill", "num_inference_steps": 2})
    assert r.status_code == 200 and httpx.get(r.json()["data"][0]["url"], timeout=30).content.startswith(b"\x89PNG")
    bad = httpx.post(f"{colocated_url}/v1/images/generations", json={"prompt": "a", "n": 11}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
