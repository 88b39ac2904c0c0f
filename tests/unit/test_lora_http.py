"""LoRA over the HTTP API without Ray: routes over the in-process LocalStages (TestClient).

Requests choose adapters by name and scale, get diffusers' image, and see them recorded in the
response, the stored metadata and job records; bad choices are 400s naming the item; a file
dropped into the repository is served without a restart; a full adapter cache evicts and serves.
"""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve.api import Limits, parse_generation_request
from serve.api.http import create_app
from serve.api.local_stages import LocalStages
from serve.api.service import ImageService, ServiceConfig
from serve.families import family_of
from serve.imageio import decode_image
from serve.lora import LoraCatalog, LoraRepository
from serve.model import read_model_info
from serve.pipeline import Pipeline
from serve.storage import open_store
from tests.conftest import max_level_diff
from tests.lora_helpers import lora_reference, write_adapters

TOLERANCE = 3
NAMES = ("ink", "oil", "wordy")


@pytest.fixture(scope="module")
def folder(tiny_model, tiny_sdxl, tmp_path_factory):
    root = write_adapters(tiny_model, tmp_path_factory.mktemp("http-loras"), names=NAMES)
    # An SDXL adapter in the same repository: listed, but refused for this SD model.
    write_adapters(tiny_sdxl, root / "xl", names=("ink",))
    (root / "xl" / "ink.safetensors").rename(root / "xl-ink.safetensors")
    return root


@pytest.fixture(scope="module")
def reference_loras(tiny_model, folder):
    from diffusers import StableDiffusionPipeline

    return lora_reference(StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None), folder, NAMES)


def _service(tiny_model, folder, store, *, cache_bytes=None, backend="torch"):
    info = read_model_info(tiny_model)
    # miss_ttl_s=0: a name the listing lacks relists at once (no waiting on the clock in tests).
    stage_repo = LoraRepository(str(folder), miss_ttl_s=0.0)
    pipe = Pipeline.load(tiny_model, device="cpu", loras=stage_repo, lora_cache_bytes=cache_bytes)
    catalog = LoraCatalog(LoraRepository(str(folder), miss_ttl_s=0.0), family_of(info))
    config = ServiceConfig(model_name="tiny", limits=Limits(max_steps=20), backend=backend)
    return ImageService(config, info, LocalStages(pipe, store), store, loras=catalog), pipe


@pytest.fixture(scope="module")
def env(tiny_model, folder, tmp_path_factory):
    store = open_store(str(tmp_path_factory.mktemp("http-lora-store")))
    service, pipe = _service(tiny_model, folder, store)
    with TestClient(create_app(service)) as c:
        yield c, store, pipe


def _pixels(response) -> np.ndarray:
    return np.stack([decode_image(base64.b64decode(d["b64_json"])) for d in response.json()["data"]])


def test_generation_with_loras_matches_diffusers_and_is_recorded(env, reference_loras):
    client, store, _ = env
    body = {
        "prompt": "a small boat",
        "seed": 4,
        "num_inference_steps": 4,
        "negative_prompt": "fog",
        "loras": [{"name": "oil", "scale": 0.9}, {"name": "wordy", "scale": -1.0}],
    }
    r = client.post("/v1/images/generations", json={**body, "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    want = reference_loras(parse_generation_request(body).to_params(default_size=(64, 64)))
    assert max_level_diff(_pixels(r), want) <= TOLERANCE
    assert r.json()["loras"] == body["loras"]
    url = client.post("/v1/images/generations", json=body).json()["data"][0]["url"]
    meta = store.get_json(url.split("/v1/files/")[1].rsplit(".", 1)[0] + ".json")
    assert meta["loras"] == body["loras"]
    plain = client.post("/v1/images/generations", json={"prompt": "x", "num_inference_steps": 2}).json()
    assert "loras" not in plain  # unchanged for requests without adapters


def test_a_streamed_request_with_loras_ends_with_its_diffusers_image(env, reference_loras):
    """stream: true carries the adapters to both stages (encode and the Denoiser's stream); an
    unknown adapter is a 400 before the stream starts."""
    from tests.sse import parse_events

    client, _, _ = env
    body = {"prompt": "a small boat", "seed": 5, "num_inference_steps": 4, "loras": [{"name": "wordy", "scale": 0.7}]}
    body["loras"].append({"name": "ink", "scale": 1.0})
    with client.stream("POST", "/v1/images/generations", json={**body, "stream": True, "partial_images": 1}) as r:
        assert r.status_code == 200
        events = list(parse_events(r.iter_lines()))
    completed = [p for name, p in events if name == "image_generation.completed"]
    assert len(completed) == 1, events
    got = decode_image(base64.b64decode(completed[0]["b64_json"]))[None]
    assert max_level_diff(got, reference_loras(parse_generation_request(body).to_params(default_size=(64, 64)))) <= 3
    bad = {**body, "stream": True, "loras": [{"name": "nosuch", "scale": 1.0}]}
    r = client.post("/v1/images/generations", json=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "loras[0].name"


def test_loras_listing(env):
    client, _, _ = env
    data = {d["name"]: d for d in client.get("/v1/loras").json()["data"]}
    assert set(data) == {*NAMES, "xl-ink"}
    assert data["ink"] == {
        "name": "ink",
        "object": "lora",
        "family": "sd",
        "components": ["unet"],
        "size_bytes": data["ink"]["size_bytes"],
        "compatible": True,
    }
    assert data["ink"]["size_bytes"] > 1000
    assert data["wordy"]["components"] == ["text_encoder"]
    assert data["xl-ink"]["family"] == "sdxl" and not data["xl-ink"]["compatible"]


@pytest.mark.parametrize(
    "loras, param, words",
    [
        ([{"name": "nosuch"}], "loras[0].name", "no adapter of that name"),
        ([{"name": "ink"}, {"name": "xl-ink"}], "loras[1].name", "is a sdxl adapter"),
        ([{"name": "ink", "scale": 4.5}], "loras[0].scale", "at most 4"),
        ([{"name": "ink"}] * 5, "loras", "at most 4 items"),
        ([{"name": "a/b"}], "loras[0].name", "letters, digits"),
    ],
)
def test_bad_choices_are_400s_naming_the_item(env, loras, param, words):
    client, _, _ = env
    r = client.post("/v1/images/generations", json={"prompt": "x", "num_inference_steps": 2, "loras": loras})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"]


def test_jobs_record_their_loras(env):
    client, _, _ = env
    loras = [{"name": "ink", "scale": 0.5}]
    job = client.post("/v1/images/jobs", json={"prompt": "a hill", "num_inference_steps": 2, "loras": loras}).json()
    assert job["loras"] == loras
    deadline = time.monotonic() + 120
    while (state := client.get(f"/v1/images/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert state["status"] == "succeeded" and state["result"]["loras"] == loras


def test_a_new_adapter_file_is_served_without_a_restart(env, tiny_model, folder, reference_loras):
    client, _, pipe = env
    body = {"prompt": "a lake", "seed": 9, "num_inference_steps": 3, "loras": [{"name": "fresh", "scale": 1.0}]}
    assert client.post("/v1/images/generations", json=body).status_code == 400
    from serve.lora.random import write_random_lora

    write_random_lora(folder / "fresh.safetensors", tiny_model, components=("unet",), seed=77)
    r = client.post("/v1/images/generations", json={**body, "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    from diffusers import StableDiffusionPipeline

    ref = lora_reference(StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None), folder, ("fresh",))
    assert max_level_diff(_pixels(r), ref(parse_generation_request(body).to_params(default_size=(64, 64)))) <= 3
    assert "fresh" in pipe.denoiser.lora.held()


def test_a_full_adapter_cache_evicts_and_keeps_serving(tiny_model, folder, reference_loras, tmp_path):
    size = LoraRepository(str(folder)).entry("ink").size
    # Room for one denoiser adapter at a time (the file's size is about its weights' bytes).
    service, pipe = _service(tiny_model, folder, open_store(str(tmp_path)), cache_bytes=int(size * 1.5))
    with TestClient(create_app(service)) as client:
        for name in ("ink", "oil", "ink"):
            body = {"prompt": "a cat", "seed": 3, "num_inference_steps": 3, "loras": [{"name": name, "scale": 1.0}]}
            r = client.post("/v1/images/generations", json={**body, "response_format": "b64_json"})
            assert r.status_code == 200, r.text
            want = reference_loras(parse_generation_request(body).to_params(default_size=(64, 64)))
            assert max_level_diff(_pixels(r), want) <= TOLERANCE
    stats = pipe.denoiser.lora.stats()
    assert stats["lora_cache_evictions"] >= 2 and stats["lora_cache_misses"] == 3
    assert stats["lora_cache_bytes"] <= size * 1.5


def test_onnx_deployments_refuse_loras_by_name(tiny_model, folder, tmp_path):
    service, _ = _service(tiny_model, folder, open_store(str(tmp_path)), backend="onnxruntime")
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/images/generations", json={"prompt": "x", "loras": [{"name": "ink"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "loras"
    assert "torch backend" in r.json()["error"]["message"]


def test_without_a_repository_loras_are_refused(tiny_model, tmp_path):
    store = open_store(str(tmp_path))
    info = read_model_info(tiny_model)
    service = ImageService(ServiceConfig(model_name="tiny"), info, LocalStages(Pipeline.load(tiny_model), store), store)
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/images/generations", json={"prompt": "x", "loras": [{"name": "ink"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "loras"
        assert client.get("/v1/loras").json() == {"object": "list", "data": []}
