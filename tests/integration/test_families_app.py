"""SDXL and Flux served on the real local Ray cluster, each started from deployments/configs/families.yaml.

Per family: one app from the config (its deployment options as written, the session's tiny model
of that family as ``model``), a burst of concurrent mixed requests that the Denoiser batches
together (batch sizes > 1 in the stage timings), every image equal to diffusers' own pipeline
class for its seed, and ``/v1/models`` naming the family. (SD 1.x: test_api.py and others.)
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from serve.api import parse_generation_request
from serve.imageio import decode_image
from tests.conftest import max_level_diff
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[2] / "deployments" / "configs" / "families.yaml"
DEFAULTS = {"sdxl": {"guidance_scale": 5.0, "num_inference_steps": 50}, "flux": {"guidance_scale": 3.5}}


def config_args(name: str) -> dict[str, Any]:
    (app,) = [a for a in yaml.safe_load(CONFIG.read_text())["applications"] if a["name"] == name]
    return dict(app["args"])


@pytest.fixture(scope="module")
def apps(ray_serve, tiny_sdxl, tiny_flux, tmp_path_factory) -> dict[str, str]:
    urls = {}
    for family, model in (("sdxl", tiny_sdxl), ("flux", tiny_flux)):
        args = {**config_args(family), "model": model, "storage": str(tmp_path_factory.mktemp(f"out-{family}"))}
        # 30 ms per denoiser step (fault injection, 0 in production): the burst's requests certainly
        # overlap in the Denoiser, so the batching assertion does not depend on the machine's speed.
        args.update(request_timeout_s=120, stage_timeout_s=120, debug_step_delay_s=0.03)
        urls[family] = deploy(f"family-{family}", f"/{family}", args, ray_serve)
    return urls


def bodies(family: str) -> list[dict[str, Any]]:
    """Eight different requests: steps, seeds, n, sizes, guidance (and schedulers, negatives or
    Flux's true CFG), all of which may share one denoiser call."""
    out = []
    schedulers = ["euler", "euler_a", "dpmpp_2m", "ddim", "unipc", "lms", "pndm", "heun"]
    for i in range(8):
        body: dict[str, Any] = {
            "prompt": f"request {i}: a castle on an island",
            "seed": 100 + i,
            "num_inference_steps": 8 + i % 3,
            "n": 1 + i % 2,
            "size": "64x64" if i % 3 else "64x48",
            "response_format": "b64_json",
        }
        if family == "sdxl":
            body.update(scheduler=schedulers[i], guidance_scale=1.0 if i == 0 else 3.0 + i)
            if i % 2:
                body["negative_prompt"] = "blurry"
        else:
            body["guidance_scale"] = 2.0 + i
            if i == 5:
                body.update(negative_prompt="blurry", true_cfg_scale=3.0)
        out.append(body)
    return out


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_models_names_the_family(apps, family):
    data = httpx.get(f"{apps[family]}/v1/models", timeout=30).json()["data"][0]
    assert data["family"] == family and data["id"] == f"tiny-{family}"


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_mixed_concurrent_batch_matches_diffusers(request, apps, family):
    reference = request.getfixturevalue(f"reference_{family}")
    url = apps[family]
    reqs = bodies(family)

    def post(body):
        return httpx.post(f"{url}/v1/images/generations", json=body, timeout=180)

    with cf.ThreadPoolExecutor(len(reqs)) as pool:
        responses = list(pool.map(post, reqs))
    batches = []
    for body, resp in zip(reqs, responses, strict=True):
        assert resp.status_code == 200, resp.text
        out = resp.json()
        batches.append(out["timings"]["denoise_batch"])
        got = np.stack([decode_image(base64.b64decode(d["b64_json"])) for d in out["data"]])
        params = parse_generation_request(body).to_params(default_size=(64, 64), defaults=DEFAULTS[family])
        kwargs = {}
        if family == "flux" and params.negative_prompt:
            kwargs = {"negative_prompt": params.negative_prompt, "true_cfg_scale": params.true_cfg_scale}
        assert max_level_diff(got, reference(params, **kwargs)) <= 3, body
    # Requests of different steps, seeds, sizes and guidance shared denoiser steps.
    assert max(batches) > 1, batches


def test_family_limits_are_400s_naming_the_field(apps):
    cases = [
        ({"prompt": "x", "size": "56x56"}, "size"),
        ({"prompt": "x", "scheduler": "euler_a"}, "scheduler"),
        ({"prompt": "x", "negative_prompt": "blurry"}, "negative_prompt"),
    ]
    for body, field in cases:
        resp = httpx.post(f"{apps['flux']}/v1/images/generations", json=body, timeout=30)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == field, resp.text
    resp = httpx.post(f"{apps['sdxl']}/v1/images/generations", json={"prompt": "x", "true_cfg_scale": 2.0}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "true_cfg_scale"


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_monolith_runs_the_familys_own_diffusers_pipeline(request, ray_serve, family, tmp_path):
    """The baseline app runs StableDiffusionXLPipeline / FluxPipeline per request: its images are
    diffusers' own, so they equal the reference (and the split app's) for the seed."""
    from ray import serve

    from deployments.monolith import build_monolith_app
    from tests.integration.conftest import app_args

    model = request.getfixturevalue(f"tiny_{family}")
    reference = request.getfixturevalue(f"reference_{family}")
    name, prefix = f"mono-{family}", f"/mono-{family}"
    serve.run(build_monolith_app(app_args(model, str(tmp_path))), name=name, route_prefix=prefix, blocking=False)
    try:
        url = f"http://127.0.0.1:{ray_serve}{prefix}"
        body = {"prompt": "a lighthouse", "seed": 21, "num_inference_steps": 4, "size": "64x48", "n": 2}
        body.update(response_format="b64_json", guidance_scale=3.0)
        resp = None
        for _ in range(240):  # bounded wait for the replica (the model loads in its constructor)
            try:
                resp = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
                if resp.status_code != 404 and resp.status_code != 503:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert resp is not None and resp.status_code == 200, resp.text if resp else None
        got = np.stack([decode_image(base64.b64decode(d["b64_json"])) for d in resp.json()["data"]])
        params = parse_generation_request(body).to_params(default_size=(64, 64), defaults=DEFAULTS[family])
        assert max_level_diff(got, reference(params)) <= 3
    finally:
        serve.delete(name)
