"""The three stage deployments: thin Ray Serve wrappers around ``serve.stages`` with batching.

Each entry method validates its own request first (so a bad request fails alone). TextEncoder
and Decoder join a ``@serve.batch`` queue (their calls are short); the Denoiser batches
continuously (``serve/stages/continuous.py``). Model work runs in a worker thread so the replica
keeps accepting requests while it computes. Batch sizes and waits come from config.

Each replica records its metrics (``darkroom_*``, ``stage`` = its deployment name) and logs with
the request id of the call it serves (``deployments/observability.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
from ray import serve

from deployments.config import AppConfig, DeploymentOptions
from deployments.observability import replica_observability
from serve.metrics import Metrics
from serve.request_context import bound
from serve.stages import Decoder, Denoiser, TextEncoder
from serve.stages.continuous import ContinuousDenoiser
from serve.stages.messages import DecodeRequest, DenoiseJob, DenoiseProgress, StageResult
from serve.storage import open_store

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _configure(method: Any, opts: DeploymentOptions) -> None:
    method.set_max_batch_size(opts.max_batch_size)
    method.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)


class _Load:
    """A batched stage's queue length and in-flight count, as gauges: of the calls in the replica
    (``pending``), those in a running batch are in flight, the rest wait for a batch slot."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.pending = 0
        self.running = 0

    def _report(self) -> None:
        self.metrics.set("darkroom_queue_length", max(0, self.pending - self.running))
        self.metrics.set("darkroom_inflight_requests", self.running)

    async def call(self, work: Awaitable[T]) -> T:
        """One call from its arrival to its answer (however it ends: a cancelled call leaves too)."""
        self.pending += 1
        self._report()
        try:
            return await work
        finally:
            self.pending -= 1
            self._report()

    def start(self, n: int) -> None:
        self.running += n
        self._report()

    def finish(self, n: int) -> None:
        self.running -= n
        self._report()


async def _counted(metrics: Metrics, call: Awaitable[T]) -> T:
    """Await a stage call, counting it in ``darkroom_requests_total`` by outcome."""
    try:
        result = await call
    except asyncio.CancelledError:
        metrics.inc("darkroom_requests_total", status="cancelled")
        raise
    except Exception:
        metrics.inc("darkroom_requests_total", status="error")
        raise
    metrics.inc("darkroom_requests_total", status="ok")
    return result


async def _in_batch(load: _Load, n: int, work: Callable[[], T], reply_delay_s: float) -> T:
    load.start(n)
    try:
        result = await asyncio.to_thread(work)
        if reply_delay_s > 0:
            await asyncio.sleep(reply_delay_s)  # fault injection (tests): the work is done, no answer yet
        return result
    finally:
        load.finish(n)


def set_torch_threads(opts: DeploymentOptions) -> None:
    """Pin the replica's torch threads (explicit, not whatever the environment held when torch loaded)."""
    import torch

    torch.set_num_threads(opts.threads_per_replica)


def attach_safety_checker(decoder: Decoder, cfg: AppConfig, info: Any) -> None:
    """Load the policy's image safety checker (if it names one) onto the decoder's device; the
    split Decoder and the colocated profile both call this, so both withhold the same images."""
    if cfg.prompt_policy.image_checker:
        from serve.safety import ImageSafetyChecker, checker_folder

        folder = checker_folder(cfg.prompt_policy.image_checker, info.path)
        decoder.safety = ImageSafetyChecker.load(folder, device=str(decoder.engine.device))


@serve.deployment(name="TextEncoder")
class TextEncoderDeployment:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(config)
        set_torch_threads(cfg.text_encoder)
        self.metrics = replica_observability("TextEncoder", cfg.log_level, cfg.gil_interval_ms())
        self.encoder = TextEncoder.load(cfg.model_info(), **cfg.load_kwargs(), **cfg.lora_kwargs())
        self.encoder.metrics = self.metrics
        self.load = _Load(self.metrics)
        self.reply_delay_s = cfg.debug_reply_delay_s
        _configure(self._encode_batch, cfg.text_encoder)

    async def encode(
        self, texts: list[str], loras: tuple[tuple[str, float], ...] = (), request_id: str | None = None
    ) -> StageResult:
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a non-empty list of strings")
        with bound(request_id):
            logger.info("encode %d text(s)", len(texts))
            if loras:
                # Load its adapters before it joins a batch: a bad adapter fails this request alone.
                await asyncio.to_thread(self.encoder.prepare, tuple(loras))
            return await _counted(self.metrics, self.load.call(self._encode_batch((texts, tuple(loras), request_id))))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, batch: list[tuple[list[str], tuple, str | None]]) -> list[StageResult]:
        with bound(rid for _, _, rid in batch):
            work = lambda: self.encoder.encode_requests([(texts, loras) for texts, loras, _ in batch])  # noqa: E731
            return await _in_batch(self.load, len(batch), work, self.reply_delay_s)

    async def ready(self) -> str:
        return "ok"


@serve.deployment(name="Denoiser")
class DenoiserDeployment:
    """Continuous batching: requests join the running batch between denoiser steps (no window).

    ``max_batch_size`` caps the requests in flight at once; ``batch_wait_timeout_s`` is unused
    here (nobody waits for a window: a request arriving mid-batch joins at the next step).
    A cancelled call (a client timeout) leaves the batch before the next step.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(config)
        set_torch_threads(cfg.denoiser)
        self.metrics = replica_observability("Denoiser", cfg.log_level, cfg.gil_interval_ms())
        self.denoiser = Denoiser.load(
            cfg.model_info(), **cfg.load_kwargs(), **cfg.lora_kwargs(), step_cache=cfg.step_cache_message()
        )
        self.denoiser.warm_up(cfg.denoiser.max_batch_size)  # traces, graphs or compiles only; else nothing
        self.loop = ContinuousDenoiser(
            self.denoiser,
            max_requests=cfg.denoiser.max_batch_size,
            step_delay_s=cfg.debug_step_delay_s,
            lora_batching=cfg.lora_batching,
            metrics=self.metrics,
        )

    async def denoise(self, job: DenoiseJob) -> StageResult:
        with bound(job.request_id):
            logger.info("denoise %d image(s), %d steps", job.n, job.num_inference_steps)
            return await _counted(self.metrics, self.loop.submit(job))

    def record_routing_stats(self) -> dict[str, Any]:
        """What the LoRA-affinity router reads (deployments/routing.py): the adapters held here."""
        lora = self.denoiser.lora
        return {"loras": lora.held() if lora is not None else []}

    async def lora_stats(self) -> dict[str, float]:
        """This replica's adapter-cache counters (tests, bench)."""
        lora = self.denoiser.lora
        return lora.stats() if lora is not None else {}

    async def denoise_stream(self, job: DenoiseJob) -> AsyncIterator[DenoiseProgress | StageResult]:
        """Called through ``handle.options(stream=True)``: progress and partial images, then the
        result. A cancelled call (the client left) raises CancelledError here, which closes the
        loop's stream: the job leaves the batch before the next step."""
        with bound(job.request_id):
            logger.info("denoise %d image(s), %d steps, streamed", job.n, job.num_inference_steps)
        status = "error"
        try:
            async for item in self.loop.stream(job):
                if isinstance(item, StageResult):
                    status = "ok"
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:  # counted like plain calls (``_counted``), however the stream ends
            self.metrics.inc("darkroom_requests_total", status=status)

    async def stats(self) -> dict[str, int]:
        """The continuous loop's counters: requests in flight and queued, steps taken (tests, metrics)."""
        return self.loop.stats()

    async def ready(self) -> str:
        return "ok"


@serve.deployment(name="Decoder")
class DecoderDeployment:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(config)
        set_torch_threads(cfg.decoder)
        self.metrics = replica_observability("Decoder", cfg.log_level, cfg.gil_interval_ms())
        info = cfg.model_info()
        self.decoder = Decoder.load(info, **cfg.load_kwargs())
        self.decoder.metrics = self.metrics
        attach_safety_checker(self.decoder, cfg, info)
        self.store = open_store(cfg.storage, url_expiry_s=cfg.url_expiry_s, s3_options=cfg.storage_options)
        self.load = _Load(self.metrics)
        self.reply_delay_s = cfg.debug_reply_delay_s
        _configure(self._decode_batch, cfg.decoder)
        self.decoder.preview_map()  # fit the partial images' latent -> RGB map now, not on a request

    async def preview_map(self) -> np.ndarray | None:
        """The latent -> RGB map for partial images (refined from the images decoded so far)."""
        return await asyncio.to_thread(self.decoder.preview_map)

    async def decode(self, latents: np.ndarray, request: DecodeRequest) -> StageResult:
        with bound(request.request_id):
            self.decoder.validate(latents)
            logger.info("decode %d image(s) as %s", latents.shape[0], request.output_format)
            return await _counted(self.metrics, self.load.call(self._decode_batch((latents, request))))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _decode_batch(self, batch: list[tuple[np.ndarray, DecodeRequest]]) -> list[StageResult]:
        work = lambda: self.decoder.decode_requests(batch, self.store)  # noqa: E731
        return await _in_batch(self.load, len(batch), work, self.reply_delay_s)

    async def ready(self) -> str:
        await asyncio.to_thread(self.store.check)
        return "ok"
