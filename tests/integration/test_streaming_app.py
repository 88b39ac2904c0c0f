"""Streaming, progress and cancellation on the served Ray apps (split and monolith): the official
openai client streams partial images and the diffusers image; a client that disconnects, or a
job that is cancelled, frees its Denoiser slot within one step (the Denoiser's own counters,
read through its handle, show it). Slow on purpose: ``debug_step_delay_s`` (0 in production)."""

from __future__ import annotations

import base64
import socket
import time

import httpx
import numpy as np
import pytest

from serve.api import parse_generation_request
from serve.imageio import decode_image
from tests.conftest import max_level_diff
from tests.integration.conftest import app_args, deploy
from tests.openai_spec import errors
from tests.sse import parse_events

pytestmark = pytest.mark.integration

STEP_S = 1.0  # per UNet step in the slow apps: far longer than any cancel takes to travel


def wait_for(predicate, timeout_s: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def test_openai_client_streams_partial_images_and_the_diffusers_image(local_app, reference):
    openai = pytest.importorskip("openai")
    url = local_app["url"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    extra = {"seed": 41, "num_inference_steps": 6, "scheduler": "euler", "negative_prompt": "fog"}
    stream = client.images.generate(
        model="tiny", prompt="a harbour at night", n=2, size="64x48", stream=True, partial_images=2, extra_body=extra
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2
    for event in events:
        name = "ImageGenPartialImageEvent" if event.type.endswith("partial_image") else "ImageGenCompletedEvent"
        assert errors(name, event.model_dump(exclude_none=True)) == []
        assert event.model_extra["seed"] == 41
    assert [e.model_extra["image_index"] for e in events] == [0, 1, 0, 1, 0, 1]
    got = np.stack([decode_image(base64.b64decode(e.b64_json)) for e in events[-2:]])
    body = {"prompt": "a harbour at night", "n": 2, "size": "64x48", **extra}
    assert max_level_diff(got, reference(parse_generation_request(body).to_params(default_size=(64, 64)))) <= 3


def test_job_events_over_ray(local_app):
    url = local_app["url"]
    body = {"prompt": "a windmill", "num_inference_steps": 6, "partial_images": 2, "seed": 3}
    job = httpx.post(f"{url}/v1/images/jobs", json=body, timeout=60).json()
    with httpx.stream("GET", f"{url}/v1/images/jobs/{job['id']}/events", timeout=120) as r:
        assert r.status_code == 200
        events = list(parse_events(r.iter_lines()))
    assert events[-1][0] == "job.status" and events[-1][1]["status"] == "succeeded"
    assert [n for n, _ in events].count("image_generation.completed") == 1
    for name, payload in events:
        if name.startswith("image_generation."):
            assert errors("ImageGenStreamEvent", payload) == []
    done = httpx.get(f"{url}/v1/images/jobs/{job['id']}", timeout=30).json()
    assert done["status"] == "succeeded" and done["progress"] == {"step": 6, "total_steps": 6}


# --- a slow app: cancellation is counted in the Denoiser's steps ---------------------------------


@pytest.fixture(scope="module")
def slow(ray_serve, tiny_model, tmp_path_factory):
    from ray import serve

    args = app_args(tiny_model, str(tmp_path_factory.mktemp("slow")), debug_step_delay_s=STEP_S)
    url = deploy("slow", "/slow", args, ray_serve)
    denoiser = serve.get_deployment_handle("Denoiser", app_name="slow")
    yield {"url": url, "stats": lambda: denoiser.stats.remote().result(timeout_s=30)}
    serve.delete("slow")


def test_a_client_leaving_a_stream_frees_its_slot_within_one_step(slow):
    stats = slow["stats"]
    before = stats()["steps"]
    # 8 PNDM steps are 9 scheduler iterations; 3 partial images come after iterations 2, 5, 7.
    body = {"prompt": "leaves early", "num_inference_steps": 8, "stream": True, "partial_images": 3}
    with httpx.Client(timeout=120) as http, http.stream("POST", f"{slow['url']}/v1/images/generations", json=body) as r:
        for name, _ in parse_events(r.iter_lines()):
            if name == "image_generation.partial_image":
                break  # the first partial image: 2 steps done; closing the stream disconnects
    assert stats()["in_flight"] == 1  # still in the batch right after the partial image
    after = wait_for(lambda: (s := stats())["in_flight"] == 0 and s, 60, "the slot to free")
    # The step running when the client left finishes; no other starts for it.
    assert after["steps"] - before <= 2 + 1, after
    assert after["max_cancel_lag_steps"] <= 1


def test_a_client_leaving_a_plain_request_frees_its_slot_within_one_step(slow):
    stats = slow["stats"]
    start = stats()["steps"]
    host, port = httpx.URL(slow["url"]).host, httpx.URL(slow["url"]).port
    body = b'{"prompt": "plain, then gone", "num_inference_steps": 100}'
    sock = socket.create_connection((host, port), timeout=30)
    try:
        sock.sendall(
            b"POST /slow/v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        left_at = wait_for(lambda: (s := stats())["steps"] >= start + 1 and s["steps"], 60, "denoising")
    finally:
        sock.close()
    after = wait_for(lambda: (s := stats())["in_flight"] == 0 and s, 60, "the slot to free")
    assert after["steps"] <= left_at + 1, (left_at, after)


def test_a_cancelled_job_ends_cancelled_and_frees_its_slot(slow):
    stats, url = slow["stats"], slow["url"]
    job = httpx.post(f"{url}/v1/images/jobs", json={"prompt": "cancel me", "num_inference_steps": 100}).json()
    wait_for(lambda: httpx.get(f"{url}/v1/images/jobs/{job['id']}").json()["status"] == "running", 60, "running")
    at_cancel = stats()["steps"]
    r = httpx.delete(f"{url}/v1/images/jobs/{job['id']}", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    after = wait_for(lambda: (s := stats())["in_flight"] == 0 and s, 60, "the slot to free")
    assert after["steps"] <= at_cancel + 1
    assert httpx.get(f"{url}/v1/images/jobs/{job['id']}").json()["status"] == "cancelled"


# --- the monolith: one diffusers pipeline, stopped between steps by its step callback -----------


@pytest.fixture(scope="module")
def mono(ray_serve, tiny_model, tmp_path_factory):
    from ray import serve

    from deployments.monolith import build_monolith_app

    args = app_args(tiny_model, str(tmp_path_factory.mktemp("mono-stream")), debug_step_delay_s=STEP_S)
    serve.run(build_monolith_app(args), name="mono-stream", route_prefix="/mono-stream", blocking=False)
    url = f"http://127.0.0.1:{ray_serve}/mono-stream"
    wait_for(lambda: _ready(url), 180, "the monolith")
    yield url
    serve.delete("mono-stream")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_monolith_streams_and_cancels_between_steps(mono, reference):
    body = {"prompt": "a mill", "num_inference_steps": 3, "seed": 8, "stream": True, "partial_images": 1}
    with httpx.stream("POST", f"{mono}/v1/images/generations", json=body, timeout=120) as r:
        events = list(parse_events(r.iter_lines()))
    assert [n for n, _ in events] == ["image_generation.partial_image", "image_generation.completed"]
    got = decode_image(base64.b64decode(events[-1][1]["b64_json"]))[None]
    plain = {k: v for k, v in body.items() if k not in ("stream", "partial_images")}
    assert max_level_diff(got, reference(parse_generation_request(plain).to_params(default_size=(64, 64)))) <= 3
    # A 100-step job (>= 100 s at STEP_S) cancelled while it runs: the one pipeline thread is free
    # again after the step in progress, so a 1-step request is served well within its 60 s.
    job = httpx.post(f"{mono}/v1/images/jobs", json={"prompt": "long", "num_inference_steps": 100}).json()
    wait_for(lambda: httpx.get(f"{mono}/v1/images/jobs/{job['id']}").json()["status"] == "running", 60, "running")
    assert httpx.delete(f"{mono}/v1/images/jobs/{job['id']}", timeout=60).json()["status"] == "cancelled"
    quick = httpx.post(f"{mono}/v1/images/generations", json={"prompt": "next", "num_inference_steps": 1}, timeout=60)
    assert quick.status_code == 200, quick.text


# --- the benchmark's streaming mode (plumbing only: tiny and short; numbers come from an idle run) --


def test_bench_compare_stream_smoke(local_app, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "stream-bench"
    args = [
        sys.executable, "-m", "serve.cli", "bench", "--url", local_app["url"], "--label", "split",
        "--compare-stream", "--partial-images", "3", "--concurrency", "2", "--requests", "3", "--warmup", "1",
        "--steps", "4", "--size", "64x64", "--out", str(out), "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(
        args, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    streamed = "split streaming 3 partial images"
    assert list(report["targets"]) == ["split", streamed]
    (level,) = report["levels"]
    for name in ("split", streamed):
        (run,) = level["results"][name]["rounds"]
        m = run["metrics"]
        assert m["ok"] == m["requests"] == 3 and m["images"] == 3, (name, m)
    (run,) = level["results"][streamed]["rounds"]
    assert all(r["timings"]["partials"] == 3 and r["timings"]["first_partial"] > 0 for r in run["records"])
    assert run["metrics"]["stages_ms"]["first_partial"]["count"] == 3
    assert level["ratios_vs_split"][streamed]["throughput"]["median"] > 0
