"""The HTTP Ingress deployment: FastAPI routes from ``serve.api.http`` over stage handles."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig
from serve.api.http import create_app
from serve.api.policy import RetryPolicy
from serve.api.service import DecodeRequest, ImageService, ServiceConfig, StageResult
from serve.errors import DarkroomError, OverloadedError
from serve.model import read_model_info, resolve_source
from serve.settings import Settings
from serve.stages import DenoiseJob
from serve.storage import open_store

logger = logging.getLogger(__name__)


# A replica died or went away mid-call: the call "may or may not have run" (PITFALLS), and
# stage calls are idempotent, so run it again on another (or the restarted) replica.
RETRYABLE = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError)


def unwrap(exc: BaseException) -> BaseException:
    """A replica's own typed error arrives wrapped in RayTaskError: hand back the original."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(exc, RayTaskError) and isinstance(cause, DarkroomError) else exc


class HandleStages:
    """``StageClient`` over Ray Serve deployment handles, with retries on replica death."""

    def __init__(
        self,
        text_encoder: DeploymentHandle,
        denoiser: DeploymentHandle,
        decoder: DeploymentHandle,
        retry: RetryPolicy | None = None,
        deadline_s: float = 300.0,
    ):
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.decoder = decoder
        self.retry = retry or RetryPolicy()
        self.deadline_s = deadline_s
        self.retries = 0  # calls re-sent after a replica died, for tests and metrics

    async def _call(self, stage: str, method: Any, *args: Any) -> StageResult:
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            response = method.remote(*args)
            try:
                return await response
            except asyncio.CancelledError:
                # Our timeout (or the client leaving) cancelled this call: Serve does not pass
                # that on by itself, and the stage would keep computing for nobody.
                response.cancel()
                raise
            except BackPressureError as exc:
                raise OverloadedError(f"{stage} is at capacity; retry shortly") from exc
            except RETRYABLE as exc:
                now = time.monotonic()
                wait = self.retry.delay(attempt, now, start + self.deadline_s)
                if wait is None:
                    raise OverloadedError(f"{stage} replicas unavailable after {attempt} tries: {exc}") from exc
                logger.warning("%s call failed (%s); retry %d in %.1f s", stage, type(exc).__name__, attempt, wait)
                self.retries += 1
                await asyncio.sleep(wait)
            except RayTaskError as exc:
                raise unwrap(exc) from None

    async def encode(self, texts: list[str]) -> StageResult:
        return await self._call("TextEncoder", self.text_encoder.encode, texts)

    async def denoise(self, job: DenoiseJob) -> StageResult:
        return await self._call("Denoiser", self.denoiser.denoise, job)

    async def decode(self, latents: np.ndarray, request: DecodeRequest) -> StageResult:
        return await self._call("Decoder", self.decoder.decode, latents, request)

    async def ready(self) -> dict[str, str]:
        names = ("TextEncoder", "Denoiser", "Decoder")
        handles = (self.text_encoder, self.denoiser, self.decoder)
        results = await asyncio.gather(*(h.ready.remote() for h in handles), return_exceptions=True)
        return {
            n: r if isinstance(r, str) else f"unavailable: {r!r}"[:200] for n, r in zip(names, results, strict=True)
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
            prompt_policy=cfg.prompt_policy,
            api_keys=tuple(dict.fromkeys(cfg.api_keys + Settings.from_env().api_keys)),
            max_body_bytes=cfg.max_body_bytes,
        )
        store = open_store(cfg.storage, url_expiry_s=cfg.url_expiry_s, s3_options=cfg.storage_options)
        stages = HandleStages(
            text_encoder,
            denoiser,
            decoder,
            retry=RetryPolicy(max_attempts=cfg.stage_retries),
            deadline_s=cfg.stage_timeout_s,
        )
        self.service = ImageService(service_cfg, info, stages, store)

    def __serve_build_asgi_app__(self):
        return create_app(self.service)
