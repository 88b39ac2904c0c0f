"""Async jobs: ``POST /v1/images/jobs``, ``GET /v1/images/jobs/{id}`` (status, progress, latest
preview), ``GET .../events`` (server-sent events) and ``DELETE`` (cancel); jobs survive the
Ingress replica that ran them (leases: serve/api/leases.py).

A job runs as a task in the Ingress replica that took it (its *owner*), which keeps its live state
in memory: progress, the partial images so far, the subscribers of its event streams. The job's
record in the result store (``jobs/<id>.json``) is what every other replica sees: the owner
rewrites it when the job starts denoising, with each partial image, at most every
``job_poll_s`` with its progress, with its lease every third of ``job_lease_s``, and at the end.
So with several Ingress replicas:

- ``GET`` answers from memory on the owner and from the record elsewhere (progress at most
  ``job_poll_s`` old);
- ``GET .../events`` streams live on the owner; elsewhere it polls the record every
  ``job_poll_s`` and sends the same events as they appear there;
- ``DELETE`` cancels at once on the owner (the task is cancelled, the stage calls with it: the
  Denoiser drops the job before its next step); elsewhere it leaves a cancel mark in the store
  (``jobs/cancel/<id>.json``) that the owner polls every ``job_poll_s`` (and that keeps a sweeper
  from resuming the job if its owner died);
- every replica sweeps the active jobs: one whose owner stopped renewing its lease is resumed
  here (same seed, same image keys) or, past ``job_attempts``, ends ``failed`` (``job_lost``).

Statuses: ``queued`` (waiting for the TextEncoder or for a Denoiser slot; again after a
resumption), ``running`` (denoising started), then ``succeeded``, ``failed`` or ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from serve.api.leases import INTERNAL_FIELDS, TERMINAL, JobSweeper, LeasePolicy, active_key, cancel_key, claim_key
from serve.api.live_jobs import LiveJob
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
from serve.errors import DarkroomError, ImagesWithheldError, JobConflictError, NotFoundError
from serve.metrics import NO_METRICS, Metrics
from serve.request_context import bound, current
from serve.stages.messages import DecodedImage

if TYPE_CHECKING:
    from serve.api.schemas import ImageGenerationRequest
    from serve.api.service import ImageService
    from serve.params import GenerationParams

logger = logging.getLogger(__name__)

#: How long DELETE on a replica that does not run the job waits for the owner to end it.
CANCEL_WAIT_POLLS = 3
#: Fields a client never sees: the Ingress's own, and the result's raw keys (GET renders them).
HIDDEN = (*INTERNAL_FIELDS, "images", "preview")


def public(record: dict[str, Any], hide: tuple[str, ...] = INTERNAL_FIELDS) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in hide}


class JobManager(JobSweeper):
    """The jobs of one ``ImageService``: submission, live state, records, leases, streams, cancellation."""

    def __init__(
        self,
        service: ImageService,
        policy: LeasePolicy | None = None,
        *,
        metrics: Metrics = NO_METRICS,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.policy = policy or LeasePolicy(request_timeout_s=service.config.request_timeout_s)
        self.metrics = metrics
        self.owner = owner or uuid.uuid4().hex[:12]
        self.clock = clock  # wall clock of leases (the tests pass their own)
        self.live: dict[str, LiveJob] = {}
        self._tasks: set[asyncio.Task] = set()  # strong refs: the loop only keeps weak ones
        self._sweeper: asyncio.Task | None = None

    @property
    def store(self) -> Any:
        return self.service.store

    @property
    def poll_s(self) -> float:
        return self.service.config.job_poll_s

    # -- store access, timed ---------------------------------------------------------------------
    async def _store(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await asyncio.to_thread(fn, *args)
        except NotFoundError:
            raise
        except Exception:
            self.metrics.inc("darkroom_store_errors_total", op=op)
            raise
        finally:
            self.metrics.observe("darkroom_store_seconds", time.perf_counter() - t0, op=op)

    async def _write(self, live: LiveJob) -> None:
        live.written_at = time.monotonic()
        live.writes += 1
        number, record = live.writes, dict(live.record)
        # An owner whose own lease ran out may have been stalled long enough for another replica
        # to take the job over: read before writing then, and never overwrite the new attempt.
        check = "lease" in record and self.clock() >= float(record["lease"].get("expires", 0.0))

        def put() -> None:
            with live.write_lock:
                if number <= live.written or live.lost:
                    return
                if check and int(self.store.get_job(record["id"]).get("attempt", 1)) != record["attempt"]:
                    live.lost = True
                    return
                self.store.put_job(record["id"], record)
                live.written = number

        try:
            await self._store("job", put)
        except Exception:  # the job goes on; the next write may succeed
            logger.exception("could not record job %s", live.record["id"])
        if live.lost and live.task is not None and live.record.get("status") not in TERMINAL:
            live.task.cancel()

    # -- submit and run -----------------------------------------------------------------------
    async def submit(
        self, request: ImageGenerationRequest, params: GenerationParams, on_end: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Record a new job (attempt 1, leased here) and start it; returns the record as clients see it.
        ``on_end`` runs once when this replica is done with it (whatever the outcome)."""
        now = self.clock()
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
            "request_id": current(),
            # The request as the client sent it, with the resolved seed: another replica resuming
            # the job makes the same images from it.
            "request": {**request.model_dump(mode="json", exclude_unset=True), "seed": params.seed},
            "attempt": 1,
            "lease": self.policy.lease(self.owner, now, now),
        }
        if params.loras:
            record["loras"] = [{"name": n, "scale": s} for n, s in params.loras]  # as the response records them
        try:
            await self._store("claim", self.store.put_json_if_absent, claim_key(record["id"], 1), {"owner": self.owner})
            await self._store("job", self.store.put_job, record["id"], record)
            await self._store("job", self.store.put_json, active_key(record["id"]), {"id": record["id"]})
        except BaseException:
            if on_end is not None:
                on_end()
            raise
        self.metrics.inc("darkroom_jobs_total", event="submitted")
        self._start(LiveJob(dict(record), self.service.stream_context(request, params), on_end=on_end), request, params)
        return public(record)

    def _start(self, live: LiveJob, request: ImageGenerationRequest, params: GenerationParams) -> None:
        self.live[live.record["id"]] = live
        live.task = asyncio.create_task(self._run(live, request, params))
        self._tasks.add(live.task)
        live.task.add_done_callback(self._tasks.discard)

    async def _run(self, live: LiveJob, request: ImageGenerationRequest, params: GenerationParams) -> None:
        record = live.record
        job_id = record["id"]
        with bound(record.get("request_id")):
            logger.info("job %s: attempt %d running here (owner %s)", job_id, record["attempt"], self.owner)
            helpers = [asyncio.create_task(self._watch_cancel(live)), asyncio.create_task(self._renew(live))]
            deadline = asyncio.get_running_loop().time() + self.service.config.request_timeout_s
            outcome: dict[str, Any]
            try:
                partials = request.partial_images or 0
                develop = self.service.develop(
                    request, params, partials, deadline, progress=True, result_id=job_id, created=record["created"]
                )
                async with contextlib.aclosing(develop) as events:
                    async for item in events:
                        if isinstance(item, Developed):
                            outcome = self._succeeded(live, item.images, item.timings)
                        else:
                            await self._progress(live, item)
            except asyncio.CancelledError:
                if not live.cancel_requested:
                    # Lost to another replica, or this replica is stopping: record nothing (the
                    # lease runs out and a sweep resumes the job); streams here just end.
                    why = "lost its lease" if live.lost else "stopped with its replica"
                    logger.warning("job %s: attempt %d %s", job_id, record["attempt"], why)
                    live.publish(None)
                    self.live.pop(job_id, None)
                    if not live.lost:
                        raise
                    return
                outcome = {"status": "cancelled", "finished": int(time.time())}
            except Exception as exc:  # the job records any failure; the server carries on
                logger.exception("job %s failed", job_id)
                err = exc if isinstance(exc, DarkroomError) else DarkroomError(f"generation failed: {exc}")
                outcome = {"status": "failed", "finished": int(time.time()), **err.to_openai()}
            finally:
                for helper in helpers:
                    helper.cancel()
                if live.on_end is not None:
                    live.on_end()
            await self._finish(live, outcome)

    async def _progress(self, live: LiveJob, item: Any) -> None:
        record = live.record
        moved = record.get("progress", {}).get("step") != item.step
        record["progress"] = {"step": item.step, "total_steps": item.total_steps}
        changed = record["status"] == "queued"
        if changed:
            record["status"] = "running"
            live.publish(sse(JOB_STATUS, status_payload(public(record))))
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
        self.service._count_images(images)
        if images and all(im.withheld for im in images):
            raise ImagesWithheldError(f"all {len(images)} image(s) were withheld: the image safety check flagged them")
        progress = live.record.get("progress", {})
        total = progress.get("total_steps", 0)
        if progress.get("step") != total:  # the last step's progress can lose the race with the result
            live.publish(sse(JOB_PROGRESS, progress_payload(live.record["id"], live.record["status"], total, total)))
        for index, image in enumerate(images):
            if not image.withheld:
                live.publish(sse(COMPLETED, live.ctx.completed(image.data or b"", index)), keep=True)
        return {
            "status": "succeeded",
            "finished": int(time.time()),
            "progress": {"step": total, "total_steps": total},
            "images": [
                {"withheld": True} if im.withheld else {"key": im.key, "content_type": im.content_type} for im in images
            ],
            "timings": timings,
        }

    async def _finish(self, live: LiveJob, outcome: dict[str, Any]) -> None:
        live.record.update(outcome)  # terminal from here on: DELETE no longer interrupts it
        live.record.pop("lease", None)
        if outcome["status"] == "succeeded":
            live.record.pop("preview", None)  # the result has the images (a cancelled job keeps its last)
        job_id = live.record["id"]
        try:
            try:
                current_record = await self._store("job", self.store.get_job, job_id)
                taken_over = int(current_record.get("attempt", 1)) != live.record["attempt"]
            except Exception:
                taken_over = False  # unreadable: write ours (the same request, the same keys)
            if taken_over:
                logger.warning(
                    "job %s: attempt %d ended after a takeover; not recorded", job_id, live.record["attempt"]
                )
                return
            await self._write(live)
            self.metrics.inc("darkroom_jobs_total", event=outcome["status"])
            with contextlib.suppress(Exception):
                await self._store("job", self.store.delete, active_key(job_id))
        finally:  # subscribers always hear the end, even if this task is stopped mid-write
            live.publish(sse(JOB_STATUS, status_payload(public(live.record))))
            live.publish(None)
            self.live.pop(job_id, None)

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

    async def _renew(self, live: LiveJob) -> None:
        """Rewrite the lease every third of it, while this attempt still owns the job."""
        record = live.record
        started = float(record["lease"]["started"])
        while True:
            await asyncio.sleep(self.policy.renew_every_s)
            now = self.clock()
            try:
                stored = await self._store("job", self.store.get_job, record["id"])
                if int(stored.get("attempt", 1)) != record["attempt"]:
                    live.lost = True  # another replica took the job over: this attempt is void
                    if live.task is not None:
                        live.task.cancel()
                    return
                if now > started + self.policy.request_timeout_s:
                    return  # stop renewing: the attempt's own time limit ends it
                record["lease"] = self.policy.lease(self.owner, started, now)
                await self._write(live)
            except asyncio.CancelledError:
                raise
            except Exception:  # a missed renewal is survivable; the next one may work
                logger.warning("job %s: lease renewal failed", record["id"], exc_info=True)

    async def _resume(self, record: dict[str, Any]) -> None:
        """Run a job another replica lost, as ``record`` (its next attempt, claimed and leased here).
        Raises ``DarkroomError`` when its recorded request no longer parses (the job then fails)."""
        request, params = self.service.parse(record["request"])
        await self._store("job", self.store.put_job, record["id"], record)
        self._start(LiveJob(record, self.service.stream_context(request, params)), request, params)

    async def close(self) -> None:
        """Stop sweeping and cancel this replica's attempts (their leases run out; others resume them)."""
        tasks = [t for t in (self._sweeper, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    # -- read -----------------------------------------------------------------------------------
    async def get(self, job_id: str, base_url: str) -> dict[str, Any]:
        live = self.live.get(job_id)
        record = dict(live.record) if live is not None else await asyncio.to_thread(self.store.get_job, job_id)
        if record.get("status") != "succeeded":
            return public(record)
        images = [
            DecodedImage("", "", None, withheld=True)
            if im.get("withheld")
            else DecodedImage(im["key"], im["content_type"], None)
            for im in record.get("images", [])
        ]
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
        out = public(record, HIDDEN)
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
            return 200, public(live.record, HIDDEN)
        if live is not None and live.task is not None:  # ending right now: wait for its final record
            await asyncio.wait({live.task}, timeout=self.service.config.stage_timeout_s)
        record = await asyncio.to_thread(self.store.get_job, job_id)
        if record.get("status") in TERMINAL:
            if record["status"] == "cancelled":
                return 200, public(record, HIDDEN)  # DELETE is idempotent
            raise JobConflictError(f"job {job_id} already {record['status']}: nothing to cancel")
        await asyncio.to_thread(self.store.put_json, cancel_key(job_id), {"requested": int(time.time())})
        for _ in range(CANCEL_WAIT_POLLS):
            await asyncio.sleep(self.poll_s)
            record = await asyncio.to_thread(self.store.get_job, job_id)
            if record.get("status") in TERMINAL:
                break
        status = 200 if record.get("status") == "cancelled" else 202
        return status, {**public(record, HIDDEN), "cancel_requested": True}

    # -- events ---------------------------------------------------------------------------------
    async def events(self, job_id: str, base_url: str) -> AsyncIterator[bytes]:
        """The SSE body of ``GET .../events``; an unknown job raises (404) before anything is sent."""
        live = self.live.get(job_id)
        if live is not None:
            # Snapshot and subscribe with no await in between: every later event reaches the
            # queue, every earlier one is in the replay, none in both.
            record = live.record
            replay = [sse(JOB_STATUS, status_payload(public(record)))]
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
                yield sse(JOB_STATUS, status_payload(public(record)))
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
                        if image.get("withheld"):
                            continue
                        data = await asyncio.to_thread(self.store.get_bytes, image["key"])
                        yield sse(COMPLETED, ctx.completed(data, index))
                yield sse(JOB_STATUS, status_payload(public(record)))
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


__all__ = ["TERMINAL", "JobManager", "LiveJob", "cancel_key", "public"]
