"""The served app end to end: real local Ray Serve, real HTTP, the official openai client."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import time

import httpx
import numpy as np
import pytest

from serve.api import parse_generation_request
from serve.imageio import decode_image
from tests.conftest import max_level_diff
from tests.openai_spec import errors as spec_errors

pytestmark = pytest.mark.integration


def params_of(body: dict):
    return parse_generation_request(body).to_params(default_size=(64, 64))


@pytest.fixture(scope="module")
def url(local_app) -> str:
    return local_app["url"]


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def test_health_ready_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"TextEncoder": "ok", "Denoiser": "ok", "Decoder": "ok", "storage": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"


def test_openai_client_b64_json_matches_diffusers(url, reference):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    extra = {"seed": 31, "num_inference_steps": 6, "negative_prompt": "blurry", "scheduler": "euler_a"}
    resp = oc.images.generate(
        model="tiny",
        prompt="a lighthouse at dusk",
        n=2,
        size="64x48",
        response_format="b64_json",
        extra_body=extra,
    )
    assert len(resp.data) == 2
    got = np.stack([decode_image(base64.b64decode(d.b64_json)) for d in resp.data])
    want = reference(params_of({"prompt": "a lighthouse at dusk", "n": 2, "size": "64x48", **extra}))
    assert max_level_diff(got, want) <= 3
    assert all(d.model_extra["seed"] == 31 for d in resp.data)
    assert resp.model_extra["timings"]["denoise"] > 0


def test_openai_client_url_matches_diffusers(url, reference, local_app):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    extra = {"seed": 5, "num_inference_steps": 5, "guidance_scale": 1.0}
    resp = oc.images.generate(prompt="a red fox", response_format="url", extra_body=extra)
    image_url = resp.data[0].url
    assert image_url.startswith(f"{url}/v1/files/images/")
    fetched = httpx.get(image_url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    want = reference(params_of({"prompt": "a red fox", **extra}))
    assert max_level_diff(decode_image(fetched.content)[None], want) <= 3
    # The image is stored with its metadata beside it.
    key = image_url.split("/v1/files/", 1)[1]
    meta = httpx.get(f"{url}/v1/files/{key.rsplit('.', 1)[0]}.json", timeout=30).json()
    assert meta["seed"] == 5 and meta["prompt"] == "a red fox" and meta["num_inference_steps"] == 5
    assert (local_app["storage"] / key).is_file()


def test_response_shape_seed_and_server_timing(client):
    r = client.post("/v1/images/generations", json={"prompt": "a cat", "num_inference_steps": 2})
    assert r.status_code == 200
    body = r.json()
    seed = body["data"][0]["seed"]
    assert 0 <= seed < 2**32 and isinstance(body["created"], int)
    for stage in ("encode", "denoise", "decode", "storage"):
        assert body["timings"][stage] >= 0
        assert f"{stage};dur=" in r.headers["server-timing"]
    again = client.post("/v1/images/generations", json={"prompt": "a cat", "num_inference_steps": 2, "seed": seed})
    a = httpx.get(body["data"][0]["url"]).content
    b = httpx.get(again.json()["data"][0]["url"]).content
    assert max_level_diff(decode_image(a), decode_image(b)) <= 3


def test_concurrent_requests_are_batched_and_never_mixed(client, reference):
    schedulers = ["ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "unipc", "lms", "heun", None, "euler"]
    bodies = [
        {
            "prompt": f"request {i}: a castle by the sea",
            "seed": 500 + i,
            "num_inference_steps": 4 + i % 3,
            "guidance_scale": 1.0 if i % 4 == 0 else 6.0,
            "negative_prompt": "ugly" if i % 2 else None,
            "scheduler": schedulers[i],
            "size": "64x64" if i % 5 else "48x64",
            "response_format": "b64_json",
        }
        for i in range(10)
    ]

    def send(body):
        return client.post("/v1/images/generations", json={k: v for k, v in body.items() if v is not None})

    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(send, bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    timings = [r.json()["timings"] for r in responses]
    assert max(t["denoise_batch"] for t in timings) > 1, timings
    assert max(t["encode_batch"] for t in timings) > 1, timings
    for body, r in zip(bodies, responses, strict=True):
        got = decode_image(base64.b64decode(r.json()["data"][0]["b64_json"]))
        want = reference(params_of({k: v for k, v in body.items() if v is not None and k != "response_format"}))
        assert r.json()["data"][0]["seed"] == body["seed"]
        assert max_level_diff(got[None], want) <= 3, body


def test_job_lifecycle(client, reference):
    body = {"prompt": "a tower at night", "seed": 77, "num_inference_steps": 4, "response_format": "b64_json"}
    r = client.post("/v1/images/jobs", json=body)
    assert r.status_code == 202
    job = r.json()
    assert job["status"] in ("queued", "running") and r.headers["location"] == f"/v1/images/jobs/{job['id']}"
    deadline = time.monotonic() + 120
    seen = set()
    while time.monotonic() < deadline:
        state = client.get(f"/v1/images/jobs/{job['id']}").json()
        seen.add(state["status"])
        if state["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert state["status"] == "succeeded", state
    got = decode_image(base64.b64decode(state["result"]["data"][0]["b64_json"]))
    want = reference(params_of({k: v for k, v in body.items() if k != "response_format"}))
    assert max_level_diff(got[None], want) <= 3
    missing = client.get("/v1/images/jobs/0123456789abcdef")
    assert missing.status_code == 404 and "error" in missing.json()
    assert client.get("/v1/images/jobs/..%2F..%2Fetc").status_code == 404


BAD = [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "n": 11}, "n"),
    ({"prompt": "a", "style": "vivid"}, "style"),
    ({"prompt": "a", "background": "transparent"}, "background"),
    ({"prompt": "a", "n": "2"}, "n"),
    ({"prompt": "a", "size": "100x100"}, "size"),
    ({"prompt": "a", "size": "4096x4096"}, "size"),
    ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "a", "num_inference_steps": 151}, "num_inference_steps"),
    ({"prompt": "a", "guidance_scale": 31}, "guidance_scale"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "seed": 2**32}, "seed"),
    ({"prompt": "a", "scheduler": "turbo"}, "scheduler"),
    ({"prompt": "a", "response_format": "xml"}, "response_format"),
    ({"prompt": "a", "output_format": "gif"}, "output_format"),
    ({"prompt": "a", "model": "dall-e-3"}, "model"),
    ({"prompt": "a", "bogus": 1}, "bogus"),
    ({"prompt": "a" * 5000}, "prompt"),
]


@pytest.mark.parametrize("body, field", BAD)
@pytest.mark.parametrize("route", ["/v1/images/generations", "/v1/images/jobs"])
def test_bad_inputs_get_openai_shaped_4xx(client, body, field, route):
    if isinstance(body, bytes):
        r = client.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(route, json=body)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_server_keeps_serving_after_bad_inputs(client):
    for body, _ in BAD:
        if isinstance(body, bytes):
            client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
        else:
            client.post("/v1/images/generations", json=body)
    r = client.post("/v1/images/generations", json={"prompt": "still alive", "num_inference_steps": 2})
    assert r.status_code == 200
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v1/files/../../etc/passwd",
        "/v1/files/%2e%2e/%2e%2e/etc/passwd",
        "/v1/files/images/nope.png",
        "/nope",
    ],
)
def test_unknown_paths_and_traversal_are_404(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert "error" in r.json()


def test_live_responses_match_openais_schemas(client):
    """The Ray app's answers against OpenAI's published schemas (the in-process app is checked
    field by field in tests/unit/test_openai_conformance.py)."""
    for response_format in ("url", "b64_json"):
        body = {
            "prompt": "a lighthouse",
            "n": 3,
            "seed": 9,
            "num_inference_steps": 2,
            "response_format": response_format,
        }
        assert spec_errors("CreateImageRequest", body) == []
        r = client.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        assert spec_errors("ImagesResponse", r.json()) == []
        assert [(d["seed"], d["index"]) for d in r.json()["data"]] == [(9, 0), (9, 1), (9, 2)]
        assert all(None not in d.values() for d in r.json()["data"])
    assert spec_errors("ListModelsResponse", client.get("/v1/models").json()) == []
    bad = client.post("/v1/images/generations", json={"prompt": "a", "size": "100x100"})
    assert bad.status_code == 400 and spec_errors("ErrorResponse", bad.json()) == []
    wrong = client.put("/v1/images/generations", json={"prompt": "a"})
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert spec_errors("ErrorResponse", wrong.json()) == []
