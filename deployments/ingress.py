"""The HTTP Ingress deployment: FastAPI routes from ``serve.api.http`` over stage handles."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig
from serve.api.http import create_app
from serve.api.service import DecodeRequest, ImageService, ServiceConfig, StageResult
from serve.model import read_model_info, resolve_source
from serve.stages import DenoiseJob
from serve.storage import open_store

logger = logging.getLogger(__name__)


class HandleStages:
    """``StageClient`` over Ray Serve deployment handles."""

    def __init__(self, text_encoder: DeploymentHandle, denoiser: DeploymentHandle, decoder: DeploymentHandle):
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.decoder = decoder

    async def encode(self, texts: list[str]) -> StageResult:
        return await self.text_encoder.encode.remote(texts)

    async def denoise(self, job: DenoiseJob) -> StageResult:
        return await self.denoiser.denoise.remote(job)

    async def decode(self, latents: np.ndarray, request: DecodeRequest) -> StageResult:
        return await self.decoder.decode.remote(latents, request)

    async def ready(self) -> dict[str, str]:
        names = ("TextEncoder", "Denoiser", "Decoder")
        handles = (self.text_encoder, self.denoiser, self.decoder)
        results = await asyncio.gather(*(h.ready.remote() for h in handles), return_exceptions=True)
        return {
            n: r if isinstance(r, str) else f"unavailable: {r!r}"[:200]
            for n, r in zip(names, results, strict=True)
        }


@serve.deployment(name="Ingress")
@serve.ingress()  # late-bound: the app needs this replica's service (__serve_build_asgi_app__)
class Ingress:
    def __init__(
        self,
        text_encoder: DeploymentHandle,
        denoiser: DeploymentHandle,
        decoder: DeploymentHandle,
        config: dict[str, Any],
    ) -> None:
        cfg = AppConfig.model_validate(config)
        info = read_model_info(resolve_source(cfg.model))
        service_cfg = ServiceConfig(
            model_name=cfg.model_name or info.name,
            limits=cfg.limits,
            request_timeout_s=cfg.request_timeout_s,
            stage_timeout_s=cfg.stage_timeout_s,
        )
        store = open_store(cfg.storage, url_expiry_s=cfg.url_expiry_s)
        self.service = ImageService(service_cfg, info, HandleStages(text_encoder, denoiser, decoder), store)

    def __serve_build_asgi_app__(self):
        return create_app(self.service)
