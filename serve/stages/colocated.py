"""The colocated profile's ``StageClient``: TextEncoder, Denoiser and Decoder in this process.

The split profile runs each stage as its own deployment, so a request makes three stage hops
(Ingress -> TextEncoder -> Ingress -> Denoiser -> Ingress -> Decoder -> Ingress) and every stage
is its own Ray process. On a single-GPU node (or a small CPU machine) nothing is gained by that:
here the stages live in the replica that serves HTTP, with the same batching -- the Denoiser's
continuous batching (``ContinuousDenoiser``), batch queues for the TextEncoder and the Decoder's
VAE -- and no hop, no copy of arrays between processes, and one process instead of four.

All torch work runs in one model thread (``ModelThread``): stages never run torch at once, and
the Denoiser's step loop hands the thread over after the current step when the encoder or the
VAE waits for it. Requests that finish denoising are decoded right there, in the step loop's
stretch that finished them (one VAE pass for all of them, ``decode_batch`` at a time): their
``decode`` then finds the pixels ready instead of queueing for the model thread again (at one
client that hop was ~2 ms; at saturation the requests of a batch, finishing together, reached
the VAE queue one by one). PNG/JPEG encoding and storage writes run outside that thread. The stages load
in the model thread in the background, so the replica answers ``/healthz`` at once and
``/readyz`` names each stage ``loading`` until they are ready.

Ray-free: the colocated ``Ingress`` deployment (``deployments/colocated.py``) builds one per
replica; tests drive it with asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serve.metrics import NO_METRICS, Metrics, for_stage
from serve.stages.batching import BatchPolicy, BatchQueue, ModelThread
from serve.stages.messages import DecodeRequest, DenoiseJob, DenoiseProgress, StageResult

if TYPE_CHECKING:
    import numpy as np

    from serve.stages.decoder import Decoder
    from serve.stages.denoiser import Denoiser
    from serve.stages.text_encoder import TextEncoder
    from serve.storage import ResultStore

logger = logging.getLogger(__name__)

STAGE_NAMES = ("TextEncoder", "Denoiser", "Decoder")


@dataclass(frozen=True)
class ColocatedOptions:
    """Batching of the stages in one replica (the split profile's per-deployment settings)."""

    text_batch: BatchPolicy = field(default_factory=lambda: BatchPolicy(16))
    decode_batch: BatchPolicy = field(default_factory=lambda: BatchPolicy(8))
    max_requests: int = 8  # the Denoiser's requests in flight (its max_batch_size)
    step_delay_s: float = 0.0  # fault-injection hook (AppConfig.debug_step_delay_s), 0 in production
    lora_batching: str = "mixed"  # AppConfig.lora_batching (serve/lora/policy.py)


def _gauges(metrics: Metrics) -> Callable[[int, int], None]:
    """A batch queue's report -> the stage's queue-length and in-flight gauges."""

    def report(waiting: int, running: int) -> None:
        metrics.set("darkroom_queue_length", waiting)
        metrics.set("darkroom_inflight_requests", running)

    return report


class ColocatedStages:
    """A ``StageClient`` over stages loaded by ``load()`` (run in the model thread, in the background)."""

    def __init__(
        self,
        load: Callable[[], tuple[TextEncoder, Denoiser, Decoder]],
        store: ResultStore,
        options: ColocatedOptions | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.store = store
        self.options = options or ColocatedOptions()
        self.metrics = metrics  # the replica's; each stage records under its own ``stage`` label
        self.model_thread = ModelThread()
        self._parts = self.model_thread.submit(load)
        self._parts.add_done_callback(self._log_load)
        self._encode_queue: BatchQueue | None = None
        self._vae_queue: BatchQueue | None = None
        self._denoise_loop: Any = None
        # id(latents) -> (a weak reference to them, the VAE's answer): decoded in the step loop,
        # taken by ``decode``; an entry leaves with its latents if ``decode`` never comes.
        self._decoded: dict[int, tuple[weakref.ref, tuple[np.ndarray, list[bool], float, int]]] = {}

    @classmethod
    def from_stages(
        cls,
        text_encoder: TextEncoder,
        denoiser: Denoiser,
        decoder: Decoder,
        store: ResultStore,
        options: ColocatedOptions | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> ColocatedStages:
        """Over stages already loaded (tests, the in-process pipeline's)."""
        return cls(lambda: (text_encoder, denoiser, decoder), store, options, metrics)

    @staticmethod
    def _log_load(future: Any) -> None:
        if future.exception() is not None:
            logger.error("loading the colocated stages failed: %s", future.exception())

    @property
    def loaded(self) -> bool:
        return self._parts.done() and self._parts.exception() is None

    async def _stages(self) -> tuple[TextEncoder, Denoiser, Decoder]:
        if self._denoise_loop is not None:  # loaded and wired
            # Every stage call asks: once loaded, no ``wrap_future`` (its callback reaches the
            # event loop through call_soon_threadsafe, a write to the loop's self-pipe and an
            # extra loop iteration, three times per request; 7% of the event loop's GIL time
            # at 16 clients).
            return self._parts.result()
        text_encoder, denoiser, decoder = await asyncio.wrap_future(self._parts)
        if self._denoise_loop is None:
            from serve.stages.continuous import ContinuousDenoiser

            opts = self.options
            text_encoder.metrics = for_stage(self.metrics, "TextEncoder")
            decoder.metrics = for_stage(self.metrics, "Decoder")
            self._encode_queue = BatchQueue(
                text_encoder.encode_requests,
                opts.text_batch,
                executor=self.model_thread,
                report=_gauges(text_encoder.metrics),
            )
            self._vae_queue = BatchQueue(
                self._vae, opts.decode_batch, executor=self.model_thread, report=_gauges(decoder.metrics)
            )
            self._denoise_loop = ContinuousDenoiser(
                denoiser,
                max_requests=opts.max_requests,
                step_delay_s=opts.step_delay_s,
                lora_batching=opts.lora_batching,
                executor=self.model_thread,
                interrupt=lambda: self.model_thread.queued > 0,
                on_done=self._decode_finished,
                metrics=for_stage(self.metrics, "Denoiser"),
            )
        return text_encoder, denoiser, decoder

    @property
    def denoise_loop(self) -> Any:
        """The replica's ``ContinuousDenoiser`` (None until the first request)."""
        return self._denoise_loop

    # -- StageClient -------------------------------------------------------------------------------
    async def encode(self, texts: list[str], loras: tuple[tuple[str, float], ...] = ()) -> StageResult:
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a non-empty list of strings")
        text_encoder, _, _ = await self._stages()
        if loras:
            # Its adapters load on asyncio's default pool, never in the model thread: a load never
            # holds up the other requests' steps (the Denoiser's admission does the same).
            await asyncio.to_thread(text_encoder.prepare, tuple(loras))
            return await self._encode_queue.submit((list(texts), tuple(loras)))  # type: ignore[union-attr]
        rows = text_encoder.cached(texts)
        if rows is not None:  # every text cached: no model work, so no wait for the model thread
            return StageResult(rows, 0.0, batch_size=1)
        return await self._encode_queue.submit(list(texts))  # type: ignore[union-attr]

    async def denoise(self, job: DenoiseJob) -> StageResult:
        await self._stages()
        return await self._denoise_loop.submit(job)

    async def denoise_stream(self, job: DenoiseJob) -> AsyncIterator[DenoiseProgress | StageResult]:
        """Streaming and jobs: progress and partial images, then the result; a consumer that leaves
        early takes the job out of the batch before its next step (the loop's stream is closed)."""
        await self._stages()
        async with contextlib.aclosing(self._denoise_loop.stream(job)) as items:
            async for item in items:
                yield item

    async def preview_map(self) -> np.ndarray | None:
        """The latent -> RGB map for partial images, fitted on the VAE (on the model thread)."""
        _, _, decoder = await self._stages()
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, decoder.preview_map)

    async def decode(self, latents: np.ndarray, request: DecodeRequest) -> StageResult:
        _, _, decoder = await self._stages()
        decoder.validate(latents)
        ready = self._decoded.pop(id(latents), None)
        if ready is not None and ready[0]() is latents:  # decoded when it finished denoising
            pixels, flags, decode_s, batch_size = ready[1]
        else:
            pixels, flags, decode_s, batch_size = await self._vae_queue.submit(latents)  # type: ignore[union-attr]
        # As the split Decoder's decode_requests: the safety check's verdicts (made in the model
        # thread), then once-only keys, storage and metrics, here outside the model thread.
        results = await asyncio.to_thread(
            decoder.store_requests, [pixels], [request], self.store, decode_s, batch_size=batch_size, flags=[flags]
        )
        return results[0]

    def _decode_finished(self, latents: list[np.ndarray]) -> None:
        """Model thread, from the step loop: the VAE (and the safety check) over the requests that
        just finished, ``decode_batch.max_batch_size`` at a time, kept for their ``decode``."""
        size = max(1, self.options.decode_batch.max_batch_size)
        for lo in range(0, len(latents), size):
            chunk = latents[lo : lo + size]
            for lat, answer in zip(chunk, self._vae(chunk), strict=True):
                key = id(lat)
                self._decoded[key] = (weakref.ref(lat), answer)
                weakref.finalize(lat, self._decoded.pop, key, None)

    def _vae(self, batch: list[np.ndarray]) -> list[tuple[np.ndarray, list[bool], float, int]]:
        """Model thread: one VAE pass over the batch and the safety check (torch too); each request's
        pixels and verdicts, the pass's seconds, its size."""
        import time

        decoder = self._parts.result()[2]
        t0 = time.perf_counter()
        pixels = decoder.decode(batch)
        seconds = time.perf_counter() - t0
        decoder.observe_batch(len(batch), seconds)
        flags = decoder.check(pixels)
        return [(px, f, seconds, len(batch)) for px, f in zip(pixels, flags, strict=True)]

    async def ready(self) -> dict[str, str]:
        if not self._parts.done():
            return dict.fromkeys(STAGE_NAMES, "loading")
        exc = self._parts.exception()
        if exc is not None:
            return dict.fromkeys(STAGE_NAMES, f"unavailable: {exc!r}"[:200])
        return dict.fromkeys(STAGE_NAMES, "ok")

    def close(self) -> None:
        self.model_thread.shutdown(wait=False, cancel_futures=True)


__all__ = ["STAGE_NAMES", "ColocatedOptions", "ColocatedStages"]
