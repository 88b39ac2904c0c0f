"""bench.cold_start: the per-stage breakdown (a pure function) and the HTTP side on a mock server."""

from __future__ import annotations

import json

import httpx

from bench.cold_start import ColdStartConfig, Sample, cold_start_breakdown, main, measure_cold_start

WARM = {"encode": 5.0, "denoise": 400.0, "decode": 30.0, "encode_queue": 3.0, "denoise_queue": 20.0}
WARM |= {"decode_queue": 4.0, "total": 470.0}
# A cold request: each stage waited seconds for its replica, and ran a bit slower the first time.
COLD = {"encode": 45.0, "denoise": 430.0, "decode": 30.0, "encode_queue": 6203.0, "denoise_queue": 7020.0}
COLD |= {"decode_queue": 5004.0, "total": 18800.0}


def test_breakdown_is_cold_minus_warm_median_per_stage():
    cold = Sample(200, 18.9, COLD, images=1)
    warm = [Sample(200, 0.5, WARM, images=1), Sample(200, 0.6, {**WARM, "encode_queue": 9.0}, images=1)]
    b = cold_start_breakdown(cold, warm)
    assert b["ok"]
    # encode: 6203 - median(3, 9) = 6197; first run 45 - 5 = 40 ms of warm-up.
    assert b["stages"]["encode"] == {
        "cold_queue_ms": 6203.0,
        "warm_queue_ms": 6.0,
        "cold_start_ms": 6197.0,
        "cold_compute_ms": 45.0,
        "warm_compute_ms": 5.0,
        "first_run_ms": 40.0,
    }
    assert b["stages"]["denoise"]["cold_start_ms"] == 7000.0
    assert b["stages"]["decode"]["cold_start_ms"] == 5000.0
    assert b["stages"]["decode"]["first_run_ms"] == 0.0
    assert b["cold_start_total_ms"] == 6197.0 + 7000.0 + 5000.0
    assert b["slowest_stage"] == "denoise"
    assert b["cold_wall_ms"] == 18900.0 and b["warm_wall_ms"] == 550.0


def test_breakdown_clips_at_zero_and_flags_failures():
    # A stage that was already up can queue less on the cold request than on a warm one.
    cold = Sample(200, 1.0, {**WARM, "denoise_queue": 10.0}, images=1)
    b = cold_start_breakdown(cold, [Sample(200, 0.5, WARM, images=1)])
    assert b["stages"]["denoise"]["cold_start_ms"] == 0.0
    assert not cold_start_breakdown(Sample(503, 1.0, error="overloaded"), [])["ok"]
    assert not cold_start_breakdown(cold, [Sample(0, 1.0, error="timeout")])["ok"]
    # No warm reference: the cold queue itself is the estimate.
    assert cold_start_breakdown(Sample(200, 19.0, COLD, images=1), [])["stages"]["encode"]["cold_start_ms"] == 6203.0


def _server(sent: list[dict]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/readyz":
            return httpx.Response(200, json={"status": "ready"})
        body = json.loads(request.content)
        sent.append({"body": body, "auth": request.headers.get("authorization")})
        timings = COLD if len(sent) == 1 else WARM
        return httpx.Response(200, json={"created": 0, "data": [{"url": "http://x/1.png"}], "timings": timings})

    return httpx.MockTransport(handle)


def test_measure_sends_one_cold_then_warm_requests():
    sent: list[dict] = []
    cfg = ColdStartConfig(url="http://app", steps=7, size="64x64", warm_requests=2, api_key="k")
    report = measure_cold_start(cfg, transport=_server(sent))
    assert len(sent) == 3
    assert sent[0]["body"] == {
        "prompt": cfg.prompt,
        "num_inference_steps": 7,
        "seed": 0,
        "response_format": "url",
        "size": "64x64",
    }
    assert sent[0]["auth"] == "Bearer k"
    assert report["config"]["api_key"] == "***"  # never written to the report
    assert report["breakdown"]["ok"] and report["breakdown"]["stages"]["encode"]["cold_start_ms"] == 6200.0
    json.dumps(report)  # serialisable as is


def test_main_fails_when_the_cold_request_fails(tmp_path, monkeypatch):
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"message": "overloaded"}})

    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(**{**kw, "transport": httpx.MockTransport(refuse)}))
    out = tmp_path / "cold.json"
    assert main(["--url", "http://app", "--out", str(out), "--warm", "0"]) == 1
    report = json.loads(out.read_text())
    assert report["cold"]["status"] == 503 and not report["breakdown"]["ok"]


def test_a_200_without_images_is_not_ok():
    assert not Sample(200, 1.0, WARM, images=0).ok
    assert Sample(200, 1.0, WARM, images=1).ok
