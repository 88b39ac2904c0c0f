"""Ray-free batching for the short stages, and the one model thread of a colocated replica.

``BatchQueue`` batches calls to a function of a list (the TextEncoder's ``encode_requests``, the
Decoder's VAE call) the way ``@serve.batch`` does for the split deployments, with one difference
measured in bench/results: it seals a batch when the model is free, not when the previous batch
starts, so requests that arrive during a batch all ride the next one. The policy is a pure
function of ``(queued, oldest wait, busy)`` (house style 6): tests pass the clock in.

``ModelThread`` is an executor with one worker that counts the calls waiting for it: every stage
of a colocated replica runs its torch work there (two torch calls at once from two threads would
each start an OpenMP team on the same cores), and the Denoiser's step loop asks it whether
another stage is waiting, to hand the thread over after the current step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchPolicy:
    """At most ``max_batch_size`` items per call; a partial batch waits ``batch_wait_timeout_s``
    for more (0: start at once, and whatever queues during a call rides the next one)."""

    max_batch_size: int
    batch_wait_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")


def batch_to_start(queued: int, oldest_wait_s: float, busy: bool, policy: BatchPolicy) -> int:
    """How many queued items to start now (0: not yet).

    Worked example, ``max_batch_size=8``, wait 0.01 s: 3 queued whose oldest waited 0.004 s ->
    0 (wait for more); the same at 0.012 s -> 3; 11 queued -> 8 at once; anything while a batch
    runs (``busy``) -> 0, so arrivals during a batch gather for the next one.
    """
    if busy or queued <= 0:
        return 0
    if queued >= policy.max_batch_size or oldest_wait_s >= policy.batch_wait_timeout_s:
        return min(queued, policy.max_batch_size)
    return 0


class ModelThread(Executor):
    """One worker thread for every stage's torch work, counting the calls not yet started."""

    def __init__(self, name: str = "darkroom-model") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._queued = 0

    @property
    def queued(self) -> int:
        """Calls submitted and not yet started (the one running does not count)."""
        return self._queued

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            self._queued += 1

        def run() -> Any:
            with self._lock:
                self._queued -= 1
            return fn(*args, **kwargs)

        try:
            return self._pool.submit(run)
        except BaseException:
            with self._lock:
                self._queued -= 1
            raise

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


@dataclass(eq=False)
class _Item(Generic[T]):
    value: T
    future: asyncio.Future
    enqueued: float


class BatchQueue(Generic[T, R]):
    """``await queue.submit(item)`` -> ``fn(batch)[i]`` for the item's place ``i`` in its batch.

    ``fn`` takes a list of items and returns one result per item, in order; it runs in
    ``executor`` (None: asyncio's default pool), one batch at a time. If it raises, every item of
    that batch gets the exception. An item whose caller is cancelled before its batch starts
    never runs. ``report(waiting, running)``, when given, hears every change of the items queued
    and in the running batch (the colocated replica's queue-length and in-flight gauges).
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        policy: BatchPolicy,
        *,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
        report: Callable[[int, int], None] | None = None,
    ) -> None:
        self.fn = fn
        self.report = report
        self.running = 0  # items in the batch being computed
        self.policy = policy
        self.executor = executor
        self.clock = clock
        self._queue: deque[_Item[T]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0  # calls made, for tests and metrics
        self.last_batch_size = 0

    @property
    def waiting(self) -> int:
        """Items queued and not yet in a batch."""
        return len(self._queue)

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        entry = _Item(item, loop.create_future(), self.clock())
        self._queue.append(entry)
        self._report()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        self._wakeup.set()
        return await entry.future

    def _report(self) -> None:
        if self.report is not None:
            self.report(len(self._queue), self.running)

    def _take(self, count: int) -> list[_Item[T]]:
        batch: list[_Item[T]] = []
        while self._queue and len(batch) < count:
            entry = self._queue.popleft()
            if not entry.future.done():  # a cancelled caller's item is dropped here
                batch.append(entry)
        return batch

    async def _run(self) -> None:
        if self._wakeup is None:
            raise RuntimeError("BatchQueue worker before submit()")
        loop = asyncio.get_running_loop()
        while True:
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = self.clock() - self._queue[0].enqueued
            count = batch_to_start(len(self._queue), oldest, False, self.policy)
            if count == 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self.policy.batch_wait_timeout_s - oldest)
                except asyncio.TimeoutError:
                    pass
                continue
            batch = self._take(count)
            if not batch:
                continue
            self.batches += 1
            self.last_batch_size = len(batch)
            self.running = len(batch)
            self._report()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [e.value for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # the batch fails; the queue carries on
                self.running = 0
                self._report()
                logger.exception("batch of %d failed", len(batch))
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                continue
            for entry, result in zip(batch, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
            self.running = 0
            self._report()


__all__ = ["BatchPolicy", "BatchQueue", "ModelThread", "batch_to_start"]
