"""The HTTP Ingress deployment: FastAPI routes from ``serve.api.http`` over stage handles."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig
from deployments.observability import replica_observability
from serve.api.http import create_app
from serve.api.policy import RetryPolicy
from serve.api.service import ImageService
from serve.errors import DarkroomError, OverloadedError
from serve.metrics import NO_METRICS, Metrics
from serve.request_context import current
from serve.stages.messages import DecodeRequest, DenoiseJob, DenoiseProgress, StageResult
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
        scale_to_zero: frozenset[str] = frozenset(),
        metrics: Metrics = NO_METRICS,
    ):
        self.metrics = metrics
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.decoder = decoder
        self.retry = retry or RetryPolicy()
        self.deadline_s = deadline_s
        self.scale_to_zero = scale_to_zero  # stage names whose min_replicas is 0
        self.retries = 0  # calls re-sent after a replica died, for tests and metrics
        self._last_wake = -1e9
        self._wakers: set[asyncio.Task] = set()

    @property
    def _handles(self) -> dict[str, DeploymentHandle]:
        return {"TextEncoder": self.text_encoder, "Denoiser": self.denoiser, "Decoder": self.decoder}

    def wake(self) -> None:
        """Start every scaled-to-zero stage at once when a request arrives, so a cold request
        waits for the slowest stage's start instead of the sum of all three (at most every 5 s)."""
        now = time.monotonic()
        if not self.scale_to_zero or now - self._last_wake < 5.0:
            return
        self._last_wake = now
        for name in ("Denoiser", "Decoder"):
            if name in self.scale_to_zero:
                task = asyncio.create_task(self._ping(self._handles[name]))
                self._wakers.add(task)
                task.add_done_callback(self._wakers.discard)

    async def _ping(self, handle: DeploymentHandle) -> None:
        try:
            await asyncio.wait_for(handle.ready.remote(), self.deadline_s)
        except Exception:  # a wake-up is best effort; the request itself reports failures
            logger.debug("wake-up ping failed", exc_info=True)

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
                self.metrics.inc("darkroom_stage_retries_total", stage=stage)
                await asyncio.sleep(wait)
            except RayTaskError as exc:
                raise unwrap(exc) from None

    async def encode(self, texts: list[str], loras: tuple[tuple[str, float], ...] = ()) -> StageResult:
        # The request id rides along for the TextEncoder's log lines (DenoiseJob and
        # DecodeRequest carry theirs).
        return await self._call("TextEncoder", self.text_encoder.encode, texts, tuple(loras), current())

    async def denoise(self, job: DenoiseJob) -> StageResult:
        return await self._call("Denoiser", self.denoiser.denoise, job)

    async def decode(self, latents: np.ndarray, request: DecodeRequest) -> StageResult:
        return await self._call("Decoder", self.decoder.decode, latents, request)

    async def preview_map(self) -> np.ndarray | None:
        return await self._call("Decoder", self.decoder.preview_map)

    async def denoise_stream(self, job: DenoiseJob) -> AsyncIterator[DenoiseProgress | StageResult]:
        """The Denoiser's streaming method (``handle.options(stream=True)``), with ``_call``'s
        rules: back-pressure is a 503, a replica that died mid-stream is retried (the job starts
        over on another replica; steps and partial images already passed on are not repeated),
        and a consumer that stops iterating (the client left) cancels the call at the replica."""
        start = time.monotonic()
        attempt, last_step, sent_partials = 0, -1, set()
        streaming = self.denoiser.options(stream=True)
        while True:
            attempt += 1
            response = streaming.denoise_stream.remote(job)
            finished = False
            try:
                async for item in response:
                    if isinstance(item, StageResult):
                        finished = True
                        yield item
                        return
                    if item.preview is not None and item.partial_index not in sent_partials:
                        sent_partials.add(item.partial_index)
                        last_step = max(last_step, item.step)
                        yield item
                    elif item.step > last_step:
                        last_step = item.step
                        yield DenoiseProgress(item.step, item.total_steps)
                raise RuntimeError("the Denoiser's stream ended without a result")
            except BackPressureError as exc:
                raise OverloadedError("Denoiser is at capacity; retry shortly") from exc
            except RETRYABLE as exc:
                wait = self.retry.delay(attempt, time.monotonic(), start + self.deadline_s)
                if wait is None:
                    raise OverloadedError(f"Denoiser replicas unavailable after {attempt} tries: {exc}") from exc
                logger.warning("Denoiser stream failed (%s); retry %d in %.1f s", type(exc).__name__, attempt, wait)
                self.retries += 1
                await asyncio.sleep(wait)
            except RayTaskError as exc:
                raise unwrap(exc) from None
            finally:
                if not finished:
                    # Cancelled, closed early, or failed: Serve does not stop the replica's
                    # generator by itself (PITFALLS), and the job would keep its slot.
                    response.cancel()

    async def _controller_view(self) -> dict[str, str]:
        """Stages whose state the controller already decides: failed, or scaled to zero.

        A readiness probe must not wake a serverless app (it would never scale to zero), and a
        DEPLOY_FAILED stage stays failed for good (PITFALLS): say so instead of pinging.
        """
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), 10)
            app = status.applications[serve.get_replica_context().app_name]
        except Exception:
            logger.debug("controller status unavailable; pinging stages", exc_info=True)
            return {}
        view = {}
        for name in self._handles:
            dep = app.deployments.get(name)
            if dep is None:
                continue
            running = sum(count for state, count in dep.replica_states.items() if str(state).endswith("RUNNING"))
            starting = sum(count for state, count in dep.replica_states.items() if str(state).endswith("STARTING"))
            # UNHEALTHY also means "a replica died and is being replaced": while another replica
            # runs, the stage still serves (and the Ingress retries onto it), so ping instead.
            if str(dep.status).endswith("DEPLOY_FAILED") or (str(dep.status).endswith("UNHEALTHY") and not running):
                view[name] = f"unavailable: {dep.status}: {dep.message}"[:300]
            elif name in self.scale_to_zero and not running:
                view[name] = "scaled_to_zero"
            elif not running and (starting or str(dep.status).endswith("UPDATING")):
                view[name] = "loading"  # its first replica is starting (loading the model)
        return view

    async def ready(self) -> dict[str, str]:
        view = await self._controller_view()
        pinged = [n for n in self._handles if n not in view]
        results = await asyncio.gather(
            *(asyncio.wait_for(self._handles[n].ready.remote(), 10) for n in pinged), return_exceptions=True
        )
        for name, result in zip(pinged, results, strict=True):
            view[name] = result if isinstance(result, str) else f"unavailable: {result!r}"[:200]
        return {n: view[n] for n in self._handles}


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
        metrics = replica_observability("Ingress", cfg.log_level, cfg.gil_interval_ms())
        info = cfg.model_info()
        service_cfg = cfg.service_config(info.name)
        store = open_store(cfg.storage, url_expiry_s=cfg.url_expiry_s, s3_options=cfg.storage_options)
        stages = HandleStages(
            text_encoder,
            denoiser,
            decoder,
            retry=RetryPolicy(max_attempts=cfg.stage_retries),
            deadline_s=cfg.stage_timeout_s,
            scale_to_zero=frozenset(
                name
                for name, opts in (
                    ("TextEncoder", cfg.text_encoder),
                    ("Denoiser", cfg.denoiser),
                    ("Decoder", cfg.decoder),
                )
                if opts.min_replicas == 0
            ),
            metrics=metrics,
        )
        self.service = ImageService(service_cfg, info, stages, store, loras=cfg.lora_catalog(info), metrics=metrics)

    def __serve_build_asgi_app__(self):
        return create_app(self.service, behind_serve_proxy=True)

    async def check_health(self) -> None:
        # Serve calls this every few seconds: it also starts the job sweeper of a replica that
        # has served no request yet (a replacement must resume its dead predecessor's jobs).
        self.service.start_background()
