"""An in-process ``StageClient``: the stages as plain objects in this process, no Ray.

Runs each call in a worker thread (model work must not block the event loop) under one lock
per stage, like a single replica with batch size 1. Used by unit tests of the HTTP layer and
by anything that wants the API without a cluster.

A denoising call that is cancelled (the client left, a timeout) stops before its next step:
the worker thread asks a flag before every iteration, so the Denoiser's lock -- its one slot --
is free within one step. ``step_delay_s`` is the same fault-injection hook as the served
Denoiser's (``AppConfig.debug_step_delay_s``; 0 in production).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import numpy as np

from serve.pipeline import Pipeline
from serve.stages.messages import DecodeRequest, DenoiseJob, DenoiseProgress, StageResult
from serve.stages.progress import EventChannel
from serve.storage import ResultStore


class LocalStages:
    def __init__(self, pipeline: Pipeline, store: ResultStore, *, step_delay_s: float = 0.0) -> None:
        self.pipeline = pipeline
        self.store = store
        self.step_delay_s = step_delay_s
        self._locks = {name: threading.Lock() for name in ("encode", "denoise", "decode")}
        self.in_flight = 0  # denoising jobs holding the Denoiser now (0 or 1)
        self.steps = 0  # denoiser iterations taken

    async def _call(self, name: str, fn, *args):
        def locked():
            with self._locks[name]:
                return fn(*args)

        return await asyncio.to_thread(locked)

    async def encode(self, texts: list[str], loras: tuple[tuple[str, float], ...] = ()) -> StageResult:
        return (await self._call("encode", self.pipeline.text_encoder.encode_requests, [(texts, loras)]))[0]

    def _denoise(self, job: DenoiseJob, stop: threading.Event, on_step=None) -> StageResult:
        """Worker thread: one job under the Denoiser's lock, stopping before any step once ``stop`` is set."""

        def stepped(index: int, progress: DenoiseProgress) -> None:
            self.steps += 1
            if on_step is not None and (job.progress or progress.preview is not None):
                on_step(progress)
            if self.step_delay_s > 0:
                time.sleep(self.step_delay_s)

        with self._locks["denoise"]:
            if stop.is_set():
                return StageResult(None, 0.0)
            self.in_flight += 1
            try:
                t0 = time.perf_counter()
                if on_step is not None and job.progress:
                    on_step(DenoiseProgress(0, job.num_inference_steps))  # admitted
                latents = self.pipeline.denoiser.denoise([job], cancelled=lambda _: stop.is_set(), on_step=stepped)[0]
                return StageResult(latents, time.perf_counter() - t0)
            finally:
                self.in_flight -= 1

    async def denoise(self, job: DenoiseJob) -> StageResult:
        self.pipeline.denoiser.validate(job)
        stop = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(self._denoise, job, stop))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()  # the thread leaves before its next step
            raise

    async def denoise_stream(self, job: DenoiseJob) -> AsyncIterator[DenoiseProgress | StageResult]:
        self.pipeline.denoiser.validate(job)
        channel = EventChannel(asyncio.get_running_loop())
        stop = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(self._denoise, job, stop, channel.push))

        def done(task: asyncio.Future) -> None:
            if task.cancelled():
                channel.finish(asyncio.CancelledError())
            elif task.exception() is not None:
                channel.finish(task.exception())
            else:
                channel.finish(task.result())

        work.add_done_callback(done)
        try:
            async for item in channel:
                yield item
        finally:
            stop.set()  # a consumer that left early takes the job out before its next step

    async def decode(self, latents: np.ndarray, request: DecodeRequest) -> StageResult:
        self.pipeline.decoder.validate(latents)
        batch = [(latents, request)]
        return (await self._call("decode", self.pipeline.decoder.decode_requests, batch, self.store))[0]

    async def preview_map(self) -> np.ndarray | None:
        return await self._call("decode", self.pipeline.decoder.preview_map)

    async def ready(self) -> dict[str, str]:
        return {"TextEncoder": "ok", "Denoiser": "ok", "Decoder": "ok"}
