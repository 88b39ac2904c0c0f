"""Cold start of a scaled-to-zero app: how long the first request waits, and for which stage.

Against an app in the serverless profile (every model stage at zero replicas), one request is
sent; the server's ``timings`` split its wait per stage. ``encode_queue``, ``denoise_queue`` and
``decode_queue`` are the time the Ingress waited on each stage beyond the stage's own compute:
for a stage at zero that is its cold start (replica placement + process start + imports + weight
load), since each stage is only woken when the request reaches it. Then ``warm`` requests measure
the same numbers with every stage up, and a stage's cold start is the difference::

    cold_start[stage] = cold[stage_queue] - median(warm[stage_queue])     (replica start + load)
    first_run[stage]  = cold[stage]       - median(warm[stage])           (first-call warm-up)

Worked example: a cold request with ``encode_queue`` 6200 ms where warm ones show 3 ms means the
TextEncoder took ~6.2 s to come up; ``encode`` 40 ms cold vs 5 ms warm is 35 ms of first-run
warm-up (lazy kernels, allocator growth) on top.

    python -m bench.cold_start --url http://127.0.0.1:8000 --out cold.json --idle-s 150

``--idle-s`` waits before the cold request (at least the stages' ``downscale_to_zero_delay_s``
plus look-back, so they really are at zero; the script cannot see replicas, it only talks HTTP).
``--wake`` sends ``GET /readyz`` along with the request: readiness calls every stage, so all three
start in parallel and the cold start is the slowest stage's rather than the sum of the three.
HTTP only (httpx); nothing heavy is imported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

STAGES = ("encode", "denoise", "decode")


@dataclass(frozen=True)
class ColdStartConfig:
    url: str
    prompt: str = "a lighthouse at dusk, oil painting"
    steps: int = 20
    size: str | None = None  # None = the model's native size
    seed: int = 0
    idle_s: float = 0.0
    warm_requests: int = 3
    timeout_s: float = 900.0
    wake: bool = False
    api_key: str | None = None


@dataclass
class Sample:
    """One request as the client saw it: HTTP status, wall seconds, the server's timings (ms)."""

    status: int
    wall_s: float
    timings: dict[str, float] = field(default_factory=dict)
    images: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.images > 0


def cold_start_breakdown(cold: Sample, warm: Sequence[Sample]) -> dict[str, Any]:
    """Per-stage cold start (ms) from one cold and some warm samples. Pure: unit-testable.

    A stage's ``cold_start_ms`` is its extra queueing on the cold request over the warm median
    (clipped at 0: a warm request that queued behind another may wait longer than the cold one
    did for a stage that was already up). ``first_run_ms`` is the extra compute of its first call.
    """
    ok_warm = [w for w in warm if w.ok]
    stages: dict[str, dict[str, float | None]] = {}
    for stage in STAGES:
        queue_key = f"{stage}_queue"
        cold_queue = cold.timings.get(queue_key)
        cold_compute = cold.timings.get(stage)
        warm_queue = _median([w.timings.get(queue_key) for w in ok_warm])
        warm_compute = _median([w.timings.get(stage) for w in ok_warm])
        stages[stage] = {
            "cold_queue_ms": cold_queue,
            "warm_queue_ms": warm_queue,
            "cold_start_ms": _excess(cold_queue, warm_queue),
            "cold_compute_ms": cold_compute,
            "warm_compute_ms": warm_compute,
            "first_run_ms": _excess(cold_compute, warm_compute),
        }
    warm_wall = _median([w.wall_s for w in ok_warm])
    return {
        "ok": cold.ok and len(ok_warm) == len(warm),
        "cold_wall_ms": round(cold.wall_s * 1000.0, 3),
        "warm_wall_ms": None if warm_wall is None else round(warm_wall * 1000.0, 3),
        "cold_total_ms": cold.timings.get("total"),
        "stages": stages,
        # What scale-to-zero costs the first request, all stages together.
        "cold_start_total_ms": round(sum(s["cold_start_ms"] or 0.0 for s in stages.values()), 3),
        "slowest_stage": max(stages, key=lambda s: stages[s]["cold_start_ms"] or 0.0),
    }


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _excess(cold: float | None, warm: float | None) -> float | None:
    if cold is None:
        return None
    return round(max(0.0, cold - (warm or 0.0)), 3)


def send_one(client: httpx.Client, cfg: ColdStartConfig) -> Sample:
    """One ``POST /v1/images/generations``; never raises (failures become the sample's error)."""
    body: dict[str, Any] = {
        "prompt": cfg.prompt,
        "num_inference_steps": cfg.steps,
        "seed": cfg.seed,
        "response_format": "url",
    }
    if cfg.size:
        body["size"] = cfg.size
    t0 = time.perf_counter()
    try:
        r = client.post("/v1/images/generations", json=body, timeout=cfg.timeout_s)
    except httpx.HTTPError as exc:
        return Sample(status=0, wall_s=time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
    wall = time.perf_counter() - t0
    try:
        payload = r.json()
    except ValueError:
        return Sample(status=r.status_code, wall_s=wall, error=f"not JSON: {r.text[:200]}")
    if r.status_code != 200:
        return Sample(status=r.status_code, wall_s=wall, error=json.dumps(payload)[:500])
    timings = {k: float(v) for k, v in (payload.get("timings") or {}).items()}
    return Sample(status=200, wall_s=wall, timings=timings, images=len(payload.get("data") or []))


def _wake(client: httpx.Client, timeout_s: float) -> None:
    try:
        client.get("/readyz", timeout=timeout_s)
    except httpx.HTTPError:
        pass  # readiness is only a nudge here; the request itself reports any failure


def measure_cold_start(cfg: ColdStartConfig, *, transport: httpx.BaseTransport | None = None) -> dict[str, Any]:
    """Send the cold request (after ``idle_s``), then ``warm_requests``; return the JSON report.

    ``transport`` is for tests (``httpx.MockTransport``); by default this talks to ``cfg.url``.
    """
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    with httpx.Client(base_url=cfg.url.rstrip("/"), headers=headers, transport=transport) as client:
        if cfg.idle_s > 0:
            time.sleep(cfg.idle_s)
        waker = None
        if cfg.wake:
            waker = threading.Thread(target=_wake, args=(client, cfg.timeout_s), daemon=True)
            waker.start()
        started = time.time()
        cold = send_one(client, cfg)
        if waker is not None:
            waker.join(timeout=cfg.timeout_s)
        warm = [send_one(client, cfg) for _ in range(cfg.warm_requests)]
    return {
        "config": asdict(cfg) | {"api_key": "***" if cfg.api_key else None},
        "started_unix": started,
        "cold": asdict(cold),
        "warm": [asdict(w) for w in warm],
        "breakdown": cold_start_breakdown(cold, warm),
    }


def format_report(report: dict[str, Any]) -> str:
    b = report["breakdown"]
    lines = [f"cold request: {b['cold_wall_ms']:.0f} ms wall; warm median: {b['warm_wall_ms'] or 0:.0f} ms"]
    for stage, s in b["stages"].items():
        cold, first = s["cold_start_ms"] or 0, s["first_run_ms"] or 0
        lines.append(f"  {stage:8s} cold start {cold:8.0f} ms  first-run extra {first:6.0f} ms")
    lines.append(f"  all stages {b['cold_start_total_ms']:.0f} ms, slowest: {b['slowest_stage']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="base URL of the app, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--prompt", default=ColdStartConfig.prompt)
    p.add_argument("--steps", type=int, default=ColdStartConfig.steps)
    p.add_argument("--size", default=None, help="WxH (default: the model's native size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--idle-s", type=float, default=0.0, help="wait this long first, so stages scale to zero")
    p.add_argument("--warm", type=int, default=3, help="warm requests after the cold one")
    p.add_argument("--timeout", type=float, default=900.0, help="client timeout per request (s)")
    p.add_argument("--wake", action="store_true", help="GET /readyz with the cold request (parallel wake)")
    p.add_argument("--api-key", default=None, help="bearer key, when the app requires one")
    args = p.parse_args(argv)
    cfg = ColdStartConfig(
        url=args.url,
        prompt=args.prompt,
        steps=args.steps,
        size=args.size,
        seed=args.seed,
        idle_s=args.idle_s,
        warm_requests=args.warm,
        timeout_s=args.timeout,
        wake=args.wake,
        api_key=args.api_key,
    )
    report = measure_cold_start(cfg)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    return 0 if report["breakdown"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
