"""Progress and partial images of a denoising job, from the stepping thread to an async consumer.

The Denoiser steps in a worker thread (serve/stages/continuous.py, LocalStages); a streamed job's
consumer is a coroutine on the event loop. ``EventChannel`` carries ``DenoiseProgress`` items
across with ``loop.call_soon_threadsafe`` (microseconds per step, and only for jobs that stream)
and hands them out coalesced: a consumer that falls behind gets the latest progress, every
partial image, and the result, never a backlog of stale steps. Progress-only items are also
spaced at least ``PROGRESS_INTERVAL_S`` apart, so a fast model does not turn every step of every
streamed request into a message across Ray; partial images and the result are never held back.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from serve.stages.messages import DenoiseProgress, StageResult

#: Least time between two progress-only items of one job (10 a second keep a progress bar smooth).
PROGRESS_INTERVAL_S = 0.1


def preview_iterations(iterations: int, partial_images: int) -> tuple[int, ...]:
    """After which scheduler iterations (1-based) to draw the ``partial_images`` previews: evenly
    spaced, never the last (that is the final image). Worked example: 20 steps and 3 partial
    images -> after steps 5, 10 and 15; 2 steps and 3 -> after step 1 only (OpenAI's spec lets the
    final image come before all partial images)."""
    if partial_images <= 0 or iterations <= 1:
        return ()
    chosen = {int(iterations * (i + 1) / (partial_images + 1) + 0.5) for i in range(partial_images)}
    return tuple(sorted(i for i in chosen if 1 <= i < iterations))


def scaled_step(iteration: int, iterations: int, steps: int) -> int:
    """Scheduler iterations done -> steps done, for schedulers that iterate more often than
    ``num_inference_steps`` (Heun: 2 * steps - 1 iterations; PNDM: steps + 1)."""
    if iterations <= 0:
        return steps
    return min(steps, (iteration * steps) // iterations)


def should_emit(last_emit: float | None, now: float, interval: float = PROGRESS_INTERVAL_S) -> bool:
    """Whether a progress-only item may go out now (a pure policy of the clock)."""
    return last_emit is None or now - last_emit >= interval


class EventChannel:
    """One streamed job's items: pushed from any thread, read by one coroutine.

    ``push`` (any thread) adds a ``DenoiseProgress``; ``finish`` (the loop's thread) adds the
    ``StageResult`` or an exception, which ends the iteration.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = PROGRESS_INTERVAL_S) -> None:
        self.loop = loop
        self.interval = interval
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()
        self.finished = False

    def push(self, item: DenoiseProgress) -> None:
        """Thread-safe: deliver ``item`` on the loop (cheap: no lock, one wake-up)."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _deliver(self, item: Any) -> None:
        if self.finished:
            return
        last = self._items[-1] if self._items else None
        progress_only = isinstance(item, DenoiseProgress) and item.preview is None
        if progress_only and isinstance(last, DenoiseProgress) and last.preview is None:
            self._items[-1] = item  # a newer step replaces an unread progress-only item
        else:
            self._items.append(item)
        self._ready.set()

    def finish(self, outcome: StageResult | BaseException) -> None:
        """On the loop's thread: the job's result (or its failure) ends the stream."""
        if self.finished:
            return
        self._items.append(outcome)
        self.finished = True
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[DenoiseProgress | StageResult]:
        last_progress: float | None = None
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._items:
                item = self._items.popleft()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, StageResult):
                    yield item
                    return
                if item.preview is None:
                    now = self.loop.time()
                    if not should_emit(last_progress, now, self.interval):
                        continue  # a later step (or the result) follows shortly
                    last_progress = now
                yield item


__all__ = ["PROGRESS_INTERVAL_S", "EventChannel", "preview_iterations", "scaled_step", "should_emit"]
