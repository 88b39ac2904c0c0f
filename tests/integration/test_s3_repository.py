"""Exported model repositories under s3://: fetched once per content, served by ONNX Runtime.

The app runs every stage on the ``onnxruntime`` backend from a repository that lives in S3
(moto's server on loopback); its images must equal diffusers' reference for each seed.
"""

from __future__ import annotations

import base64
import os
import uuid
from pathlib import Path

import httpx
import pytest

from serve.api import parse_generation_request
from serve.imageio import decode_image
from tests.conftest import max_level_diff
from tests.integration.conftest import app_args, deploy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def onnx_repo(tiny_model, tmp_path_factory) -> Path:
    from export import export_model

    return export_model(tiny_model, tmp_path_factory.mktemp("exported") / "tiny-onnx", batch="1:1:4", size="48:64:96")


@pytest.fixture(scope="module")
def s3_repo(onnx_repo, s3_server) -> dict:
    import boto3

    client = boto3.session.Session().client("s3", endpoint_url=s3_server)
    bucket = f"darkroom-models-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    for path in sorted(onnx_repo.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"models/tiny-onnx/{path.relative_to(onnx_repo)}")
    return {"uri": f"s3://{bucket}/models/tiny-onnx", "bucket": bucket, "client": client}


def test_repository_is_fetched_once_per_content(s3_repo, tmp_path, monkeypatch):
    from serve.model import read_model_info

    monkeypatch.setenv("DARKROOM_CACHE_DIR", str(tmp_path))
    info = read_model_info(s3_repo["uri"])
    assert info.name == "tiny-onnx" and (info.path / "manifest.json").is_file()
    marker = info.path / "unet" / "model.onnx"
    stamp = marker.stat().st_mtime_ns
    again = read_model_info(s3_repo["uri"])
    assert again.path == info.path and marker.stat().st_mtime_ns == stamp  # not downloaded again
    # A changed object is a new repository content: fetched into a new folder.
    key = "models/tiny-onnx/scheduler/scheduler_config.json"
    body = s3_repo["client"].get_object(Bucket=s3_repo["bucket"], Key=key)["Body"].read()
    s3_repo["client"].put_object(Bucket=s3_repo["bucket"], Key=key, Body=body + b"\n")
    changed = read_model_info(s3_repo["uri"])
    assert changed.path != info.path
    s3_repo["client"].put_object(Bucket=s3_repo["bucket"], Key=key, Body=body)


def test_missing_repository_is_a_clear_error(s3_repo, tmp_path, monkeypatch):
    from serve.errors import ModelNotFoundError
    from serve.model import read_model_info

    monkeypatch.setenv("DARKROOM_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        read_model_info(f"s3://{s3_repo['bucket']}/models/nope")
    assert err.value.field == "model"


@pytest.fixture(scope="module")
def onnx_app(ray_serve, s3_repo, tmp_path_factory):
    from ray import serve

    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    env["DARKROOM_CACHE_DIR"] = str(tmp_path_factory.mktemp("replica-cache"))
    args = app_args(s3_repo["uri"], str(tmp_path_factory.mktemp("onnx-out")), backend="onnxruntime")
    for stage in ("ingress", "text_encoder", "denoiser", "decoder"):
        args[stage]["ray_actor_options"] = {"num_cpus": 0.1, "runtime_env": {"env_vars": env}}
    url = deploy("onnx", "/onnx", args, ray_serve)
    yield url
    serve.delete("onnx")


@pytest.mark.parametrize(
    "extra",
    [
        {"scheduler": "euler_a", "negative_prompt": "blurry", "n": 2, "size": "64x48"},
        {"scheduler": "dpmpp_2m", "guidance_scale": 1.0},
        {"size": "48x64"},
    ],
)
def test_served_onnxruntime_matches_diffusers(onnx_app, reference, extra):
    body = {"prompt": "a lighthouse made of glass", "seed": 21, "num_inference_steps": 5, **extra}
    r = httpx.post(f"{onnx_app}/v1/images/generations", json={**body, "response_format": "b64_json"}, timeout=120)
    assert r.status_code == 200, r.text
    import numpy as np

    got = np.stack([decode_image(base64.b64decode(d["b64_json"])) for d in r.json()["data"]])
    want = reference(parse_generation_request(body).to_params(default_size=(64, 64)))
    assert max_level_diff(got, want) <= 3
