"""Streaming, jobs' progress and events, cancellation and client disconnects over the in-process
app (LocalStages, no Ray): TestClient for the API, uvicorn on loopback where a real socket
matters (the official openai client, disconnects). Slow work is slow on purpose
(``LocalStages(step_delay_s=...)``), never by guessing sizes."""

from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve.api import Limits, parse_generation_request
from serve.api.http import create_app
from serve.api.local_stages import LocalStages
from serve.api.service import ImageService, ServiceConfig
from serve.errors import OverloadedError
from serve.imageio import decode_image
from serve.model import read_model_info
from serve.pipeline import Pipeline
from serve.storage import open_store
from tests.conftest import max_level_diff
from tests.openai_spec import errors, schema
from tests.sse import parse_events, serving

DELAY_S = 0.4  # per denoiser step of the slow service: far longer than a cancel takes to travel in-process


class FaultyStages(LocalStages):
    """Fails the Denoiser's stream after its first item when ``fail`` is set."""

    fail = False

    async def denoise_stream(self, job):
        async for item in super().denoise_stream(job):
            yield item
            if self.fail:
                raise OverloadedError("Denoiser is at capacity; retry shortly")


@pytest.fixture(scope="module")
def env(tiny_model, tmp_path_factory):
    store = open_store(str(tmp_path_factory.mktemp("streaming")))
    pipeline = Pipeline.load(tiny_model, device="cpu")
    info = read_model_info(tiny_model)
    config = ServiceConfig(model_name="tiny", limits=Limits(max_steps=200), request_timeout_s=120, job_poll_s=0.1)
    fast = ImageService(config, info, FaultyStages(pipeline, store), store)
    slow = ImageService(config, info, LocalStages(pipeline, store, step_delay_s=DELAY_S), store)
    other = ImageService(config, info, slow.stages, store)  # a second Ingress replica: same store
    with TestClient(create_app(fast)) as a, TestClient(create_app(slow)) as b, TestClient(create_app(other)) as c:
        yield {"fast": a, "slow": b, "other": c, "services": (fast, slow, other), "info": info}


def events_of(response) -> list[tuple[str, dict]]:
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    return list(parse_events(response.iter_lines()))


def assert_spec_event(name: str, payload: dict) -> None:
    """Valid by OpenAI's schema, with the spec's fields first and in the spec's order."""
    spec = {"image_generation.partial_image": "ImageGenPartialImageEvent"}.get(name, "ImageGenCompletedEvent")
    assert payload["type"] == name
    assert errors(spec, payload) == [], payload
    assert errors("ImageGenStreamEvent", payload) == []
    fields = list(schema(spec)["properties"])
    assert list(payload)[: len(fields)] == fields


def test_stream_follows_the_spec_and_ends_with_the_diffusers_image(env, reference):
    body = {"prompt": "a small boat", "seed": 6, "num_inference_steps": 6, "n": 2, "size": "48x64"}
    with env["fast"].stream("POST", "/v1/images/generations", json={**body, "stream": True, "partial_images": 2}) as r:
        events = events_of(r)
    names = [name for name, _ in events]
    assert names == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2
    for name, payload in events:
        assert_spec_event(name, payload)
        assert payload["seed"] == 6 and payload["size"] == "auto" and payload["output_format"] == "png"
    partials = [p for n, p in events if n.endswith("partial_image")]
    assert [(p["partial_image_index"], p["image_index"]) for p in partials] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for p in partials:  # drawn at the latent grid's size: 1/8 of each side
        assert decode_image(base64.b64decode(p["b64_json"])).shape == (8, 6, 3)
    completed = [p for n, p in events if n.endswith("completed")]
    assert [p["image_index"] for p in completed] == [0, 1] and completed[0]["usage"]["total_tokens"] == 0
    got = np.stack([decode_image(base64.b64decode(p["b64_json"])) for p in completed])
    want = reference(parse_generation_request(body).to_params(default_size=(64, 64)))
    assert max_level_diff(got, want) <= 3
    plain = env["fast"].post("/v1/images/generations", json={**body, "response_format": "b64_json"}).json()
    assert np.array_equal(got, np.stack([decode_image(base64.b64decode(d["b64_json"])) for d in plain["data"]]))


def test_stream_values_outside_the_specs_enums_are_named_in_its_words(env):
    body = {"prompt": "x", "num_inference_steps": 2, "stream": True, "quality": "hd", "output_format": "webp"}
    with env["fast"].stream("POST", "/v1/images/generations", json={**body, "response_format": "url"}) as r:
        (name, done), *_ = [e for e in events_of(r) if e[0].endswith("completed")]
    assert_spec_event(name, done)
    assert done["quality"] == "high" and done["output_format"] == "webp" and done["url"].startswith("http")
    assert env["fast"].get(done["url"]).content == base64.b64decode(done["b64_json"])


def test_the_official_client_iterates_the_stream(env, reference):
    openai = pytest.importorskip("openai")
    service = env["services"][0]
    extra = {"seed": 12, "num_inference_steps": 5, "negative_prompt": "blurry", "scheduler": "euler_a"}
    with serving(create_app(service)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
        stream = client.images.generate(
            model="tiny", prompt="a lighthouse", size="64x64", stream=True, partial_images=2, extra_body=extra
        )
        events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert events[-1].model_extra["seed"] == 12 and events[-1].model_extra["image_index"] == 0
    got = decode_image(base64.b64decode(events[-1].b64_json))[None]
    want = reference(parse_generation_request({"prompt": "a lighthouse", **extra}).to_params(default_size=(64, 64)))
    assert max_level_diff(got, want) <= 3


def test_a_failure_mid_stream_is_an_error_event_the_client_raises(env):
    openai = pytest.importorskip("openai")
    service = env["services"][0]
    service.stages.fail = True
    try:
        with env["fast"].stream(
            "POST",
            "/v1/images/generations",
            json={"prompt": "x", "num_inference_steps": 3, "stream": True, "partial_images": 1},
        ) as r:
            events = events_of(r)
        assert events[-1] == (
            "error",
            {"error": {"message": "Denoiser is at capacity; retry shortly", "type": "server_error", "param": None,
                       "code": "overloaded"}},
        )  # fmt: skip
        with serving(create_app(service)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)
            with pytest.raises(openai.APIError, match="at capacity"):
                list(
                    client.images.generate(
                        prompt="x", stream=True, partial_images=1, extra_body={"num_inference_steps": 3}
                    )
                )
    finally:
        service.stages.fail = False


@pytest.mark.parametrize(
    ("path", "body", "headers", "param"),
    [
        ("/v1/images/generations", {"prompt": "x", "stream": True, "n": 0}, {}, "n"),
        ("/v1/images/generations", {"prompt": "x", "stream": True, "partial_images": 4}, {}, "partial_images"),
        ("/v1/images/generations", {"prompt": "x", "stream": True}, {"Idempotency-Key": "k1"}, "Idempotency-Key"),
        ("/v1/images/jobs", {"prompt": "x", "stream": True}, {}, "stream"),
    ],
)
def test_refusals_come_before_the_stream(env, path, body, headers, param):
    r = env["fast"].post(path, json=body, headers=headers)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["param"] == param


# --- jobs ---------------------------------------------------------------------------------------


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def test_job_events_progress_and_preview(env):
    client = env["slow"]
    job = client.post("/v1/images/jobs", json={"prompt": "a kite", "seed": 2, "num_inference_steps": 8,
                                                "partial_images": 2, "response_format": "b64_json"}).json()  # fmt: skip
    assert job["status"] == "queued" and job["partial_images"] == 2
    running = wait_for(lambda: (j := client.get(f"/v1/images/jobs/{job['id']}").json()).get("preview") and j, 60)
    assert running["status"] == "running" and 0 < running["progress"]["step"] < 8
    assert running["progress"]["total_steps"] == 8 and running["preview"]["partial_image_index"] == 0
    with client.stream("GET", f"/v1/images/jobs/{job['id']}/events") as r:
        events = events_of(r)
    names = [n for n, _ in events]
    assert names[0] == "job.status" and names[-1] == "job.status" and events[-1][1]["status"] == "succeeded"
    steps = [p["progress"]["step"] for n, p in events if n == "job.progress"]
    assert steps == sorted(steps) and len(set(steps)) >= 2  # it moved while we watched
    assert steps[-1] == 8 and names[names.index("image_generation.completed") - 1] == "job.progress"  # to the end
    partials = [p for n, p in events if n == "image_generation.partial_image"]
    assert [p["partial_image_index"] for p in partials] == [0, 1]  # the first one replayed
    (done,) = [p for n, p in events if n == "image_generation.completed"]
    for p in (*partials, done):
        assert_spec_event(p["type"], p)
    final = client.get(f"/v1/images/jobs/{job['id']}").json()
    assert final["progress"] == {"step": 8, "total_steps": 8} and "preview" not in final
    assert final["result"]["data"][0]["b64_json"] == done["b64_json"]
    with client.stream("GET", f"/v1/images/jobs/{job['id']}/events") as r:  # an ended job replays its end
        assert [n for n, _ in events_of(r)] == ["image_generation.completed", "job.status"]


def test_cancel_a_running_job_frees_the_denoiser_within_one_step(env):
    client, stages = env["slow"], env["services"][1].stages
    job = client.post("/v1/images/jobs", json={"prompt": "long", "num_inference_steps": 150}).json()
    wait_for(lambda: client.get(f"/v1/images/jobs/{job['id']}").json().get("progress", {}).get("step", 0) >= 2)
    at_cancel = stages.steps
    r = client.delete(f"/v1/images/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    wait_for(lambda: stages.in_flight == 0, 30, "the Denoiser slot")
    assert stages.steps <= at_cancel + 1
    assert client.get(f"/v1/images/jobs/{job['id']}").json()["status"] == "cancelled"
    assert client.delete(f"/v1/images/jobs/{job['id']}").status_code == 200  # idempotent
    done = client.post("/v1/images/jobs", json={"prompt": "short", "num_inference_steps": 1}).json()
    wait_for(lambda: client.get(f"/v1/images/jobs/{done['id']}").json()["status"] == "succeeded")
    r = client.delete(f"/v1/images/jobs/{done['id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"
    assert client.delete("/v1/images/jobs/0123456789abcdef").status_code == 404


def test_a_delete_during_the_final_write_neither_interrupts_it_nor_silences_the_stream(env, monkeypatch):
    """The job has succeeded and its final record is being written (held here by a gate): DELETE
    waits for it and answers 409, and a subscriber hears the job end ``succeeded``."""
    client, service = env["fast"], env["services"][0]
    store, jobs = service.store, service.jobs
    writing, release, deleting = threading.Event(), threading.Event(), threading.Event()
    put_job, cancel = store.put_job, jobs.cancel

    def gated_put_job(job_id, record):
        if record.get("status") == "succeeded":
            writing.set()
            assert release.wait(30), "the test never released the final write"
        put_job(job_id, record)

    async def spied_cancel(job_id):
        deleting.set()
        return await cancel(job_id)

    monkeypatch.setattr(store, "put_job", gated_put_job)
    monkeypatch.setattr(jobs, "cancel", spied_cancel)
    job = client.post("/v1/images/jobs", json={"prompt": "nearly done", "num_inference_steps": 2}).json()
    assert writing.wait(60), "the job never reached its final write"

    def follow():
        with client.stream("GET", f"/v1/images/jobs/{job['id']}/events") as r:
            return events_of(r)

    pool = ThreadPoolExecutor(2)
    try:
        followed = pool.submit(follow)
        wait_for(lambda: jobs.live[job["id"]].subscribers, 30, "the event stream to subscribe")
        deleted = pool.submit(client.delete, f"/v1/images/jobs/{job['id']}")
        assert deleting.wait(30), "DELETE never reached the job manager"
        release.set()
        r_delete, events = deleted.result(timeout=60), followed.result(timeout=60)
    finally:
        release.set()
        pool.shutdown(wait=False, cancel_futures=True)  # a stream that never ended must not hang the run
    assert r_delete.status_code == 409 and r_delete.json()["error"]["code"] == "job_finished"
    assert events[-1][0] == "job.status" and events[-1][1]["status"] == "succeeded"
    assert client.get(f"/v1/images/jobs/{job['id']}").json()["status"] == "succeeded"


def test_another_replica_sees_progress_streams_events_and_cancels(env):
    owner, other, stages = env["slow"], env["other"], env["services"][1].stages
    job = owner.post("/v1/images/jobs", json={"prompt": "far away", "num_inference_steps": 150}).json()

    def progressed():
        record = other.get(f"/v1/images/jobs/{job['id']}").json()
        return record.get("progress", {}).get("step", 0) >= 2 and record

    assert wait_for(progressed)["status"] == "running"  # from the record the owner rewrites every job_poll_s
    with other.stream("GET", f"/v1/images/jobs/{job['id']}/events") as r:
        lines = r.iter_lines()
        first = []
        for event in parse_events(lines):
            first.append(event)
            if len([e for e in first if e[0] == "job.progress"]) >= 2:
                break
        r_cancel = other.delete(f"/v1/images/jobs/{job['id']}")
        assert r_cancel.status_code in (200, 202) and r_cancel.json()["cancel_requested"] is True
        rest = list(parse_events(lines))
    assert rest[-1][0] == "job.status" and rest[-1][1]["status"] == "cancelled"
    wait_for(lambda: owner.get(f"/v1/images/jobs/{job['id']}").json()["status"] == "cancelled")
    wait_for(lambda: stages.in_flight == 0, 30, "the Denoiser slot")


# --- clients that leave -------------------------------------------------------------------------


def test_a_client_leaving_a_stream_frees_the_denoiser_within_one_step(env):
    service = env["services"][1]
    stages = service.stages
    body = {"prompt": "left early", "num_inference_steps": 40, "stream": True, "partial_images": 3}
    with serving(create_app(service)) as url, httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/images/generations", json=body) as r:
            for name, _ in parse_events(r.iter_lines()):
                if name == "image_generation.partial_image":
                    at_leave = stages.steps
                    break
        # Leaving the block closed the connection mid-stream.
        wait_for(lambda: stages.in_flight == 0, 30, "the Denoiser slot")
        assert stages.steps <= at_leave + 1


def test_a_client_leaving_a_plain_request_frees_the_denoiser_within_one_step(env):
    service = env["services"][1]
    stages = service.stages
    body = b'{"prompt": "plain and left", "num_inference_steps": 150}'
    with serving(create_app(service)) as url:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=30)
        start = stages.steps
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        at_leave = wait_for(lambda: stages.steps >= start + 2 and stages.steps, 60, "denoising to start")
        sock.close()
        wait_for(lambda: stages.in_flight == 0, 30, "the Denoiser slot")
        assert stages.steps <= at_leave + 1
