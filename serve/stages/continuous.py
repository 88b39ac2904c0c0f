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
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from serve.metrics import NO_METRICS, Metrics
from serve.stages.denoiser import Denoiser
from serve.stages.messages import DenoiseJob, StageResult

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Entry:
    job: DenoiseJob
    future: asyncio.Future
    state: Any = None
    cancelled: bool = False
    compute_s: float = 0.0  # wall time of the steps this request took part in
    batch_max: int = 0  # most requests it shared a step with


class ContinuousDenoiser:
    """Admits queued jobs before every step, up to ``max_requests`` in flight at once."""

    def __init__(
        self,
        denoiser: Denoiser,
        *,
        max_requests: int = 8,
        step_delay_s: float = 0.0,
        executor: Executor | None = None,
        interrupt: Callable[[], bool] | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.denoiser = denoiser
        self.metrics = metrics
        self.max_requests = max_requests
        # Where steps run (None: asyncio's default thread pool). The colocated profile gives every
        # stage one model thread, so the encoder, denoiser and decoder never run torch at once
        # (two calls at once would each start their own OpenMP team on the same cores), and
        # ``interrupt`` says when another stage waits for that thread: the step loop then hands
        # it over after the current step instead of running until its batch changes.
        self.executor = executor
        self.interrupt = interrupt
        # Fault-injection hook (0 in production): sleep after every UNet step, so tests can make
        # a request certainly outlast a timeout whatever the machine's speed.
        self.step_delay_s = step_delay_s
        self._pending: deque[_Entry] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.peak_requests = 0  # most requests in one step so far (tests, metrics)
        self.steps = 0

    async def submit(self, job: DenoiseJob) -> StageResult:
        """Denoise one job; its latents come back when its own steps are done."""
        self.denoiser.validate(job)  # a bad job fails alone, before it joins anything
        entry = _Entry(job, asyncio.get_running_loop().create_future())
        self._pending.append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        self._wakeup.set()
        try:
            return await asyncio.shield(entry.future)
        except asyncio.CancelledError:
            entry.cancelled = True  # the loop drops it before the next step
            raise

    def _admit(self, active: list[_Entry]) -> list[_Entry]:
        new = []
        while self._pending and len(active) + len(new) < self.max_requests:
            entry = self._pending.popleft()
            if not entry.cancelled:
                new.append(entry)
        return new

    def _advance(self, new: list[_Entry], active: list[_Entry]) -> int:
        """Worker thread: start the newcomers' states, then step everyone until something changes.

        Steps continue in this thread while the batch is unchanged (a hop to the event loop per
        step cost ~4 ms, 40% of a tiny-model step); it returns to admit a newcomer, hand back a
        finished request or drop a cancelled one. Returns the number of steps taken.
        """
        for entry in new:
            entry.state = self.denoiser.start(entry.job)
        states = [e.state for e in active]
        steps = 0
        while True:
            self.denoiser.step(states)
            steps += 1
            if self.step_delay_s > 0:
                time.sleep(self.step_delay_s)
            if self._pending or any(s.done for s in states) or any(e.cancelled for e in active):
                return steps
            if self.interrupt is not None and self.interrupt():
                return steps

    async def _run(self) -> None:
        active: list[_Entry] = []
        while True:
            new = self._admit(active)
            active += new
            self.metrics.set("darkroom_queue_length", len(self._pending))
            self.metrics.set("darkroom_inflight_requests", len(active))
            if not active:
                self._wakeup.clear()
                if not self._pending:
                    await self._wakeup.wait()
                continue
            t0 = time.perf_counter()
            try:
                if self.executor is None:
                    steps = await asyncio.to_thread(self._advance, new, active)
                else:
                    steps = await asyncio.get_running_loop().run_in_executor(self.executor, self._advance, new, active)
            except Exception as exc:  # the batch fails; the loop (and the replica) carry on
                ids = ",".join(e.job.request_id or "-" for e in active)
                logger.exception("denoising step failed for %d request(s): %s", len(active), ids)
                for entry in active:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                active = []
                continue
            dt = time.perf_counter() - t0
            self.steps += steps
            self.metrics.inc("darkroom_denoise_steps_total", steps * len(active))
            for _ in range(steps):  # every step of this stretch had the same batch
                self.metrics.observe("darkroom_step_seconds", dt / steps)
                self.metrics.observe("darkroom_batch_size", len(active))
            self.peak_requests = max(self.peak_requests, len(active))
            still = []
            for entry in active:
                entry.compute_s += dt
                entry.batch_max = max(entry.batch_max, len(active))
                if entry.cancelled or entry.future.done():
                    continue
                if entry.state.done:
                    result = self.denoiser.result(entry.state)
                    entry.future.set_result(StageResult(result, entry.compute_s, batch_size=entry.batch_max))
                else:
                    still.append(entry)
            active = still
