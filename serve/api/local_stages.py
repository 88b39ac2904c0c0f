"""An in-process ``StageClient``: the stages as plain objects in this process, no Ray.

Runs each call in a worker thread (model work must not block the event loop) under one lock
per stage, like a single replica with batch size 1. Used by unit tests of the HTTP layer and
by anything that wants the API without a cluster.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from serve.pipeline import Pipeline
from serve.stages.messages import DecodeRequest, DenoiseJob, StageResult
from serve.storage import ResultStore


class LocalStages:
    def __init__(self, pipeline: Pipeline, store: ResultStore) -> None:
        self.pipeline = pipeline
        self.store = store
        self._locks = {name: threading.Lock() for name in ("encode", "denoise", "decode")}

    async def _call(self, name: str, fn, *args):
        def locked():
            with self._locks[name]:
                return fn(*args)

        return await asyncio.to_thread(locked)

    async def encode(self, texts: list[str], loras: tuple[tuple[str, float], ...] = ()) -> StageResult:
        return (await self._call("encode", self.pipeline.text_encoder.encode_requests, [(texts, loras)]))[0]

    async def denoise(self, job: DenoiseJob) -> StageResult:
        self.pipeline.denoiser.validate(job)
        return (await self._call("denoise", self.pipeline.denoiser.denoise_requests, [job]))[0]

    async def decode(self, latents: np.ndarray, request: DecodeRequest) -> StageResult:
        self.pipeline.decoder.validate(latents)
        batch = [(latents, request)]
        return (await self._call("decode", self.pipeline.decoder.decode_requests, batch, self.store))[0]

    async def ready(self) -> dict[str, str]:
        return {"TextEncoder": "ok", "Denoiser": "ok", "Decoder": "ok"}
