"""The in-process target: the same workload straight on ``serve.pipeline.Pipeline``, no serving stack.

One worker runs one ``generate_batch`` at a time over whatever is queued, up to the batch limit:
``min(C, max_batch)`` in closed loop (C clients -> batches of up to C, capped like the served
Denoiser's ``max_batch_size``, 8 by default), ``max_batch`` in open loop (requests join the
queue at their arrival times). No HTTP, no Ray, no storage
writes: this is the limit the served system approaches. ``serve.pipeline`` (torch) is imported
only when the target starts.

**Threads: a fixed count per target.** More threads are not always faster, and which count
wins depends on the batch and on the load: on the 2-core dev machine the tiny model at 64x64 ran a
c=1 request in ~190 ms with 1 thread and ~550 ms with 2; a batch of 8, timed alone, took 462 ms
with 1 and 397 ms with 2, yet under a closed loop of 8 clients 2 threads gave 10.3-10.6 img/s and
1 thread 16.4-17.7. A calibration on an idle batch picked the slower count, so the bench no longer
calibrates: it runs one in-process target per thread count (``bench/cli.py``) under the same load,
and the goals take the best of them in each round (``BenchResult.goals``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bench.runner import Level, Response

logger = logging.getLogger(__name__)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class InProcessTarget:
    name = "in-process"

    def __init__(
        self,
        model: str | None = None,
        *,
        max_batch: int = 8,
        torch_threads: int | None = None,
        backend: str = "torch",
        device: str | None = None,
        name: str | None = None,
        torch_options: dict[str, Any] | None = None,
        step_cache: dict[str, Any] | None = None,
        gil_switch_interval_ms: float | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.torch_threads = torch_threads
        self.backend = backend
        self.device = device
        self.torch_options = torch_options
        self.step_cache = step_cache
        # The app's GIL switch interval (AppConfig), set in this process while the target runs:
        # the baseline's model thread shares the process with the bench's event loop.
        self.gil_switch_interval_ms = gil_switch_interval_ms
        self._saved_interval: float | None = None
        if name:
            self.name = name
        self.batch_limit = max_batch
        self._pipe: Any = None
        self._threads: int | None = None
        self._info: Any = None
        self._queue: list[tuple[Any, asyncio.Future, float]] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> dict[str, Any]:
        def load() -> tuple[Any, Any, int]:
            import torch

            from serve.model import read_model_info, resolve_source
            from serve.pipeline import Pipeline

            if self.torch_threads:
                torch.set_num_threads(self.torch_threads)
            from deployments.config import StepCacheConfig, TorchConfig

            options = TorchConfig.model_validate(self.torch_options).options() if self.torch_options else None
            cache = StepCacheConfig.model_validate(self.step_cache).message() if self.step_cache else None
            source = resolve_source(self.model)
            pipe = Pipeline.load(
                source, backend=self.backend, device=self.device, torch_options=options, step_cache=cache
            )
            pipe.denoiser.warm_up(self.max_batch)  # as the served Denoiser does at load (traces only)
            return pipe, read_model_info(source), torch.get_num_threads()

        t0 = time.perf_counter()
        if self.gil_switch_interval_ms is not None:
            from serve.gil import set_gil_switch_interval

            self._saved_interval = set_gil_switch_interval(self.gil_switch_interval_ms)
        self._pipe, self._info, threads = await asyncio.to_thread(load)
        self._threads = threads  # what every batch runs with
        self._wake = asyncio.Event()
        self._worker = asyncio.create_task(self._run())
        return {
            "kind": "in-process",
            "model": str(self._info.path),
            "backend": self.backend,
            "torch_threads": threads,
            "torch_options": self.torch_options,
            "step_cache": self.step_cache,
            "gil_switch_interval_ms": self.gil_switch_interval_ms,
            "max_batch_open_loop": self.max_batch,
            "load_s": round(time.perf_counter() - t0, 3),
        }

    def _generate(self, params: list[Any]) -> Any:
        """One batch, in a worker thread, with the target's thread count set in that thread: torch
        applies ``set_num_threads`` to a thread only until its OpenMP team exists, so a pool
        thread that already ran with another count would keep it (measured: 1 thread set in the
        main thread ran at the 2-thread speed in the worker, c=1 p50 464-521 ms against 156 ms)."""
        import torch

        if self._threads:
            torch.set_num_threads(self._threads)
        return self._pipe.generate_batch(params)

    def configure(self, level: Level) -> None:
        # Closed loop: C clients -> batches of up to C, capped like the Denoiser's max_batch_size.
        self.batch_limit = min(level.concurrency, self.max_batch) if level.mode == "closed" else self.max_batch

    async def send(self, body: dict[str, Any]) -> Response:
        from serve.api.schemas import parse_generation_request
        from serve.errors import DarkroomError

        try:
            params = parse_generation_request(body).to_params(default_size=self._info.native_size)
        except DarkroomError as exc:
            return Response(exc.status_code, error=exc.message[:300])
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        if self._wake is None:
            raise RuntimeError("InProcessTarget.send() before start()")
        self._queue.append((params, future, time.perf_counter()))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        if self._wake is None:
            raise RuntimeError("InProcessTarget worker before start()")
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._queue = self._queue[: self.batch_limit], self._queue[self.batch_limit :]
            began = time.perf_counter()
            try:
                results = await asyncio.to_thread(self._generate, [p for p, _, _ in batch])
            except Exception as exc:  # the whole batch fails, like a failed stage call
                logger.exception("in-process batch failed")
                for _, future, _ in batch:
                    if not future.done():
                        future.set_result(Response(500, error=f"{type(exc).__name__}: {exc}"[:300]))
                continue
            finished = time.perf_counter()
            for (_, future, queued), result in zip(batch, results, strict=True):
                t = result.timings
                timings = {
                    "encode": _ms(t["encode"]),
                    "denoise": _ms(t["denoise"]),
                    "decode": _ms(t["decode"] + t.get("image_encode", 0.0)),
                    "storage": 0.0,
                    "encode_queue": _ms(began - queued),
                    "denoise_queue": 0.0,
                    "decode_queue": 0.0,
                    "encode_batch": float(len(batch)),
                    "denoise_batch": float(len(batch)),
                    "decode_batch": float(len(batch)),
                    "total": _ms(finished - queued),
                }
                if not future.done():
                    future.set_result(Response(200, images=len(result.images), timings=timings))

    async def close(self) -> None:
        if self._saved_interval is not None:
            import sys

            sys.setswitchinterval(self._saved_interval)
            self._saved_interval = None
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for _, future, _ in self._queue:
            if not future.done():
                future.set_result(Response(0, error="target closed"))
        self._queue = []
