"""The HTTP layer without Ray: FastAPI routes over the in-process LocalStages, via TestClient."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve.api import Limits, parse_generation_request
from serve.api.http import create_app
from serve.api.local_stages import LocalStages
from serve.api.policy import PromptPolicy
from serve.api.service import ImageService, ServiceConfig
from serve.imageio import decode_image
from serve.model import read_model_info
from serve.pipeline import Pipeline
from serve.storage import open_store
from tests.conftest import max_level_diff


@pytest.fixture(scope="module")
def client(tiny_model, tmp_path_factory):
    store = open_store(str(tmp_path_factory.mktemp("http-local")))
    config = ServiceConfig(
        model_name="tiny",
        limits=Limits(max_steps=20),
        api_keys=("k",),
        max_body_bytes=2048,
        prompt_policy=PromptPolicy(blocklist=("forbidden",)),
    )
    stages = LocalStages(Pipeline.load(tiny_model, device="cpu"), store)
    service = ImageService(config, read_model_info(tiny_model), stages, store)
    with TestClient(create_app(service), headers={"Authorization": "Bearer k"}) as c:
        yield c


def test_generation_matches_diffusers(client, reference):
    body = {"prompt": "a small boat", "seed": 4, "num_inference_steps": 4, "n": 2, "size": "48x64"}
    r = client.post("/v1/images/generations", json={**body, "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    got = np.stack([decode_image(base64.b64decode(d["b64_json"])) for d in r.json()["data"]])
    want = reference(parse_generation_request(body).to_params(default_size=(64, 64)))
    assert max_level_diff(got, want) <= 3
    assert "denoise;dur=" in r.headers["server-timing"]


def test_url_served_from_files_route(client):
    r = client.post("/v1/images/generations", json={"prompt": "a hill", "num_inference_steps": 2})
    url = r.json()["data"][0]["url"]
    assert url.startswith("http://testserver/v1/files/images/")
    assert client.get(url).content.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "x", "num_inference_steps": 21}, 400, "num_inference_steps"),
        ({"prompt": "a forbidden garden"}, 400, "prompt"),
        ({"prompt": "x" * 3000}, 413, None),
        ({"prompt": "x", "model": "other"}, 404, "model"),
    ],
)
def test_errors_in_openai_shape(client, body, status, param):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == status
    assert r.json()["error"]["param"] == param


def test_auth_and_open_probes(client):
    r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200
    assert client.get("/readyz").json()["status"] == "ready"


def test_idempotency_and_jobs(client):
    body = {"prompt": "same", "num_inference_steps": 2}
    a = client.post("/v1/images/generations", json=body, headers={"Idempotency-Key": "abc"})
    b = client.post("/v1/images/generations", json=body, headers={"Idempotency-Key": "abc"})
    assert a.json()["data"] == b.json()["data"]
    job = client.post("/v1/images/jobs", json=body).json()
    deadline = time.monotonic() + 60
    while (state := client.get(f"/v1/images/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert state["status"] == "succeeded" and state["result"]["data"][0]["url"]
