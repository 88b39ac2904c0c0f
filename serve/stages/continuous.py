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
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

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
    lora: dict[str, float] | None = None  # adapter-cache hits/misses of its admission


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
    ) -> None:
        self.denoiser = denoiser
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
        # Its adapters load here, in a worker thread, before it joins: steps of the running batch
        # never wait for a load. They stay pinned in the cache until it leaves.
        loading = asyncio.ensure_future(asyncio.to_thread(self._pin_loras, job))
        try:
            pins, lora = await asyncio.shield(loading)
        except asyncio.CancelledError:  # the load finishes anyway: unpin what it pinned
            loading.add_done_callback(lambda f: f.exception() is None and f.result()[0].close())
            raise
        entry = _Entry(job, asyncio.get_running_loop().create_future(), lora=lora)
        self._pending.append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        self._wakeup.set()
        try:
            return await asyncio.shield(entry.future)
        except asyncio.CancelledError:
            entry.cancelled = True  # the loop drops it before the next step
            raise
        finally:
            pins.close()

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

    def _admit(self, active: list[_Entry]) -> list[_Entry]:
        if self.lora_batching == "one_group":
            return self._admit_one_group(active)
        new = []
        while self._pending and len(active) + len(new) < self.max_requests:
            entry = self._pending.popleft()
            if not entry.cancelled:
                new.append(entry)
        return new

    def _admit_one_group(self, active: list[_Entry]) -> list[_Entry]:
        from serve.lora.policy import adapter_set, one_group_admission

        pending = [e for e in self._pending if not e.cancelled]
        keys = [adapter_set(e.job.loras) for e in pending]
        chosen = one_group_admission(keys, [adapter_set(e.job.loras) for e in active], self.max_requests - len(active))
        new = [pending[i] for i in chosen]
        self._pending = deque(e for e in pending if e not in new)
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
                logger.exception("denoising step failed for %d request(s)", len(active))
                for entry in active:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                active = []
                continue
            dt = time.perf_counter() - t0
            self.steps += steps
            self.peak_requests = max(self.peak_requests, len(active))
            still = []
            for entry in active:
                entry.compute_s += dt
                entry.batch_max = max(entry.batch_max, len(active))
                if entry.cancelled or entry.future.done():
                    continue
                if entry.state.done:
                    result = self.denoiser.result(entry.state)
                    extra = dict(entry.lora) if entry.lora else {}
                    entry.future.set_result(
                        StageResult(result, entry.compute_s, batch_size=entry.batch_max, extra=extra)
                    )
                else:
                    still.append(entry)
            active = still
