"""Load drivers (closed and open loop) over a ``Target``: the HTTP API, or the in-process pipeline.

Closed loop: ``C`` clients, each sends its next request as soon as its last one answered.
Open loop: request ``i`` is sent at ``t0 + offsets[i]`` whatever happened before (the sender
sleeps until that absolute time), so the server sees the offered rate even while it falls
behind, and queueing shows up as latency rather than as a lower send rate.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.metrics import RequestRecord
from bench.schedule import Workload

logger = logging.getLogger(__name__)

GENERATIONS = "/v1/images/generations"


@dataclass(frozen=True)
class Level:
    """One load level: ``closed`` at ``value`` concurrent clients, or ``open`` at ``value`` req/s."""

    mode: str
    value: float

    def __post_init__(self) -> None:
        if self.mode not in ("closed", "open"):
            raise ValueError(f"mode must be closed or open, got {self.mode!r}")
        if self.value <= 0 or (self.mode == "closed" and self.value != int(self.value)):
            raise ValueError(f"bad {self.mode} level {self.value}")

    @property
    def concurrency(self) -> int:
        return int(self.value) if self.mode == "closed" else 0

    @property
    def label(self) -> str:
        return f"c={int(self.value)}" if self.mode == "closed" else f"rate={self.value:g}/s"


@dataclass
class Response:
    """What a target answered for one request."""

    status: int
    images: int = 0
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Target(Protocol):
    """Something that generates images for request bodies."""

    name: str

    async def start(self) -> dict[str, Any]:
        """Wait until ready (bounded); returns facts about the target for the report."""
        ...

    def configure(self, level: Level) -> None:
        """Called before each level (the in-process target sizes its batches from it)."""
        ...

    async def send(self, body: dict[str, Any]) -> Response: ...

    async def close(self) -> None: ...


def parse_server_timing(header: str) -> dict[str, float]:
    """``"encode;dur=1.5, denoise;dur=900"`` -> ``{"encode": 1.5, "denoise": 900.0}``."""
    out: dict[str, float] = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    return out


class HttpTarget:
    """The OpenAI-compatible images API at ``url`` (the part before ``/v1``).

    ``stream``: every request is sent with ``stream: true`` and ``partial_images`` (the same
    bodies otherwise) and read as server-sent events to the end: its images are the completed
    events, and ``first_partial`` (ms) the client-side time to the first partial image.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        timeout_s: float = 600.0,
        ready_timeout_s: float = 300.0,
        stream: bool = False,
        partial_images: int = 0,
    ):
        self.url = url.rstrip("/")
        self.name = name or self.url
        self.timeout_s = timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.stream = stream
        self.partial_images = partial_images
        self._client: Any = None

    async def start(self) -> dict[str, Any]:
        import httpx

        # No connection cap: a capped pool would queue requests in the client and hide the
        # server's queueing as client lateness.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024)
        self._client = httpx.AsyncClient(timeout=self.timeout_s, limits=limits)
        deadline = time.monotonic() + self.ready_timeout_s
        last = "no answer"
        while True:
            try:
                r = await self._client.get(f"{self.url}/readyz", timeout=10)
                if r.status_code == 200:
                    break
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} not ready within {self.ready_timeout_s:.0f} s ({last})")
            await asyncio.sleep(0.5)
        info: dict[str, Any] = {"kind": "http", "url": self.url}
        try:
            models = (await self._client.get(f"{self.url}/v1/models", timeout=10)).json()
            info["models"] = [m.get("id") for m in models.get("data", [])]
        except Exception:  # informational only
            pass
        return info

    def configure(self, level: Level) -> None:
        return None

    async def send(self, body: dict[str, Any]) -> Response:
        import httpx

        if self.stream:
            return await self._send_stream({**body, "stream": True, "partial_images": self.partial_images})
        try:
            r = await self._client.post(f"{self.url}{GENERATIONS}", json=body)
        except httpx.TimeoutException as exc:
            return Response(0, error=f"timeout: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            return Response(0, error=f"{type(exc).__name__}: {exc}"[:300])
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except Exception:
                message = r.text
            return Response(r.status_code, error=str(message)[:300])
        try:
            payload = r.json()
        except ValueError:
            return Response(r.status_code, error="response is not JSON")
        timings = payload.get("timings") or parse_server_timing(r.headers.get("server-timing", ""))
        return Response(200, images=len(payload.get("data") or []), timings=dict(timings))

    async def _send_stream(self, body: dict[str, Any]) -> Response:
        import httpx

        t0 = time.perf_counter()
        images, partials, first_partial, error = 0, 0, None, None
        try:
            async with self._client.stream("POST", f"{self.url}{GENERATIONS}", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    try:
                        message = r.json()["error"]["message"]
                    except Exception:
                        message = r.text
                    return Response(r.status_code, error=str(message)[:300])
                event = None
                async for line in r.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "image_generation.partial_image":
                        partials += 1
                        if first_partial is None:
                            first_partial = (time.perf_counter() - t0) * 1000.0
                    elif line.startswith("data:") and event == "image_generation.completed":
                        images += 1
                    elif line.startswith("data:") and event == "error":
                        error = line[5:].strip()[:300]
        except httpx.TimeoutException as exc:
            return Response(0, error=f"timeout: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            return Response(0, error=f"{type(exc).__name__}: {exc}"[:300])
        timings = {"partials": float(partials)}
        if first_partial is not None:
            timings["first_partial"] = round(first_partial, 3)
        if error is None and images == 0:
            error = "the stream ended without a completed image"
        return Response(200, images=images, error=error, timings=timings)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class Progress:
    """A tqdm bar on stderr when it is a terminal; a plain line every ~10% otherwise."""

    def __init__(self, desc: str, total: int | None, *, enabled: bool = True) -> None:
        self.desc, self.total, self.done, self.failed = desc, total, 0, 0
        self.enabled = enabled
        self._bar: Any = None
        self._t0 = time.monotonic()
        self._last_line = 0.0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False)

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += 0 if record.ok else 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if self.failed:
                self._bar.set_postfix(errors=self.failed)
            return
        now = time.monotonic()
        step = max(1, (self.total or 0) // 10)
        if self.done == self.total or self.done % step == 0 or now - self._last_line > 10:
            self._last_line = now
            of = f"/{self.total}" if self.total else ""
            rate = self.done / max(now - self._t0, 1e-9)
            print(
                f"[{self.desc}] {self.done}{of} done, {self.failed} failed, {rate:.2f} req/s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def _one(target: Target, body: dict[str, Any], index: int, scheduled: float, t0: float) -> RequestRecord:
    start = time.perf_counter() - t0
    try:
        resp = await target.send(body)
    except Exception as exc:  # a target bug must not stop the run: record it
        logger.exception("request %d failed in the client", index)
        resp = Response(0, error=f"client error: {type(exc).__name__}: {exc}"[:300])
    end = time.perf_counter() - t0
    return RequestRecord(index, scheduled, start, end, resp.status, resp.images, resp.error, resp.timings)


async def closed_loop(
    target: Target,
    body: Callable[[int], dict[str, Any]],
    concurrency: int,
    *,
    count: int | None = None,
    duration_s: float | None = None,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """``concurrency`` clients send requests 0, 1, 2, ... until ``count`` are sent or
    ``duration_s`` has passed (requests in flight then still finish and count)."""
    if (count is None) == (duration_s is None):
        raise ValueError("give exactly one of count and duration_s")
    t0 = time.perf_counter()
    records: list[RequestRecord] = []
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while True:
            now = time.perf_counter() - t0
            if (count is not None and next_index >= count) or (duration_s is not None and now >= duration_s):
                return
            i = next_index
            next_index += 1
            record = await _one(target, body(i), i, now, t0)
            records.append(record)
            if on_record is not None:
                on_record(record)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return sorted(records, key=lambda r: r.index)


async def open_loop(
    target: Target,
    bodies: Sequence[dict[str, Any]],
    offsets: Sequence[float],
    *,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Send ``bodies[i]`` at ``t0 + offsets[i]`` (absolute; never drifts), then await them all."""
    if len(bodies) != len(offsets):
        raise ValueError(f"{len(bodies)} bodies for {len(offsets)} arrival times")
    tasks: list[asyncio.Task[RequestRecord]] = []

    async def tracked(i: int, off: float) -> RequestRecord:
        record = await _one(target, bodies[i], i, off, t0)
        if on_record is not None:
            on_record(record)
        return record

    t0 = time.perf_counter()
    for i, off in enumerate(offsets):
        delay = t0 + off - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(tracked(i, off)))
    return list(await asyncio.gather(*tasks))


async def warm_up(target: Target, workload: Workload, count: int, concurrency: int) -> list[RequestRecord]:
    """``count`` requests from the workload's warm-up stream; their records are not measured."""
    if count <= 0:
        return []
    return await closed_loop(target, lambda i: workload.body(i, "warmup"), max(1, min(concurrency, count)), count=count)
