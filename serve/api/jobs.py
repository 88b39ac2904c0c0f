"""Async jobs: ``POST /v1/images/jobs``, ``GET /v1/images/jobs/{id}`` (status, progress, latest
preview), ``GET .../events`` (server-sent events) and ``DELETE`` (cancel).

A job runs as a task in the Ingress replica that took it (its *owner*), which keeps its live state
in memory: progress, the partial images so far, the subscribers of its event streams. The job's
record in the result store (``jobs/<id>.json``) is what every other replica sees: the owner
rewrites it when the job starts denoising, with each partial image, at most every
``job_poll_s`` with its progress, and at the end. So with several Ingress replicas:

- ``GET`` answers from memory on the owner and from the record elsewhere (progress at most
  ``job_poll_s`` old);
- ``GET .../events`` streams live on the owner; elsewhere it polls the record every
  ``job_poll_s`` and sends the same events as they appear there;
- ``DELETE`` cancels at once on the owner (the task is cancelled, the stage calls with it: the
  Denoiser drops the job before its next step); elsewhere it leaves a cancel mark in the store
  (``jobs/cancel/<id>.json``) that the owner polls every ``job_poll_s``.

Statuses: ``queued`` (waiting for the TextEncoder or for a Denoiser slot), ``running`` (denoising
started), then ``succeeded``, ``failed`` or ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serve.api.streaming import (
    COMPLETED,
    JOB_PROGRESS,
    JOB_STATUS,
    PARTIAL,
    Developed,
    StreamContext,
    progress_payload,
    sse,
    sse_comment,
    status_payload,
)
from serve.errors import DarkroomError, InvalidRequestError, JobConflictError
from serve.stages.messages import DecodedImage

if TYPE_CHECKING:
    from serve.api.schemas import ImageGenerationRequest
    from serve.api.service import ImageService
    from serve.params import GenerationParams

logger = logging.getLogger(__name__)

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
#: How long DELETE on a replica that does not run the job waits for the owner to end it.
CANCEL_WAIT_POLLS = 3


def cancel_key(job_id: str) -> str:
    return f"jobs/cancel/{job_id}.json"


@dataclass(eq=False)
class LiveJob:
    """A job running in this replica: its record and what its event streams replay and follow."""

    record: dict[str, Any]
    ctx: StreamContext
    task: asyncio.Task | None = None
    events: list[bytes] = field(default_factory=list)  # partial and completed events so far
    subscribers: set[asyncio.Queue] = field(default_factory=set)
    cancel_requested: bool = False
    written_at: float = 0.0
    # Record writes run in threads, and a cancelled write's thread still finishes: numbered
    # writes under a lock keep a late progress write from overwriting the final record.
    writes: int = 0
    written: int = 0
    write_lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, chunk: bytes | None, keep: bool = False) -> None:
        """Send an event to every subscriber (None ends their streams); ``keep``: replay it to late ones."""
        if keep and chunk is not None:
            self.events.append(chunk)
        for queue in self.subscribers:
            queue.put_nowait(chunk)


class JobManager:
    """The jobs of one ``ImageService``: submission, live state, records, streams, cancellation."""

    def __init__(self, service: ImageService) -> None:
        self.service = service
        self.live: dict[str, LiveJob] = {}
        self._tasks: set[asyncio.Task] = set()  # strong refs: the loop only keeps weak ones

    @property
    def store(self) -> Any:
        return self.service.store

    @property
    def poll_s(self) -> float:
        return self.service.config.job_poll_s

    async def _write(self, live: LiveJob) -> None:
        live.written_at = time.monotonic()
        live.writes += 1
        number, record = live.writes, dict(live.record)

        def put() -> None:
            with live.write_lock:
                if number > live.written:
                    self.store.put_job(record["id"], record)
                    live.written = number

        try:
            await asyncio.to_thread(put)
        except Exception:  # the job goes on; the next write may succeed
            logger.exception("could not record job %s", live.record["id"])

    # -- submit and run -----------------------------------------------------------------------
    async def submit(self, body: Any) -> dict[str, Any]:
        request, params = self.service.parse(body)
        if request.stream:
            raise InvalidRequestError("stream", True, "jobs stream through GET /v1/images/jobs/{id}/events")
        if params.loras:
            await asyncio.to_thread(self.service.check_loras, params)
        ctx = self.service.stream_context(request, params)
        record = {
            "id": uuid.uuid4().hex,
            "object": "image.job",
            "status": "queued",
            "created": int(time.time()),
            "response_format": request.response_format,
            "seed": params.seed,
            "partial_images": request.partial_images or 0,
            "settings": {
                "size": f"{params.width}x{params.height}",
                "quality": request.quality,
                "background": request.background,
                "output_format": params.output_format,
                "output_compression": params.output_compression,
            },
        }
        if params.loras:
            record["loras"] = [{"name": n, "scale": s} for n, s in params.loras]  # as the response records them
        await asyncio.to_thread(self.store.put_job, record["id"], record)
        live = LiveJob(dict(record), ctx)
        self.live[record["id"]] = live
        live.task = asyncio.create_task(self._run(live, request, params))
        self._tasks.add(live.task)
        live.task.add_done_callback(self._tasks.discard)
        return record

    async def _run(self, live: LiveJob, request: ImageGenerationRequest, params: GenerationParams) -> None:
        job_id = live.record["id"]
        watcher = asyncio.create_task(self._watch_cancel(live))
        deadline = asyncio.get_running_loop().time() + self.service.config.request_timeout_s
        outcome: dict[str, Any]
        try:
            partials = request.partial_images or 0
            develop = self.service.develop(request, params, partials, deadline, progress=True)
            async with contextlib.aclosing(develop) as events:
                async for item in events:
                    if isinstance(item, Developed):
                        outcome = self._succeeded(live, item.images, item.timings)
                    else:
                        await self._progress(live, item)
        except asyncio.CancelledError:
            why = "cancelled" if live.cancel_requested else "failed"
            outcome = {"status": why, "finished": int(time.time())}
            if why == "failed":  # the server is stopping: record it, then let the cancel through
                outcome.update(DarkroomError("the server stopped while the job ran").to_openai())
                await self._finish(live, outcome)
                raise
        except Exception as exc:  # the job records any failure; the server carries on
            logger.exception("job %s failed", job_id)
            err = exc if isinstance(exc, DarkroomError) else DarkroomError(f"generation failed: {exc}")
            outcome = {"status": "failed", "finished": int(time.time()), **err.to_openai()}
        finally:
            watcher.cancel()
        await self._finish(live, outcome)

    async def _progress(self, live: LiveJob, item: Any) -> None:
        record = live.record
        moved = record.get("progress", {}).get("step") != item.step
        record["progress"] = {"step": item.step, "total_steps": item.total_steps}
        changed = record["status"] == "queued"
        if changed:
            record["status"] = "running"
            live.publish(sse(JOB_STATUS, status_payload(record)))
        if moved or changed:  # PNDM's extra iteration repeats a step: say it once
            payload = progress_payload(record["id"], record["status"], item.step, item.total_steps)
            live.publish(sse(JOB_PROGRESS, payload))
        if item.preview is not None:
            payloads = await asyncio.to_thread(live.ctx.partials, item.preview, item.partial_index or 0)
            for payload in payloads:
                live.publish(sse(PARTIAL, payload), keep=True)
            record["preview"] = payloads[-1]  # the latest partial image (of the last of the n images)
            changed = True
        if changed or time.monotonic() - live.written_at >= self.poll_s:
            await self._write(live)

    def _succeeded(self, live: LiveJob, images: list[DecodedImage], timings: dict[str, float]) -> dict[str, Any]:
        for index, image in enumerate(images):
            live.publish(sse(COMPLETED, live.ctx.completed(image.data or b"", index)), keep=True)
        total = live.record.get("progress", {}).get("total_steps", 0)
        return {
            "status": "succeeded",
            "finished": int(time.time()),
            "progress": {"step": total, "total_steps": total},
            "images": [{"key": im.key, "content_type": im.content_type} for im in images],
            "timings": timings,
        }

    async def _finish(self, live: LiveJob, outcome: dict[str, Any]) -> None:
        live.record.update(outcome)  # terminal from here on: DELETE no longer interrupts it
        if outcome["status"] == "succeeded":
            live.record.pop("preview", None)  # the result has the images (a cancelled job keeps its last)
        try:
            await self._write(live)
        finally:  # subscribers always hear the end, even if this task is stopped mid-write
            live.publish(sse(JOB_STATUS, status_payload(live.record)))
            live.publish(None)
            self.live.pop(live.record["id"], None)

    async def _watch_cancel(self, live: LiveJob) -> None:
        """A DELETE that reached another replica leaves a mark in the store: end the job on it."""
        key = cancel_key(live.record["id"])
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                marked = await asyncio.to_thread(self.store.exists, key)
            except Exception:
                logger.debug("cancel mark check failed", exc_info=True)
                continue
            if marked:
                live.cancel_requested = True
                if live.task is not None:
                    live.task.cancel()
                return

    # -- read -----------------------------------------------------------------------------------
    async def get(self, job_id: str, base_url: str) -> dict[str, Any]:
        live = self.live.get(job_id)
        record = dict(live.record) if live is not None else await asyncio.to_thread(self.store.get_job, job_id)
        if record.get("status") != "succeeded":
            return record
        images = [DecodedImage(im["key"], im["content_type"], None) for im in record.get("images", [])]
        body = await asyncio.to_thread(
            self.service.render,
            record["created"],
            record["seed"],
            images,
            record.get("response_format", "url"),
            base_url,
            record.get("timings", {}),
        )
        if record.get("loras"):
            body["loras"] = record["loras"]
        out = {k: v for k, v in record.items() if k not in ("images", "preview")}
        out["result"] = body
        return out

    # -- cancel ---------------------------------------------------------------------------------
    async def cancel(self, job_id: str) -> tuple[int, dict[str, Any]]:
        """``DELETE``: (200, the cancelled record), or (202, the record) when another replica runs
        the job and has not ended it yet. A job that already ended otherwise is a 409."""
        live = self.live.get(job_id)
        if live is not None and live.task is not None and live.record["status"] not in TERMINAL:
            live.cancel_requested = True
            live.task.cancel()
            await asyncio.wait({live.task}, timeout=self.service.config.stage_timeout_s)
            return 200, self._public(live.record)
        if live is not None and live.task is not None:  # ending right now: wait for its final record
            await asyncio.wait({live.task}, timeout=self.service.config.stage_timeout_s)
        record = await asyncio.to_thread(self.store.get_job, job_id)
        if record.get("status") in TERMINAL:
            if record["status"] == "cancelled":
                return 200, self._public(record)  # DELETE is idempotent
            raise JobConflictError(f"job {job_id} already {record['status']}: nothing to cancel")
        await asyncio.to_thread(self.store.put_json, cancel_key(job_id), {"requested": int(time.time())})
        for _ in range(CANCEL_WAIT_POLLS):
            await asyncio.sleep(self.poll_s)
            record = await asyncio.to_thread(self.store.get_job, job_id)
            if record.get("status") in TERMINAL:
                break
        status = 200 if record.get("status") == "cancelled" else 202
        return status, {**self._public(record), "cancel_requested": True}

    @staticmethod
    def _public(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k not in ("images", "preview")}

    # -- events ---------------------------------------------------------------------------------
    async def events(self, job_id: str, base_url: str) -> AsyncIterator[bytes]:
        """The SSE body of ``GET .../events``; an unknown job raises (404) before anything is sent."""
        live = self.live.get(job_id)
        if live is not None:
            # Snapshot and subscribe with no await in between: every later event reaches the
            # queue, every earlier one is in the replay, none in both.
            record = live.record
            replay = [sse(JOB_STATUS, status_payload(record))]
            if "progress" in record:
                p = record["progress"]
                replay.append(sse(JOB_PROGRESS, progress_payload(record["id"], record["status"], **p)))
            replay += live.events
            queue: asyncio.Queue = asyncio.Queue()
            live.subscribers.add(queue)
            return self._follow(live, queue, replay)
        record = await asyncio.to_thread(self.store.get_job, job_id)
        return self._poll(job_id, record)

    async def _follow(self, live: LiveJob, queue: asyncio.Queue, replay: list[bytes]) -> AsyncIterator[bytes]:
        try:
            for chunk in replay:
                yield chunk
            while True:
                try:
                    chunk = await asyncio.wait_for(queue.get(), timeout=15.0)
                except asyncio.TimeoutError:
                    yield sse_comment("waiting")  # keeps idle proxies from closing the stream
                    continue
                if chunk is None:
                    return
                yield chunk
        finally:
            live.subscribers.discard(queue)

    async def _poll(self, job_id: str, record: dict[str, Any]) -> AsyncIterator[bytes]:
        """Events of a job another replica runs (or that has ended), from its record in the store."""
        status, seen_progress, seen_preview = None, None, None
        while True:
            terminal = record.get("status") in TERMINAL
            if record.get("status") != status and not terminal:
                status = record.get("status")
                yield sse(JOB_STATUS, status_payload(record))
            progress = record.get("progress")
            if progress is not None and progress != seen_progress and not terminal:
                seen_progress = progress
                yield sse(JOB_PROGRESS, progress_payload(job_id, record["status"], **progress))
            preview = record.get("preview")
            if preview is not None and preview != seen_preview:
                seen_preview = preview
                yield sse(PARTIAL, preview)
            if terminal:
                if record["status"] == "succeeded":
                    ctx = self._context(record)
                    for index, image in enumerate(record.get("images", [])):
                        data = await asyncio.to_thread(self.store.get_bytes, image["key"])
                        yield sse(COMPLETED, ctx.completed(data, index))
                yield sse(JOB_STATUS, status_payload(record))
                return
            await asyncio.sleep(self.poll_s)
            record = await asyncio.to_thread(self.store.get_job, job_id)

    @staticmethod
    def _context(record: dict[str, Any]) -> StreamContext:
        settings = record.get("settings", {})
        width, _, height = settings.get("size", "0x0").partition("x")
        return StreamContext.of(
            width=int(width),
            height=int(height),
            quality=settings.get("quality"),
            background=settings.get("background"),
            output_format=settings.get("output_format", "png"),
            seed=record.get("seed", 0),
            output_compression=settings.get("output_compression"),
        )


__all__ = ["TERMINAL", "JobManager", "LiveJob", "cancel_key"]
