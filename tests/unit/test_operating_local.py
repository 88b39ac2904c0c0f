"""Operating the service without Ray: request ids, metrics, per-key limits, the image safety check
and idempotent image writes, on the HTTP layer over the in-process stages."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve.api import Limits
from serve.api.http import create_app
from serve.api.limits import KeyLimit, RateLimits
from serve.api.local_stages import LocalStages
from serve.api.service import ImageService, ServiceConfig
from serve.metrics import RecordingMetrics
from serve.model import read_model_info
from serve.pipeline import Pipeline
from serve.request_context import RequestIdFilter
from serve.stages.messages import DecodeRequest
from serve.storage import open_store

KEYS = ("alice", "bob")
CHEAP = {"num_inference_steps": 1, "size": "64x64"}


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    return Pipeline.load(tiny_model, device="cpu")


def make_app(tiny_model, pipeline, storage: Path, **config):
    store = open_store(str(storage))
    metrics = RecordingMetrics("Ingress")
    cfg = ServiceConfig(model_name="tiny", limits=Limits(max_steps=8), api_keys=KEYS, **config)
    service = ImageService(cfg, read_model_info(tiny_model), LocalStages(pipeline, store), store, metrics=metrics)
    return service, metrics


@pytest.fixture
def app(tiny_model, pipeline, tmp_path):
    service, metrics = make_app(tiny_model, pipeline, tmp_path)
    with TestClient(create_app(service), headers={"Authorization": "Bearer alice"}) as client:
        yield {"client": client, "service": service, "metrics": metrics, "storage": tmp_path}


def images_in(storage: Path) -> list[Path]:
    return sorted((storage / "images").rglob("*.png")) if (storage / "images").exists() else []


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdFilter("test"))
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured():
    handler, log = Capture(), logging.getLogger("serve")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


# -- request ids ----------------------------------------------------------------------------------


def test_request_id_is_echoed_or_made(app):
    client = app["client"]
    r = client.get("/v1/models", headers={"X-Request-Id": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
    made = client.get("/v1/models").headers["x-request-id"]
    assert len(made) == 32 and made != client.get("/v1/models").headers["x-request-id"]
    # Unusable ids (spaces, too long) are replaced, not echoed into headers and logs.
    for bad in ("two words", "x" * 200):
        assert client.get("/v1/models", headers={"X-Request-Id": bad}).headers["x-request-id"] != bad
    # Errors carry it too, the auth middleware's 401 included.
    r = client.post("/v1/images/generations", json={"prompt": "x", "n": 99}, headers={"X-Request-Id": "bad-n"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "bad-n"
    r = client.get("/v1/models", headers={"Authorization": "Bearer nope", "X-Request-Id": "who"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "who"


def test_every_log_line_of_a_request_carries_its_id(app, captured):
    r = app["client"].post(
        "/v1/images/generations", json={"prompt": "logged", **CHEAP}, headers={"X-Request-Id": "rid-1"}
    )
    assert r.status_code == 200
    mine = [rec for rec in captured if rec.request_id == "rid-1"]
    assert any(rec.name == "serve.stages.decoder" for rec in mine), [(r.name, r.getMessage()) for r in captured]
    during = [rec for rec in captured if rec.name.startswith("serve.stages")]
    assert during and all(rec.request_id == "rid-1" for rec in during)


# -- metrics --------------------------------------------------------------------------------------


def test_ingress_and_stage_metrics(app, pipeline):
    stage_metrics = RecordingMetrics("Decoder")
    pipeline.decoder.metrics = stage_metrics
    pipeline.text_encoder.metrics = stage_metrics
    try:
        client, m = app["client"], app["metrics"]
        for prompt in ("same prompt", "same prompt"):
            assert client.post("/v1/images/generations", json={"prompt": prompt, **CHEAP}).status_code == 200
        assert client.post("/v1/images/generations", json={"prompt": "x", "n": 99}).status_code == 400
        assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    finally:
        pipeline.decoder.metrics = pipeline.text_encoder.metrics = RecordingMetrics("unused")
    assert m.value("darkroom_requests_total", status="200") == 2
    assert m.value("darkroom_requests_total", status="400") == 1
    assert m.value("darkroom_rejected_total", reason="invalid") == 1
    assert m.value("darkroom_rejected_total", reason="unauthenticated") == 1
    assert len(m.samples("darkroom_request_latency_seconds", outcome="ok")) == 2
    for stage in ("TextEncoder", "Denoiser", "Decoder"):
        assert len(m.samples("darkroom_stage_latency_seconds", stage=stage)) == 2
    assert m.value("darkroom_images_total", status="returned") == 2
    assert stage_metrics.value("darkroom_images_total", status="stored") == 2
    assert len(stage_metrics.samples("darkroom_store_seconds", op="image")) == 2
    # The second identical prompt (and the empty negative prompt after the first) came from the cache.
    assert stage_metrics.value("darkroom_prompt_cache_total", result="hit") >= 2


# -- per-key limits -------------------------------------------------------------------------------


def test_requests_per_minute_per_key_429_with_retry_after(tiny_model, pipeline, tmp_path):
    limits = RateLimits(keys={"alice": KeyLimit(requests_per_minute=60, burst=2)})
    service, metrics = make_app(tiny_model, pipeline, tmp_path, rate_limits=limits)
    now = [1000.0]
    service.limiter.clock = lambda: now[0]
    with TestClient(create_app(service)) as client:

        def post(key):
            return client.post(
                "/v1/images/generations", json={"prompt": "p", **CHEAP}, headers={"Authorization": f"Bearer {key}"}
            )

        assert [post("alice").status_code for _ in range(2)] == [200, 200]
        r = post("alice")
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
        assert post("bob").status_code == 200  # bob has no limit: another key's bucket
        now[0] += 1.0  # one token back (60 per minute)
        assert post("alice").status_code == 200
        assert post("alice").status_code == 429
    assert metrics.value("darkroom_rejected_total", reason="rate_limited") == 2


def test_inflight_images_per_key(tiny_model, pipeline, tmp_path):
    limits = RateLimits(default=KeyLimit(max_inflight_images=2))
    service, metrics = make_app(tiny_model, pipeline, tmp_path, rate_limits=limits)
    service.limiter.admit("alice", 2)  # two of alice's images are being generated
    with TestClient(create_app(service), headers={"Authorization": "Bearer alice"}) as client:
        r = client.post("/v1/images/generations", json={"prompt": "p", **CHEAP})
        assert r.status_code == 429 and r.json()["error"]["type"] == "images" and r.headers["retry-after"]
        service.limiter.release("alice", 2)
        assert client.post("/v1/images/generations", json={"prompt": "p", **CHEAP, "n": 2}).status_code == 200
        # Released when done: the same request again fits.
        assert client.post("/v1/images/generations", json={"prompt": "p", **CHEAP, "n": 2}).status_code == 200
        r = client.post("/v1/images/generations", json={"prompt": "p", **CHEAP, "n": 3})
        assert r.status_code == 429
    assert metrics.value("darkroom_rejected_total", reason="inflight_limited") == 2


def test_streams_and_jobs_carry_request_ids_count_and_hold_the_keys_images(tiny_model, pipeline, tmp_path, captured):
    """A streamed request is a request like the others: its id in its log lines and header, its
    images counted, and its key's images held until the stream ends (and a job's until it ends)."""
    limits = RateLimits(default=KeyLimit(max_inflight_images=2))
    service, metrics = make_app(tiny_model, pipeline, tmp_path, rate_limits=limits)
    body = {"prompt": "streamed", **CHEAP, "n": 2, "stream": True, "partial_images": 1}
    with TestClient(create_app(service), headers={"Authorization": "Bearer alice"}) as client:
        with client.stream("POST", "/v1/images/generations", json=body, headers={"X-Request-Id": "rid-s"}) as r:
            assert r.status_code == 200 and r.headers["x-request-id"] == "rid-s"
            assert service.limiter._inflight.get("alice") == 2  # held while it streams
            over = client.post("/v1/images/generations", json={"prompt": "p", **CHEAP, "stream": True})
            assert over.status_code == 429 and over.headers["retry-after"]
            lines = list(r.iter_lines())
        assert sum(line == "event: image_generation.completed" for line in lines) == 2
        assert "alice" not in service.limiter._inflight  # released when the stream ended
        job = client.post("/v1/images/jobs", json={"prompt": "a job", **CHEAP}, headers={"X-Request-Id": "rid-j"})
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 60
        while client.get(f"/v1/images/jobs/{job.json()['id']}").json()["status"] != "succeeded" or service.jobs.live:
            assert time.monotonic() < deadline, "the job did not finish"  # live: until its record is written
            time.sleep(0.05)
        assert "alice" not in service.limiter._inflight
    assert metrics.value("darkroom_images_total", status="returned") == 3
    assert metrics.value("darkroom_rejected_total", reason="inflight_limited") == 1
    assert metrics.value("darkroom_jobs_total", event="succeeded") == 1
    decoded = [rec for rec in captured if rec.name == "serve.stages.decoder"]
    assert {"rid-s", "rid-j"} <= {rec.request_id for rec in decoded}, [(r.request_id, r.getMessage()) for r in decoded]


# -- the image safety check -----------------------------------------------------------------------


class FlagIndexes:
    """A stand-in checker flagging chosen positions of each check() call."""

    def __init__(self, flagged: set[int]) -> None:
        self.flagged = flagged

    def check(self, images):
        return [i in self.flagged for i in range(len(images))]


def test_a_checker_that_flags_everything_stores_nothing(app, pipeline, tmp_path):
    from serve.safety import ImageSafetyChecker
    from serve.tiny.safety import write_tiny_safety_checker

    pipeline.decoder.safety = ImageSafetyChecker.load(write_tiny_safety_checker(tmp_path / "checker", "flag-all"))
    try:
        r = app["client"].post("/v1/images/generations", json={"prompt": "anything", **CHEAP, "n": 2})
    finally:
        pipeline.decoder.safety = None
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "moderation_blocked" and err["type"] == "image_generation_user_error"
    assert images_in(app["storage"]) == []
    m = app["metrics"]
    assert m.value("darkroom_images_total", status="withheld") == 2
    assert m.value("darkroom_rejected_total", reason="moderation_blocked") == 1


def test_withheld_images_are_named_in_the_response(app, pipeline):
    pipeline.decoder.safety = FlagIndexes({1})
    try:
        r = app["client"].post("/v1/images/generations", json={"prompt": "two", **CHEAP, "n": 3})
    finally:
        pipeline.decoder.safety = None
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 2]
    assert [w["index"] for w in body["withheld"]] == [1]
    assert body["withheld"][0]["error"]["code"] == "moderation_blocked"
    assert len(images_in(app["storage"])) == 2


def test_with_the_check_off_nothing_changes(app):
    body = app["client"].post("/v1/images/generations", json={"prompt": "plain", **CHEAP}).json()
    assert "withheld" not in body and len(body["data"]) == 1


# -- decode writes each image once ----------------------------------------------------------------


def test_decoding_a_request_twice_stores_its_images_once(pipeline, tmp_path):
    store = open_store(str(tmp_path))
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype("float32")
    req = DecodeRequest("png", {"created": 1_700_000_000}, inline=False, result_id="abc123")
    first = pipeline.decoder.decode_requests([(latents, req)], store)[0].value
    second = pipeline.decoder.decode_requests([(latents, req)], store)[0].value  # a retry after a replica died
    assert [im.key for im in first] == [im.key for im in second]
    assert [im.key for im in first] == ["images/2023/11/14/abc123-0.png", "images/2023/11/14/abc123-1.png"]
    assert len(images_in(tmp_path)) == 2
    fresh = DecodeRequest("png", {}, inline=False)  # no result id: fresh keys, as before
    keys = {im.key for _ in range(2) for im in pipeline.decoder.decode_requests([(latents, fresh)], store)[0].value}
    assert len(keys) == 4


def test_local_store_lists_one_folder(tmp_path):
    store = open_store(str(tmp_path))
    for name in ("b", "a"):
        store.put_json(f"jobs/active/{name}.json", {})
    store.put_json("jobs/active/nested/c.json", {})
    assert store.list_keys("jobs/active/") == ["jobs/active/a.json", "jobs/active/b.json"]
    assert store.list_keys("jobs/none/") == []
    with pytest.raises(ValueError):
        store.list_keys("jobs/active")  # a folder ends in "/"
