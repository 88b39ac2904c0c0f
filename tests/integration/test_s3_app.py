"""The served app storing results in S3: boto3 against moto's server mode on loopback."""

from __future__ import annotations

import base64
import json
import os
import uuid
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from serve.imageio import decode_image
from tests.integration.conftest import app_args, deploy

pytestmark = pytest.mark.integration

EXPIRY_S = 900


@pytest.fixture(scope="module")
def s3_app(ray_serve, tiny_model, s3_server, s3_client_module):
    from ray import serve

    bucket = f"darkroom-app-{uuid.uuid4().hex[:10]}"
    s3_client_module.create_bucket(Bucket=bucket)
    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    args = app_args(tiny_model, f"s3://{bucket}/results", url_expiry_s=EXPIRY_S)
    for stage in ("ingress", "text_encoder", "denoiser", "decoder"):
        args[stage]["ray_actor_options"] = {"num_cpus": 0.1, "runtime_env": {"env_vars": env}}
    url = deploy("s3", "/s3", args, ray_serve)
    yield {"url": url, "bucket": bucket}
    serve.delete("s3")


@pytest.fixture(scope="module")
def s3_client_module(s3_server):
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=s3_server)


def test_url_is_presigned_sigv4_and_serves_the_image(s3_app, s3_client_module):
    body = {"prompt": "a harbour at noon", "seed": 11, "num_inference_steps": 3, "n": 2}
    r = httpx.post(f"{s3_app['url']}/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    for item in r.json()["data"]:
        url = item["url"]
        query = parse_qs(urlparse(url).query)
        assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
        assert query["X-Amz-Expires"] == [str(EXPIRY_S)]
        fetched = httpx.get(url, timeout=30)
        assert fetched.status_code == 200
        assert decode_image(fetched.content).shape == (64, 64, 3)
        # Both objects exist in the bucket: the image and its metadata JSON.
        key = urlparse(url).path.split(f"/{s3_app['bucket']}/", 1)[1]
        assert key.startswith("results/images/")
        head = s3_client_module.head_object(Bucket=s3_app["bucket"], Key=key)
        assert head["ContentType"] == "image/png"
        meta_key = key.rsplit(".", 1)[0] + ".json"
        meta = json.loads(s3_client_module.get_object(Bucket=s3_app["bucket"], Key=meta_key)["Body"].read())
        for field in (
            "prompt",
            "negative_prompt",
            "seed",
            "num_inference_steps",
            "guidance_scale",
            "scheduler",
            "size",
            "model",
            "timings_ms",
        ):
            assert field in meta, field
        assert meta["seed"] == 11 and meta["size"] == "64x64" and meta["model"] == "tiny"


def test_b64_json_is_stored_too(s3_app, s3_client_module):
    body = {"prompt": "inline", "seed": 3, "num_inference_steps": 2, "response_format": "b64_json"}
    r = httpx.post(f"{s3_app['url']}/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    inline = base64.b64decode(r.json()["data"][0]["b64_json"])
    listed = s3_client_module.list_objects_v2(Bucket=s3_app["bucket"], Prefix="results/images/")["Contents"]
    bodies = [s3_client_module.get_object(Bucket=s3_app["bucket"], Key=o["Key"])["Body"].read() for o in listed]
    assert inline in bodies


def test_jobs_live_in_the_store(s3_app, s3_client_module):
    r = httpx.post(f"{s3_app['url']}/v1/images/jobs", json={"prompt": "a job", "num_inference_steps": 2}, timeout=30)
    assert r.status_code == 202
    job_id = r.json()["id"]
    obj = s3_client_module.get_object(Bucket=s3_app["bucket"], Key=f"results/jobs/{job_id}.json")
    assert json.loads(obj["Body"].read())["id"] == job_id
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = httpx.get(f"{s3_app['url']}/v1/images/jobs/{job_id}", timeout=30).json()
        if state["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert state["status"] == "succeeded"
    assert httpx.get(state["result"]["data"][0]["url"], timeout=30).status_code == 200


def test_files_route_is_404_with_object_storage(s3_app):
    r = httpx.get(f"{s3_app['url']}/v1/files/images/x.png", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
