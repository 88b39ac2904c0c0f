"""The three stage deployments: thin Ray Serve wrappers around ``serve.stages`` with batching.

Each entry method validates its own request first (so a bad request fails alone). TextEncoder
and Decoder join a ``@serve.batch`` queue (their calls are short); the Denoiser batches
continuously (``serve/stages/continuous.py``). Model work runs in a worker thread so the replica
keeps accepting requests while it computes. Batch sizes and waits come from config.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from ray import serve

from deployments.config import AppConfig, DeploymentOptions
from serve.stages import Decoder, Denoiser, TextEncoder
from serve.stages.continuous import ContinuousDenoiser
from serve.stages.messages import DecodeRequest, DenoiseJob, DenoiseProgress, StageResult
from serve.storage import open_store

logger = logging.getLogger(__name__)


def _configure(method: Any, opts: DeploymentOptions) -> None:
    method.set_max_batch_size(opts.max_batch_size)
    method.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)


def set_torch_threads(opts: DeploymentOptions) -> None:
    """Pin the replica's torch threads (explicit, not whatever the environment held when torch loaded)."""
    import torch

    torch.set_num_threads(opts.threads_per_replica)


@serve.deployment(name="TextEncoder")
class TextEncoderDeployment:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(config)
        set_torch_threads(cfg.text_encoder)
        self.encoder = TextEncoder.load(cfg.model_info(), **cfg.load_kwargs(), **cfg.lora_kwargs())
        _configure(self._encode_batch, cfg.text_encoder)

    async def encode(self, texts: list[str], loras: tuple[tuple[str, float], ...] = ()) -> StageResult:
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a non-empty list of strings")
        if loras:
            # Load its adapters before it joins a batch: a bad adapter fails this request alone.
            await asyncio.to_thread(self.encoder.prepare, tuple(loras))
        return await self._encode_batch((texts, tuple(loras)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, batch: list[tuple[list[str], tuple]]) -> list[StageResult]:
        return await asyncio.to_thread(self.encoder.encode_requests, batch)

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
        self.denoiser = Denoiser.load(
            cfg.model_info(), **cfg.load_kwargs(), **cfg.lora_kwargs(), step_cache=cfg.step_cache_message()
        )
        self.loop = ContinuousDenoiser(
            self.denoiser,
            max_requests=cfg.denoiser.max_batch_size,
            step_delay_s=cfg.debug_step_delay_s,
            lora_batching=cfg.lora_batching,
        )

    async def denoise(self, job: DenoiseJob) -> StageResult:
        return await self.loop.submit(job)

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
        async for item in self.loop.stream(job):
            yield item

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
        self.decoder = Decoder.load(cfg.model_info(), **cfg.load_kwargs())
        self.store = open_store(cfg.storage, url_expiry_s=cfg.url_expiry_s, s3_options=cfg.storage_options)
        _configure(self._decode_batch, cfg.decoder)
        self.decoder.preview_map()  # fit the partial images' latent -> RGB map now, not on a request

    async def preview_map(self) -> np.ndarray | None:
        """The latent -> RGB map for partial images (refined from the images decoded so far)."""
        return await asyncio.to_thread(self.decoder.preview_map)

    async def decode(self, latents: np.ndarray, request: DecodeRequest) -> StageResult:
        self.decoder.validate(latents)
        return await self._decode_batch((latents, request))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _decode_batch(self, batch: list[tuple[np.ndarray, DecodeRequest]]) -> list[StageResult]:
        return await asyncio.to_thread(self.decoder.decode_requests, batch, self.store)

    async def ready(self) -> str:
        await asyncio.to_thread(self.store.check)
        return "ok"
