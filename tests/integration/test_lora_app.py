"""LoRA adapters served on the real local Ray cluster (split app, real HTTP, moto S3 on loopback).

- parity through the served app, SD 1.x and SDXL: each case of tests/lora_helpers.CASES equals
  diffusers after load_lora_weights + set_adapters;
- one Denoiser call holds >= 4 concurrent requests with 4 different adapter sets (the stage
  timings' denoise_batch), each equal to its own reference;
- a file dropped into the repository is served without a restart; an S3 repository is fetched
  once per ETag;
- with 2 Denoiser replicas and 8 adapters, affinity routing keeps each adapter on one replica
  (the adapter-cache hit rate in the responses' timings);
- the colocated profile serves mixed adapter sets in one replica with the same images.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serve.api import parse_generation_request
from serve.imageio import decode_image
from tests.conftest import max_level_diff
from tests.integration.conftest import app_args, deploy
from tests.lora_helpers import CASES, lora_reference, write_adapters

pytestmark = pytest.mark.integration

TOLERANCE = 3
STRENGTH = {"sd": 1.0, "sdxl": 0.4}  # as tests/unit/test_lora_parity.py (why: there)
DEFAULTS = {"sd": None, "sdxl": {"guidance_scale": 5.0, "num_inference_steps": 50}}


@pytest.fixture(scope="module")
def models(tiny_model, tiny_sdxl) -> dict[str, str]:
    return {"sd": tiny_model, "sdxl": tiny_sdxl}


@pytest.fixture(scope="module")
def folders(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served-loras")
    return {fam: write_adapters(models[fam], root / fam, strength=STRENGTH[fam]) for fam in models}


@pytest.fixture(scope="module")
def apps(ray_serve, models, folders, tmp_path_factory):
    urls = {}
    for fam, model in models.items():
        args = app_args(model, str(tmp_path_factory.mktemp(f"lora-out-{fam}")), lora_repository=str(folders[fam]))
        # 50 ms per denoiser step (fault injection, 0 in production): concurrent requests of a few
        # steps certainly overlap in the Denoiser, whatever the machine's speed.
        args["debug_step_delay_s"] = 0.05
        urls[fam] = deploy(f"lora-{fam}", f"/lora-{fam}", args, ray_serve)
    yield urls
    from ray import serve

    for fam in urls:
        serve.delete(f"lora-{fam}")


@pytest.fixture(scope="module")
def references(models, folders):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return {
        "sd": lora_reference(StableDiffusionPipeline.from_pretrained(models["sd"], safety_checker=None), folders["sd"]),
        "sdxl": lora_reference(StableDiffusionXLPipeline.from_pretrained(models["sdxl"]), folders["sdxl"]),
    }


def _body(i: int, loras, **extra) -> dict[str, Any]:
    body = {
        "prompt": f"request {i}: a harbour at night",
        "seed": 500 + i,
        "num_inference_steps": 6,
        "size": "64x64",
        "response_format": "b64_json",
        "loras": [{"name": n, "scale": s} for n, s in loras],
    }
    if i % 2:
        body["negative_prompt"] = "blurry"
    body.update(extra)
    return body


def _post_all(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    def post(body):
        return httpx.post(f"{url}/v1/images/generations", json=body, timeout=300)

    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def _pixels(resp: httpx.Response) -> np.ndarray:
    return np.stack([decode_image(base64.b64decode(d["b64_json"])) for d in resp.json()["data"]])


@pytest.mark.parametrize("fam", ["sd", "sdxl"])
def test_served_cases_match_diffusers_in_one_batch(apps, references, fam):
    """Every case at once: they share Denoiser calls, and each equals its own reference."""
    bodies = [_body(i, loras) for i, loras in enumerate(CASES.values())]
    responses = _post_all(apps[fam], bodies)
    batches, diffs = [], {}
    for name, body, resp in zip(CASES, bodies, responses, strict=True):
        assert resp.status_code == 200, resp.text
        assert resp.json().get("loras", []) == body["loras"]
        batches.append(resp.json()["timings"]["denoise_batch"])
        params = parse_generation_request(body).to_params(default_size=(64, 64), defaults=DEFAULTS[fam])
        diffs[name] = max_level_diff(_pixels(resp), references[fam](params))
    assert max(diffs.values()) <= TOLERANCE, diffs
    assert max(batches) > 1, batches


def test_one_denoiser_call_holds_four_adapter_sets(apps, references):
    sets = [(("ink", 1.0),), (("oil", -0.8),), (("chalk", 1.3),), (("both", 0.7), ("ink", 0.3))]
    # 20 steps x 50 ms: each request takes >= 1 s in the Denoiser, so all four overlap there.
    bodies = [_body(10 + i, s, num_inference_steps=20) for i, s in enumerate(sets)]
    responses = _post_all(apps["sd"], bodies)
    for body, resp in zip(bodies, responses, strict=True):
        assert resp.status_code == 200, resp.text
        assert resp.json()["timings"]["denoise_batch"] >= 4, resp.json()["timings"]
        params = parse_generation_request(body).to_params(default_size=(64, 64))
        assert max_level_diff(_pixels(resp), references["sd"](params)) <= TOLERANCE, body["loras"]


def test_colocated_profile_serves_mixed_adapter_sets(ray_serve, models, folders, references, tmp_path_factory):
    """profile: colocated with an adapter repository: four adapter sets share its Denoiser's steps,
    each image equal to its own reference; the one deployment lists the adapters."""
    from ray import serve

    args = app_args(
        models["sd"],
        str(tmp_path_factory.mktemp("lora-colocated-out")),
        lora_repository=str(folders["sd"]),
        profile="colocated",
        debug_step_delay_s=0.05,  # 50 ms per step (test hook): the requests certainly overlap
    )
    url = deploy("lora-colocated", "/lora-colocated", args, ray_serve)
    sets = [(("ink", 1.0),), (("wordy", -1.0),), (), (("both", 0.7), ("oil", 0.3))]
    bodies = [_body(40 + i, s, num_inference_steps=10) for i, s in enumerate(sets)]
    try:
        assert sorted(serve.status().applications["lora-colocated"].deployments) == ["Ingress"]
        names = {d["name"] for d in httpx.get(f"{url}/v1/loras", timeout=30).json()["data"]}
        responses = _post_all(url, bodies)
    finally:
        serve.delete("lora-colocated")
    assert {"ink", "wordy", "both", "oil"} <= names
    for body, resp in zip(bodies, responses, strict=True):
        assert resp.status_code == 200, resp.text
        params = parse_generation_request(body).to_params(default_size=(64, 64))
        assert max_level_diff(_pixels(resp), references["sd"](params)) <= TOLERANCE, body["loras"]
    assert max(r.json()["timings"]["denoise_batch"] for r in responses) >= 2


def test_listing_and_a_new_file_without_restart(apps, models, folders):
    url = apps["sd"]
    names = {d["name"] for d in httpx.get(f"{url}/v1/loras", timeout=30).json()["data"]}
    assert {"ink", "oil", "wordy", "both", "chalk"} <= names and "late" not in names
    body = _body(20, (("late", 1.0),))
    assert httpx.post(f"{url}/v1/images/generations", json=body, timeout=60).status_code == 400
    from serve.lora.random import write_random_lora

    write_random_lora(folders["sd"] / "late.safetensors", models["sd"], components=("unet",), seed=99)
    import time

    deadline = time.monotonic() + 30  # the Ingress relists a missing name after 0.5 s
    while (resp := httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)).status_code == 400:
        assert time.monotonic() < deadline, resp.text
        time.sleep(0.25)
    assert resp.status_code == 200, resp.text
    assert resp.json()["loras"] == [{"name": "late", "scale": 1.0}]


def test_s3_repository_fetched_once_per_etag(ray_serve, models, folders, s3_bucket, s3_client, tmp_path_factory):
    bucket = s3_bucket.split("/")[2]
    for name in ("ink", "wordy"):
        s3_client.upload_file(str(folders["sd"] / f"{name}.safetensors"), bucket, f"loras/{name}.safetensors")
    cache = tmp_path_factory.mktemp("lora-cache")
    args = app_args(models["sd"], str(tmp_path_factory.mktemp("s3-lora-out")), lora_repository=f"s3://{bucket}/loras")
    # The stages' cache folder (DARKROOM_CACHE_DIR) for downloaded adapters, and boto3's S3 endpoint.
    import os

    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    env["DARKROOM_CACHE_DIR"] = str(cache)
    for opts in ("text_encoder", "denoiser", "ingress"):
        args[opts] = {**args[opts], "ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": env}}}
    url = deploy("lora-s3", "/lora-s3", args, ray_serve)
    from ray import serve

    try:
        for i in range(2):
            body = _body(30 + i, (("ink", 0.8), ("wordy", 1.0)), num_inference_steps=2)
            resp = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
            assert resp.status_code == 200, resp.text
        listing = {d["name"]: d for d in httpx.get(f"{url}/v1/loras", timeout=30).json()["data"]}
    finally:
        serve.delete("lora-s3")
    files = sorted(p.name for p in (cache / "loras").glob("*.safetensors"))
    # One file per adapter (the TextEncoder and the Denoiser share the folder; same ETag, same name).
    assert len(files) == 2 and {f.split("-")[0] for f in files} == {"ink", "wordy"}, files
    assert listing["wordy"]["components"] == ["text_encoder"] and listing["ink"]["compatible"]


@pytest.fixture(scope="module")
def eight(models, tmp_path_factory) -> Path:
    """Eight small denoiser adapters (attention layers, rank 4)."""
    from serve.lora.random import write_random_lora

    folder = tmp_path_factory.mktemp("eight-loras")
    for i in range(8):
        write_random_lora(folder / f"style{i}.safetensors", models["sd"], components=("unet",), seed=200 + i)
    return folder


def _routed_app(name: str, routing: str, model: str, folder: Path, port: int, tmp_path_factory) -> str:
    size = (folder / "style0.safetensors").stat().st_size
    args = app_args(
        model,
        str(tmp_path_factory.mktemp(f"out-{name}")),
        lora_repository=str(folder),
        lora_routing=routing,
        lora_cache_bytes=int(size * 5.5),  # five of the eight adapters per replica
    )
    args["denoiser"] = {**args["denoiser"], "num_replicas": 2}
    return deploy(name, f"/{name}", args, port)


def _hits_and_misses(url: str, rounds: int = 4) -> tuple[int, int]:
    hits = misses = 0
    for r in range(rounds):
        for i in range(8):  # one at a time: equal (empty) queues, so only the adapters decide
            body = {"prompt": "a field", "seed": r * 8 + i, "num_inference_steps": 2, "loras": [{"name": f"style{i}"}]}
            resp = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
            assert resp.status_code == 200, resp.text
            hits += int(resp.json()["timings"]["lora_hits"])
            misses += int(resp.json()["timings"]["lora_misses"])
    return hits, misses


def test_affinity_routing_keeps_each_adapter_on_one_replica(ray_serve, models, eight, tmp_path_factory):
    """2 Denoiser replicas, 8 adapters, room for 5 per replica: with affinity each adapter is loaded
    once (8 misses in 32 requests); Serve's plain routing sends each adapter to both replicas."""
    from ray import serve

    url = _routed_app("lora-affinity", "affinity", models["sd"], eight, ray_serve, tmp_path_factory)
    try:
        hits, misses = _hits_and_misses(url)
    finally:
        serve.delete("lora-affinity")
    assert (hits, misses) == (24, 8)
    url = _routed_app("lora-plain", "plain", models["sd"], eight, ray_serve, tmp_path_factory)
    try:
        plain_hits, plain_misses = _hits_and_misses(url)
    finally:
        serve.delete("lora-plain")
    # Random routing keeps every adapter on one replica with probability (1/8)^8: it does not.
    assert plain_misses > 8 and plain_hits < hits
