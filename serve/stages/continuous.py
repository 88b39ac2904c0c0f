"""Continuous batching for the Denoiser: requests join and leave the batch between denoiser steps.

Window batching (``@serve.batch``) makes a request that arrives while a batch runs wait for that
whole batch (tens of steps), and seals the next batch as soon as the current one starts, so
batches stay small under load (measured in bench/results: 3.9 requests per batch at 8 clients
where 8 fit). Here every request keeps its own scheduler, generator and timestep (as in one
``Denoiser.denoise`` call), so nothing stops a new request from joining at the next step: it
waits at most one denoiser call, and the batch refills as requests finish.

Ray-free: the Denoiser deployment runs one of these per replica; tests drive it with asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from serve.metrics import NO_METRICS, Metrics
from serve.stages.denoiser import Denoiser
from serve.stages.messages import DenoiseJob, DenoiseProgress, StageResult
from serve.stages.progress import EventChannel

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Entry:
    job: DenoiseJob
    future: asyncio.Future | None = None  # submit(): the result; stream(): None
    channel: EventChannel | None = None  # stream(): progress, partial images and the result
    state: Any = None
    cancelled: bool = False
    cancelled_at: int | None = None  # the loop's step count when the cancel was seen
    finished: bool = False
    compute_s: float = 0.0  # wall time of the steps this request took part in
    batch_max: int = 0  # most requests it shared a step with
    lora: dict[str, float] | None = None  # adapter-cache hits/misses of its admission
    latents: Any = None  # its final latents, taken in the stepping thread when it finished
    decoded_s: float = 0.0  # the ``on_done`` pass that took its latents (colocated: its VAE pass)
    admitted: bool = False  # taken into the running batch (its state steps in the worker thread)
    # Unpins its adapters: called once, when it is out of the batch (``leave``). A cancelled
    # request keeps them pinned until the step that uses them has finished, so an eviction for
    # another request's load never pulls an adapter out from under a running step.
    release: Callable[[], None] | None = None

    def leave(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()

    def cancel(self, steps: int) -> None:
        if not self.cancelled:
            self.cancelled, self.cancelled_at = True, steps

    def finish(self, outcome: StageResult | BaseException) -> None:
        if self.finished:
            return
        self.finished = True
        if self.channel is not None:
            self.channel.finish(outcome)
        elif isinstance(outcome, asyncio.CancelledError):
            self.future.cancel()  # its caller is gone: nothing to hand back
        elif isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)
        self.leave()


class ContinuousDenoiser:
    """Admits queued jobs before every step, up to ``max_requests`` in flight at once."""

    def __init__(
        self,
        denoiser: Denoiser,
        *,
        max_requests: int = 8,
        step_delay_s: float = 0.0,
        lora_batching: str = "mixed",
        executor: Executor | None = None,
        interrupt: Callable[[], bool] | None = None,
        on_done: Callable[[list[Any]], None] | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.denoiser = denoiser
        self.metrics = metrics
        self.max_requests = max_requests
        # "mixed": adapters share the batch; "one_group": the baseline, one adapter set at a time
        # (serve/lora/policy.py).
        self.lora_batching = lora_batching
        # Where steps run (None: asyncio's default thread pool). The colocated profile gives every
        # stage one model thread, so the encoder, denoiser and decoder never run torch at once
        # (two calls at once would each start their own OpenMP team on the same cores), and
        # ``interrupt`` says when another stage waits for that thread: the step loop then hands
        # it over after the current step instead of running until its batch changes. Adapter
        # loads (``_pin_loras``) never run there: they stay on asyncio's default pool, so a load
        # never holds up another request's steps.
        self.executor = executor
        self.interrupt = interrupt
        # Called in the stepping thread with the final latents of the requests that finished in
        # a stretch, before the thread returns: the colocated profile decodes them there, in one
        # VAE pass and with no hop back to the model thread (ColocatedStages). Its errors are
        # logged, never the requests' (their latents come back either way).
        self.on_done = on_done
        # Fault-injection hook (0 in production): sleep after every UNet step, so tests can make
        # a request certainly outlast a timeout whatever the machine's speed.
        self.step_delay_s = step_delay_s
        self._pending: deque[_Entry] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.peak_requests = 0  # most requests in one step so far (tests, metrics)
        self.steps = 0  # denoiser steps taken (counted as they finish, in the stepping thread)
        self.in_flight = 0  # requests in the running batch
        self.stretches = 0  # calls into the stepping thread (each a hop from the event loop and back)
        self.max_cancel_lag = 0  # most steps a cancelled request stayed in the batch after its cancel
        self._records: list[tuple[float, int]] = []  # (seconds, requests) of steps not yet recorded
        self._loop: asyncio.AbstractEventLoop | None = None

    def stats(self) -> dict[str, int]:
        """What the loop is doing now: for tests and metrics (cheap; no lock needed)."""
        return {
            "in_flight": self.in_flight,
            "queued": len(self._pending),
            "steps": self.steps,
            "stretches": self.stretches,
            "peak_requests": self.peak_requests,
            "max_cancel_lag_steps": self.max_cancel_lag,
        }

    def _enqueue(self, entry: _Entry) -> None:
        self._pending.append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        self._wakeup.set()

    async def _load_loras(self, job: DenoiseJob) -> tuple[contextlib.ExitStack, dict[str, float] | None]:
        """The job's adapters, loaded in a worker thread (asyncio's default pool, never the
        executor that runs steps) before it joins: steps of the running batch never wait for a
        load. They stay pinned in the cache until the caller closes the returned stack. A job
        without adapters has nothing to load: no thread hop (at one client it cost ~0.5 ms)."""
        if not job.loras:
            return contextlib.ExitStack(), None
        loading = asyncio.ensure_future(asyncio.to_thread(self._pin_loras, job))
        try:
            return await asyncio.shield(loading)
        except asyncio.CancelledError:  # the load finishes anyway: unpin what it pinned
            loading.add_done_callback(lambda f: f.exception() is None and f.result()[0].close())
            raise

    @staticmethod
    def _unpin_when_out(entry: _Entry, pins: contextlib.ExitStack) -> None:
        """The request's adapters are unpinned now if it is out of the batch (done, or never
        admitted), else by the loop when it drops it after the running step (``_Entry.leave``)."""
        entry.release = pins.close
        if entry.finished or not entry.admitted:
            entry.leave()

    async def submit(self, job: DenoiseJob) -> StageResult:
        """Denoise one job; its latents come back when its own steps are done."""
        self.denoiser.validate(job)  # a bad job fails alone, before it joins anything
        pins, lora = await self._load_loras(job)
        entry = _Entry(job, future=asyncio.get_running_loop().create_future(), lora=lora)
        try:
            self._enqueue(entry)
            try:
                return await asyncio.shield(entry.future)
            except asyncio.CancelledError:
                entry.cancel(self.steps)  # the loop drops it before the next step
                raise
        finally:
            self._unpin_when_out(entry, pins)

    def _pin_loras(self, job: DenoiseJob) -> tuple[contextlib.ExitStack, dict[str, float] | None]:
        stack = contextlib.ExitStack()
        runtime = self.denoiser.lora
        if not job.loras or runtime is None:
            stack.enter_context(self.denoiser.use_loras(job))  # refuses loras it cannot serve
            return stack, None
        before = (runtime.cache.hits, runtime.cache.misses)
        stack.enter_context(self.denoiser.use_loras(job))
        # Approximate under concurrent admissions (counters are shared); exact when admitted alone.
        hits, misses = runtime.cache.hits - before[0], runtime.cache.misses - before[1]
        return stack, {"lora_hits": float(hits), "lora_misses": float(misses)}

    async def stream(self, job: DenoiseJob) -> AsyncIterator[DenoiseProgress | StageResult]:
        """``submit`` with progress: ``DenoiseProgress`` after admission (step 0) and after steps
        (coalesced, with the partial images the job asked for), then the ``StageResult``.
        Closing the iterator early (the client left) takes the job out before the next step."""
        self.denoiser.validate(job)
        pins, lora = await self._load_loras(job)
        entry = _Entry(job, channel=EventChannel(asyncio.get_running_loop()), lora=lora)
        try:
            self._enqueue(entry)
            try:
                async for item in entry.channel:
                    yield item
            finally:
                if not entry.finished:
                    entry.cancel(self.steps)
        finally:
            self._unpin_when_out(entry, pins)

    def _admit(self, active: list[_Entry]) -> list[_Entry]:
        if self.lora_batching == "one_group":
            return self._admit_one_group(active)
        new = []
        while self._pending and len(active) + len(new) < self.max_requests:
            entry = self._pending.popleft()
            if entry.cancelled:
                entry.leave()
            else:
                entry.admitted = True
                new.append(entry)
        return new

    def _admit_one_group(self, active: list[_Entry]) -> list[_Entry]:
        from serve.lora.policy import adapter_set, one_group_admission

        for entry in self._pending:
            if entry.cancelled:
                entry.leave()
        pending = [e for e in self._pending if not e.cancelled]
        keys = [adapter_set(e.job.loras) for e in pending]
        chosen = one_group_admission(keys, [adapter_set(e.job.loras) for e in active], self.max_requests - len(active))
        new = [pending[i] for i in chosen]
        for entry in new:
            entry.admitted = True
        self._pending = deque(e for e in pending if e not in new)
        return new

    def _advance(self, new: list[_Entry], active: list[_Entry]) -> None:
        """Worker thread: start the newcomers' states, then step the batch until it empties, or
        until another stage waits for this thread (``interrupt``). ``active`` is the running
        batch, changed here in place.

        The batch changes here too: after each step, requests that finished or were cancelled
        go back to the event loop (``_hand_back``, scheduled with call_soon_threadsafe: the
        thread steps on meanwhile) and queued ones join at once (``mixed`` adapter batching;
        ``one_group`` admission looks at the whole queue, so the stretch returns to the event
        loop when a slot frees). A return to the event loop and back per batch change left the
        model thread idle 3% of the time at 16 clients (gaps of ~5 ms, up to 50), and a hop per
        step cost ~4 ms, 40% of a tiny-model step. Streamed requests get their progress from
        here (``EventChannel.push``: no hop).
        """
        self.stretches += 1
        self._start(new)
        inline = self.lora_batching != "one_group"
        while active:
            t0 = time.perf_counter()
            self.denoiser.step([e.state for e in active])
            dt = time.perf_counter() - t0
            self.steps += 1
            self.peak_requests = max(self.peak_requests, len(active))
            self._records.append((dt, len(active)))
            for entry in active:
                entry.compute_s += dt
                entry.batch_max = max(entry.batch_max, len(active))
                # Only streamed jobs, and then only what they asked for: progress after every
                # step, or just the steps with a partial image.
                if entry.channel is not None and not entry.cancelled:
                    if entry.job.progress or entry.state.preview is not None:
                        entry.channel.push(entry.state.progress())
            if self.step_delay_s > 0:
                time.sleep(self.step_delay_s)
            out = [e for e in active if e.cancelled or e.state.done]
            if out:
                self._leave_batch(out)  # if it raises, they are still in the batch that fails
                gone = set(out)  # not ``cancelled`` again: the event loop may set it meanwhile
                active[:] = [e for e in active if e not in gone]
            if inline:
                joined = self._take(self.max_requests - len(active))
                if joined:
                    active += joined  # before their start: a failing start fails them too
                    self._start(joined)
            elif self._pending and len(active) < self.max_requests:
                break  # one_group: the event loop chooses who joins
            self.in_flight = len(active)
            if self.interrupt is not None and self.interrupt():
                break

    def _start(self, new: list[_Entry]) -> None:
        """Worker thread: the newcomers' states (their start counts as their compute time)."""
        for entry in new:
            t0 = time.perf_counter()
            entry.state = self.denoiser.start(entry.job)
            entry.compute_s += time.perf_counter() - t0
            if entry.channel is not None and entry.job.progress:
                entry.channel.push(entry.state.progress())

    def _take(self, room: int) -> list[_Entry]:
        """Worker thread: up to ``room`` queued requests, in order, for the running batch.

        ``admitted`` is set before ``cancelled`` is read: a request cancelled meanwhile is then
        either seen here (it goes back as cancelled, never stepped) or, if its cancel comes
        after this check, dropped after the next step; either way its adapters stay pinned
        until it is out (``_unpin_when_out``)."""
        new: list[_Entry] = []
        while len(new) < room:
            try:
                entry = self._pending.popleft()
            except IndexError:
                break
            entry.admitted = True
            if entry.cancelled:
                self._leave_batch([entry])
            else:
                new.append(entry)
        return new

    def _leave_batch(self, out: list[_Entry]) -> None:
        """Worker thread: requests out of the batch. Finished ones have their final latents
        taken here and handed to ``on_done`` (the colocated VAE pass, timed apart from the
        Denoiser's compute); all go back to the event loop to be answered."""
        finished = [e for e in out if not e.cancelled]
        for entry in out:
            if entry.cancelled and entry.cancelled_at is not None:
                self.max_cancel_lag = max(self.max_cancel_lag, self.steps - entry.cancelled_at)
        for entry in finished:
            entry.latents = self.denoiser.result(entry.state)
        if finished and self.on_done is not None:
            t0 = time.perf_counter()
            try:
                self.on_done([e.latents for e in finished])
            except Exception:
                logger.exception("on_done failed for %d finished request(s)", len(finished))
            for entry in finished:
                entry.decoded_s = time.perf_counter() - t0
        self._loop.call_soon_threadsafe(self._hand_back, out, self._take_records())

    def _hand_back(self, out: list[_Entry], records: list[tuple[float, int]]) -> None:
        """Event loop: answer the requests that left the batch; record the steps so far."""
        self._record(records)
        for entry in out:
            if entry.cancelled:
                entry.finish(asyncio.CancelledError())
            else:
                extra = dict(entry.lora) if entry.lora else {}
                if entry.decoded_s:  # the service counts it as decode time, not as waiting
                    extra["decoded_s"] = entry.decoded_s
                entry.finish(StageResult(entry.latents, entry.compute_s, batch_size=entry.batch_max, extra=extra))
        self._gauges()

    def _take_records(self) -> list[tuple[float, int]]:
        records, self._records = self._records, []
        return records

    def _record(self, records: list[tuple[float, int]]) -> None:
        if records:
            self.metrics.inc("darkroom_denoise_steps_total", sum(n for _, n in records))
        for dt, n in records:
            self.metrics.observe("darkroom_step_seconds", dt)
            self.metrics.observe("darkroom_batch_size", n)

    def _gauges(self) -> None:
        self.metrics.set("darkroom_queue_length", len(self._pending))
        self.metrics.set("darkroom_inflight_requests", self.in_flight)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        active: list[_Entry] = []
        while True:
            new = self._admit(active)
            active += new
            self.in_flight = len(active)
            self._gauges()
            if not active:
                self._wakeup.clear()
                if not self._pending:
                    await self._wakeup.wait()
                continue
            try:
                if self.executor is None:
                    await asyncio.to_thread(self._advance, new, active)
                else:
                    await self._loop.run_in_executor(self.executor, self._advance, new, active)
            except Exception as exc:  # the batch fails; the loop (and the replica) carry on
                ids = ",".join(e.job.request_id or "-" for e in active)
                logger.exception("denoising step failed for %d request(s): %s", len(active), ids)
                for entry in active:
                    entry.finish(exc)
                active = []
            # Hand-backs scheduled by the thread ran before this line (callbacks run in order).
            self._record(self._take_records())
            self.in_flight = len(active)
