"""The image service behind the HTTP API: validate -> encode -> denoise -> decode+store -> respond.

Ray-free: it talks to the three stages through a ``StageClient`` (Ray deployment handles in
``deployments/``, plain in-process stage objects in ``LocalStages``), so the same request
handling serves the split Ray app, the monolithic baseline and unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from serve.api.idempotency import IdempotencyGuard
from serve.api.jobs import JobManager
from serve.api.leases import LeasePolicy
from serve.api.limits import KeyLimiter, RateLimits
from serve.api.policy import PromptPolicy
from serve.api.results import from_records, image_metadata, image_records, lora_list, render_body
from serve.api.schemas import ImageGenerationRequest, Limits, parse_generation_request
from serve.api.streaming import Developed, StreamContext, generation_events
from serve.api.timings import ms, stage_timings
from serve.errors import (
    ContentPolicyError,
    ImagesWithheldError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    RequestTimeoutError,
)
from serve.families import family_of
from serve.metrics import NO_METRICS, Metrics
from serve.model import ModelInfo
from serve.params import GenerationParams
from serve.request_context import current
from serve.stages.messages import DecodedImage, DecodeRequest, DenoiseProgress, StageClient, StageResult
from serve.storage import LocalStore, ResultStore

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: How long the Ingress reuses the Decoder's preview map before asking again (it improves with traffic).
PREVIEW_MAP_TTL_S = 30.0


async def _until(deadline: float, aw: Awaitable[T], what: str = "request") -> T:
    """``aw`` bounded by an absolute deadline on the loop's clock (504 past it)."""
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(aw, max(remaining, 0.0))
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"{what} did not finish in time") from None


@dataclass(frozen=True)
class ServiceConfig:
    model_name: str
    limits: Limits = field(default_factory=Limits)
    request_timeout_s: float = 300.0
    stage_timeout_s: float = 300.0
    prompt_policy: PromptPolicy = field(default_factory=PromptPolicy)
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    #: The stages' engine backend: per-request LoRA needs torch (``serve.lora.LORA_BACKENDS``).
    backend: str = "torch"
    rate_limits: RateLimits = field(default_factory=RateLimits)
    job_lease_s: float = 30.0
    job_attempts: int = 3
    # How often a job's record is rewritten with its progress, and how often a job polls the
    # store for a cancel asked of another Ingress replica (and a stream of a job running on
    # another replica polls its record).
    job_poll_s: float = 1.0


class ImageService:
    """Request handling for ``/v1/images/*``, ``/v1/models``, ``/v1/files``, readiness."""

    def __init__(
        self,
        config: ServiceConfig,
        info: ModelInfo,
        stages: StageClient,
        store: ResultStore,
        loras: Any = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.config = config
        self.info = info
        self.family = family_of(info)
        self.stages = stages
        self.store = store
        self.loras = loras  # serve.lora.LoraCatalog of the adapter repository, or None
        self.metrics = metrics
        self.idempotency = IdempotencyGuard(store, stale_after_s=config.request_timeout_s + 30)
        self.limiter = KeyLimiter(config.rate_limits)
        policy = LeasePolicy(config.job_lease_s, config.job_attempts, config.request_timeout_s)
        self.jobs = JobManager(self, policy, metrics=metrics)
        self._preview_map: np.ndarray | None = None
        self._preview_map_at: float | None = None

    def start_background(self) -> None:
        """Start the job sweeper (idempotent; call from the serving event loop)."""
        self.jobs.start_sweeper()

    # -- validation -----------------------------------------------------------------------
    def parse(self, body: Any) -> tuple[ImageGenerationRequest, GenerationParams]:
        request = parse_generation_request(body, self.config.limits)
        if request.model is not None and request.model not in self.model_ids():
            raise ModelNotFoundError("model", request.model, f"this server serves {self.config.model_name!r}")
        params = request.to_params(
            default_size=self.info.native_size, limits=self.config.limits, defaults=self.family.request_defaults()
        )
        self.family.check(params)
        policy = self.config.prompt_policy
        try:
            policy.check(params.prompt, params.negative_prompt, moderation=request.moderation or "auto")
        except ContentPolicyError:
            self.metrics.inc("darkroom_policy_blocks_total", check="prompt")
            raise
        return request, params

    def model_ids(self) -> tuple[str, ...]:
        return (self.config.model_name, "darkroom")

    def check_loras(self, params: GenerationParams) -> None:
        """Refuse adapters this server cannot apply, naming ``loras`` / ``loras[i].name`` (400).

        Blocking (lists the repository, reads headers): call it in a worker thread.
        """
        if not params.loras:
            return
        names = [n for n, _ in params.loras]
        if self.loras is None:
            raise InvalidRequestError("loras", names, "this server has no adapter repository (serve --loras DIR)")
        from serve.lora import LORA_BACKENDS

        if self.config.backend not in (*LORA_BACKENDS, "auto"):
            raise InvalidRequestError(
                "loras",
                names,
                f"per-request LoRA runs on the torch backend; this server runs {self.config.backend}",
            )
        self.loras.check(params.loras)

    def lora_listing(self) -> dict[str, Any]:
        """``GET /v1/loras``: the adapters of the repository and whether each fits this model."""
        data = self.loras.listing() if self.loras is not None else []
        return {"object": "list", "data": data}

    # -- generation -------------------------------------------------------------------------
    async def _bounded(self, coro: Awaitable[T], stage: str) -> T:
        t0 = time.perf_counter()
        try:
            return await asyncio.wait_for(coro, timeout=self.config.stage_timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"{stage} did not answer within {self.config.stage_timeout_s:.0f} s") from None
        finally:
            self.metrics.observe("darkroom_stage_latency_seconds", time.perf_counter() - t0, stage=stage)

    async def run(
        self,
        request: ImageGenerationRequest,
        params: GenerationParams,
        *,
        result_id: str | None = None,
        created: float | None = None,
    ) -> tuple[list[DecodedImage], dict]:
        """Run one request through the stages; returns its images (stored, or withheld by the
        safety check) and timings (ms).

        Its images are stored under keys made of ``result_id`` (a job's id; default: a fresh
        one) and their index, so every try of the request (a decode retried after a replica
        died, a job resumed elsewhere) stores each image once. ``created`` (the request's Unix
        time) dates the keys' folder and the metadata.
        """
        self._wake()
        plan = self.family.plan(params)
        t0 = time.perf_counter()
        enc = await self._bounded(self._encode(plan, params), "TextEncoder")
        t1 = time.perf_counter()
        job = dataclasses.replace(plan.denoise_job(enc.value), request_id=current())
        den = await self._bounded(self.stages.denoise(job), "Denoiser")
        t2 = time.perf_counter()
        inline = request.response_format == "b64_json"
        return await self._decode(params, den, inline, (t0, t1, t2), enc, result_id=result_id, created=created)

    def _encode(self, plan: Any, params: GenerationParams) -> Awaitable[StageResult]:
        """The TextEncoder call; without adapters, the one-argument call every StageClient takes."""
        if params.loras:
            return self.stages.encode(list(plan.texts), params.loras)
        return self.stages.encode(list(plan.texts))

    def _wake(self) -> None:
        wake = getattr(self.stages, "wake", None)
        if wake is not None:
            wake()  # start scaled-to-zero stages now, not one after another

    async def _decode(
        self,
        params: GenerationParams,
        den: StageResult,
        inline: bool,
        marks: tuple[float, float, float],
        enc: StageResult,
        *,
        result_id: str | None = None,
        created: float | None = None,
    ) -> tuple[list[DecodedImage], dict]:
        """The Decoder's part of a request, and the timings (ms) of all three stages."""
        request_id = current()
        metadata = self.metadata(params, {"encode": ms(enc.compute_s), "denoise": ms(den.compute_s)})
        metadata["created"] = int(created if created is not None else metadata["created"])
        if request_id is not None:
            metadata["request_id"] = request_id
        dec_req = DecodeRequest(
            params.output_format,
            metadata,
            inline=inline,
            output_compression=params.output_compression,
            request_id=request_id,
            result_id=result_id or uuid.uuid4().hex,
        )
        dec = await self._bounded(self.stages.decode(den.value, dec_req), "Decoder")
        return dec.value, stage_timings(enc, den, dec, (*marks, time.perf_counter()))

    # -- streaming (serve/api/streaming.py formats the events) --------------------------------
    async def preview_map(self) -> np.ndarray | None:
        """The Decoder's latent -> RGB map, cached ``PREVIEW_MAP_TTL_S`` (the Decoder refines it
        from the images it decodes). None: no previews (the stream carries final images only)."""
        now = time.monotonic()
        if self._preview_map_at is not None and now - self._preview_map_at < PREVIEW_MAP_TTL_S:
            return self._preview_map
        try:
            fresh = await asyncio.wait_for(self.stages.preview_map(), self.config.stage_timeout_s)
        except Exception:  # previews are a nicety: the request goes on without new ones
            logger.warning("preview map unavailable; keeping the last one", exc_info=True)
            return self._preview_map
        self._preview_map, self._preview_map_at = fresh, now
        return fresh

    async def develop(
        self,
        request: ImageGenerationRequest,
        params: GenerationParams,
        partial_images: int,
        deadline: float,
        progress: bool = False,
        *,
        result_id: str | None = None,
        created: float | None = None,
    ) -> AsyncIterator[DenoiseProgress | Developed]:
        """The stages streamed: ``DenoiseProgress`` items with the partial images asked for (and
        after every step with ``progress``), then ``Developed``. ``deadline`` (the loop's clock)
        bounds the whole request; each stage is bounded as in ``run`` (``result_id`` and
        ``created`` too). Closing it early cancels the stage call in flight."""
        self._wake()
        plan = self.family.plan(params)
        t0 = time.perf_counter()
        enc = await _until(deadline, self._bounded(self._encode(plan, params), "TextEncoder"))
        t1 = time.perf_counter()
        job = dataclasses.replace(plan.denoise_job(enc.value), progress=progress, request_id=current())
        if partial_images:
            preview_map = await _until(deadline, self.preview_map())
            job = dataclasses.replace(job, partial_images=partial_images, preview_map=preview_map)
        den: StageResult | None = None
        stage_deadline = min(deadline, asyncio.get_running_loop().time() + self.config.stage_timeout_s)
        async with contextlib.aclosing(self.stages.denoise_stream(job)) as stream:
            while den is None:
                try:
                    item = await _until(stage_deadline, anext(stream), "Denoiser")
                except StopAsyncIteration:
                    raise RuntimeError("the Denoiser's stream ended without a result") from None
                if isinstance(item, StageResult):
                    den = item
                else:
                    yield item
        t2 = time.perf_counter()
        decoded = self._decode(params, den, True, (t0, t1, t2), enc, result_id=result_id, created=created)
        images, timings = await _until(deadline, decoded)
        yield Developed(images, timings)

    def stream_context(self, request: ImageGenerationRequest, params: GenerationParams) -> StreamContext:
        return StreamContext.of(
            width=params.width,
            height=params.height,
            quality=request.quality,
            background=request.background,
            output_format=params.output_format,
            seed=params.seed,
            output_compression=params.output_compression,
            response_format=request.response_format,
        )

    async def generate_stream(
        self, body: Any, base_url: str, idempotency_key: str | None = None, api_key: str | None = None
    ) -> AsyncIterator[bytes] | None:
        """``POST /v1/images/generations`` with ``stream: true``: the SSE body, or None when the
        request does not stream. Validation errors (adapters included, and the key's limits) raise
        here, before anything is sent; the key's images are held until the stream ends."""
        request, params = self.parse(body)
        if not request.stream:
            return None
        if idempotency_key is not None:
            raise InvalidRequestError(
                "Idempotency-Key", idempotency_key, "is not supported with stream: true (a stream cannot be replayed)"
            )
        if params.loras:
            await asyncio.to_thread(self.check_loras, params)
        self.limiter.admit(api_key, params.n)
        return self._stream(request, params, base_url, api_key)

    async def _stream(
        self, request: ImageGenerationRequest, params: GenerationParams, base_url: str, api_key: str | None = None
    ):
        ctx = self.stream_context(request, params)
        deadline = asyncio.get_running_loop().time() + self.config.request_timeout_s
        as_url = request.response_format == "url"
        try:
            async with contextlib.aclosing(self.develop(request, params, request.partial_images or 0, deadline)) as it:
                events = generation_events(
                    it, ctx, lambda key: self.url_for(key, base_url) if as_url else None, self._count_images
                )
                async for chunk in events:
                    yield chunk
        finally:
            self.limiter.release(api_key, params.n)

    def metadata(self, params: GenerationParams, timings_ms: dict[str, float]) -> dict[str, Any]:
        """What is stored beside each image (its index is added per image)."""
        return image_metadata(params, self.family, self.config.model_name, timings_ms)

    async def generate(
        self, body: Any, base_url: str, idempotency_key: str | None = None, api_key: str | None = None
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """``POST /v1/images/generations``: the OpenAI response body and the timings.

        ``api_key`` is the caller's key: its limits (``rate_limits``) apply. A request whose
        every image the safety check withheld raises :class:`ImagesWithheldError` (400).
        """
        request, params = self.parse(body)
        if params.loras:
            await asyncio.to_thread(self.check_loras, params)
        self.limiter.admit(api_key, params.n)
        try:
            return await self._generate_admitted(request, params, base_url, idempotency_key)
        finally:
            self.limiter.release(api_key, params.n)

    async def _generate_admitted(
        self, request: ImageGenerationRequest, params: GenerationParams, base_url: str, idempotency_key: str | None
    ) -> tuple[dict[str, Any], dict[str, float]]:
        async def produce() -> dict[str, Any]:
            created = int(time.time())
            try:
                run = self.run(request, params, created=created)
                images, timings = await asyncio.wait_for(run, self.config.request_timeout_s)
            except asyncio.TimeoutError:
                raise RequestTimeoutError(f"request took longer than {self.config.request_timeout_s:.0f} s") from None
            return {"created": created, "seed": params.seed, "images": images, "timings": timings}

        if idempotency_key is None:
            out = await produce()
            images = out["images"]
        else:
            fields = request.model_dump(exclude={"response_format", "user"})

            async def produce_record() -> dict[str, Any]:
                out = await produce()
                out["images"] = image_records(out["images"])
                return out

            out = await self.idempotency.run(idempotency_key, fields, produce_record, self.config.request_timeout_s)
            images = from_records(out["images"])
        self._count_images(images)
        if images and all(im.withheld for im in images):
            raise ImagesWithheldError(f"all {len(images)} image(s) were withheld: the image safety check flagged them")
        render = (out["created"], out["seed"], images, request.response_format, base_url, out["timings"])
        if request.response_format == "url" and isinstance(self.store, LocalStore):
            body_out = self.render(*render)  # URLs under our own /v1/files: no I/O, so no thread hop
        else:  # b64_json reads the images back; an S3 store may fetch credentials to sign URLs
            body_out = await asyncio.to_thread(self.render, *render)
        if params.loras:
            body_out["loras"] = lora_list(params.loras)  # what made these images, beside the seed
        return body_out, out["timings"]

    def _count_images(self, images: list[DecodedImage]) -> None:
        withheld = sum(im.withheld for im in images)
        self.metrics.inc("darkroom_images_total", len(images) - withheld, status="returned")
        if withheld:
            self.metrics.inc("darkroom_images_total", withheld, status="withheld")

    def render(
        self,
        created: int,
        seed: int,
        images: list[DecodedImage],
        response_format: str,
        base_url: str,
        timings: dict[str, float],
    ) -> dict[str, Any]:
        """The response body of stored images (blocking: b64_json may read them back)."""
        return render_body(
            created,
            seed,
            images,
            response_format,
            lambda key: self.url_for(key, base_url),
            self.store.get_bytes,
            timings,
        )

    def url_for(self, key: str, base_url: str) -> str:
        if isinstance(self.store, LocalStore):
            return f"{base_url.rstrip('/')}/v1/files/{key}"
        return self.store.url(key)

    # -- async jobs (serve/api/jobs.py; leases: serve/api/leases.py) --------------------------
    async def submit_job(self, body: Any, api_key: str | None = None) -> dict[str, Any]:
        request, params = self.parse(body)
        if request.stream:
            raise InvalidRequestError("stream", True, "jobs stream through GET /v1/images/jobs/{id}/events")
        if params.loras:
            await asyncio.to_thread(self.check_loras, params)
        self.limiter.admit(api_key, params.n)
        return await self.jobs.submit(request, params, on_end=lambda: self.limiter.release(api_key, params.n))

    async def get_job(self, job_id: str, base_url: str) -> dict[str, Any]:
        return await self.jobs.get(job_id, base_url)

    async def cancel_job(self, job_id: str) -> tuple[int, dict[str, Any]]:
        return await self.jobs.cancel(job_id)

    async def job_events(self, job_id: str, base_url: str) -> AsyncIterator[bytes]:
        return await self.jobs.events(job_id, base_url)

    # -- models, files, readiness -----------------------------------------------------------
    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.config.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "darkroom",
                    "family": self.info.family,
                    "native_size": "{}x{}".format(*self.info.native_size),
                    "size_multiple": self.family.size_multiple,
                    "schedulers": list(self.family.schedulers),
                }
            ],
        }

    async def file(self, key: str) -> bytes:
        if not isinstance(self.store, LocalStore):
            raise NotFoundError("files are served from object storage: use the image's url")
        return await asyncio.to_thread(self.store.get_bytes, key)

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        status: dict[str, str] = {}
        try:
            status.update(await asyncio.wait_for(self.stages.ready(), timeout=10))
        except Exception as exc:
            status["stages"] = f"unavailable: {exc}"
        try:
            await asyncio.wait_for(asyncio.to_thread(self.store.check), timeout=10)
            status["storage"] = "ok"
        except Exception as exc:
            status["storage"] = f"unavailable: {exc}"
        # A stage at zero replicas is ready: the first request starts it (serverless profile).
        return all(v in ("ok", "scaled_to_zero") for v in status.values()), status
