"""The image service behind the HTTP API: validate -> encode -> denoise -> decode+store -> respond.

Ray-free: it talks to the three stages through a ``StageClient`` (Ray deployment handles in
``deployments/``, plain in-process stage objects in ``LocalStages``), so the same request
handling serves the split Ray app, the monolithic baseline and unit tests.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from serve.api.idempotency import IdempotencyGuard
from serve.api.jobs import INTERNAL_FIELDS, JobRunner, LeasePolicy
from serve.api.limits import KeyLimiter, RateLimits
from serve.api.policy import PromptPolicy
from serve.api.schemas import ImageGenerationRequest, Limits, parse_generation_request
from serve.errors import (
    ContentPolicyError,
    ImagesWithheldError,
    ModelNotFoundError,
    NotFoundError,
    RequestTimeoutError,
)
from serve.families import family_of
from serve.metrics import NO_METRICS, Metrics
from serve.model import ModelInfo
from serve.params import GenerationParams
from serve.request_context import current
from serve.stages.messages import DecodedImage, DecodeRequest, StageClient
from serve.storage import LocalStore, ResultStore

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ServiceConfig:
    model_name: str
    limits: Limits = field(default_factory=Limits)
    request_timeout_s: float = 300.0
    stage_timeout_s: float = 300.0
    prompt_policy: PromptPolicy = field(default_factory=PromptPolicy)
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    rate_limits: RateLimits = field(default_factory=RateLimits)
    job_lease_s: float = 30.0
    job_attempts: int = 3


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def withheld_error(index: int) -> dict[str, Any]:
    """What the response says about an image the safety check withheld (OpenAI's moderation shape)."""
    return {
        "index": index,
        "error": {
            "message": f"image {index} was withheld: the image safety check flagged it",
            "type": "image_generation_user_error",
            "param": None,
            "code": "moderation_blocked",
        },
    }


def image_records(images: list[DecodedImage]) -> list[dict[str, Any]]:
    """Images as a job or idempotency record keeps them (in order: a withheld one keeps its place)."""
    return [{"withheld": True} if im.withheld else {"key": im.key, "content_type": im.content_type} for im in images]


def from_records(records: list[dict[str, Any]]) -> list[DecodedImage]:
    return [
        DecodedImage("", "", None, withheld=True)
        if im.get("withheld")
        else DecodedImage(im["key"], im["content_type"], None)
        for im in records
    ]


class ImageService:
    """Request handling for ``/v1/images/*``, ``/v1/models``, ``/v1/files``, readiness."""

    def __init__(
        self,
        config: ServiceConfig,
        info: ModelInfo,
        stages: StageClient,
        store: ResultStore,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.config = config
        self.info = info
        self.family = family_of(info)
        self.stages = stages
        self.store = store
        self.metrics = metrics
        self.idempotency = IdempotencyGuard(store, stale_after_s=config.request_timeout_s + 30)
        self.limiter = KeyLimiter(config.rate_limits)
        policy = LeasePolicy(config.job_lease_s, config.job_attempts, config.request_timeout_s)
        self.jobs = JobRunner(store, policy, self._execute_job, metrics=metrics)
        self.jobs.on_finish = self._job_finished
        self._job_keys: dict[str, tuple[str | None, int]] = {}  # job id -> (API key, images) to release

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
        timings: dict[str, float] = {}
        request_id = current()
        wake = getattr(self.stages, "wake", None)
        if wake is not None:
            wake()  # start scaled-to-zero stages now, not one after another
        plan = self.family.plan(params)
        t0 = time.perf_counter()
        enc = await self._bounded(self.stages.encode(list(plan.texts)), "TextEncoder")
        t1 = time.perf_counter()
        job = dataclasses.replace(plan.denoise_job(enc.value), request_id=request_id)
        den = await self._bounded(self.stages.denoise(job), "Denoiser")
        t2 = time.perf_counter()
        metadata = self.metadata(params, {"encode": _ms(enc.compute_s), "denoise": _ms(den.compute_s)})
        metadata["created"] = int(created if created is not None else metadata["created"])
        if request_id is not None:
            metadata["request_id"] = request_id
        dec_req = DecodeRequest(
            params.output_format,
            metadata,
            inline=request.response_format == "b64_json",
            output_compression=params.output_compression,
            request_id=request_id,
            result_id=result_id or uuid.uuid4().hex,
        )
        dec = await self._bounded(self.stages.decode(den.value, dec_req), "Decoder")
        t3 = time.perf_counter()
        storage_s = dec.extra.get("storage_s", 0.0)
        timings = {
            "encode": _ms(enc.compute_s),
            "denoise": _ms(den.compute_s),
            "decode": _ms(dec.compute_s - storage_s),
            "storage": _ms(storage_s),
            "encode_queue": _ms(max(0.0, (t1 - t0) - enc.compute_s)),
            "denoise_queue": _ms(max(0.0, (t2 - t1) - den.compute_s)),
            "decode_queue": _ms(max(0.0, (t3 - t2) - dec.compute_s)),
            "encode_batch": float(enc.batch_size),
            "denoise_batch": float(den.batch_size),
            "decode_batch": float(dec.batch_size),
            "total": _ms(t3 - t0),
        }
        return dec.value, timings

    def metadata(self, params: GenerationParams, timings_ms: dict[str, float]) -> dict[str, Any]:
        """What is stored beside each image (its index is added per image)."""
        meta = {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "seed": params.seed,
            "n": params.n,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "scheduler": self.family.scheduler_label(params.scheduler),
            "size": f"{params.width}x{params.height}",
            "model": self.config.model_name,
            "family": self.info.family,
            "output_format": params.output_format,
            "timings_ms": timings_ms,
            "created": int(time.time()),
        }
        if params.output_compression is not None:
            meta["output_compression"] = params.output_compression
        if params.user is not None:
            meta["user"] = params.user  # OpenAI's end-user id: recorded for abuse tracking
        return meta

    async def generate(
        self, body: Any, base_url: str, idempotency_key: str | None = None, api_key: str | None = None
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """``POST /v1/images/generations``: the OpenAI response body and the timings.

        ``api_key`` is the caller's key: its limits (``rate_limits``) apply. A request whose
        every image the safety check withheld raises :class:`ImagesWithheldError` (400).
        """
        request, params = self.parse(body)
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
        body_out = await asyncio.to_thread(
            self.render, out["created"], out["seed"], images, request.response_format, base_url, out["timings"]
        )
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
        data, withheld = [], []
        # Each image carries what reproduces it: the request's seed and its index in the batch of
        # n (image i of seed s and n is image i when sent again with s and n). Fields Darkroom does
        # not fill (OpenAI's revised_prompt) are absent, never null; so is ``withheld`` when the
        # safety check withheld nothing.
        for index, image in enumerate(images):
            if image.withheld:
                withheld.append(withheld_error(index))
                continue
            item: dict[str, Any] = {"seed": seed, "index": index}
            if response_format == "b64_json":
                raw = image.data if image.data is not None else self.store.get_bytes(image.key)
                item["b64_json"] = base64.b64encode(raw).decode("ascii")
            else:
                item["url"] = self.url_for(image.key, base_url)
            data.append(item)
        out: dict[str, Any] = {"created": created, "data": data, "timings": timings}
        if withheld:
            out["withheld"] = withheld
        return out

    def url_for(self, key: str, base_url: str) -> str:
        if isinstance(self.store, LocalStore):
            return f"{base_url.rstrip('/')}/v1/files/{key}"
        return self.store.url(key)

    # -- async jobs (serve/api/jobs.py: leases, resumption) ---------------------------------------
    async def submit_job(self, body: Any, api_key: str | None = None) -> dict[str, Any]:
        request, params = self.parse(body)
        self.limiter.admit(api_key, params.n)
        job_id = uuid.uuid4().hex
        # The request as the client sent it, with the resolved seed: another replica resuming
        # the job makes the same images from it.
        recorded = {**request.model_dump(mode="json", exclude_unset=True), "seed": params.seed}
        record = {
            "id": job_id,
            "object": "image.job",
            "status": "queued",
            "created": int(time.time()),
            "response_format": request.response_format,
            "seed": params.seed,
            "request_id": current(),
            "request": recorded,
        }
        self._job_keys[job_id] = (api_key, params.n)
        try:
            record = await self.jobs.submit(record)
        except BaseException:
            self._job_finished(record)
            raise
        return self.public(record)

    def _job_finished(self, record: dict[str, Any]) -> None:
        held = self._job_keys.pop(record["id"], None)
        if held is not None:
            self.limiter.release(*held)

    async def _execute_job(self, record: dict[str, Any]) -> dict[str, Any]:
        """One attempt at a job: its recorded request through the stages (``JobRunner`` calls it)."""
        request, params = self.parse(record["request"])
        run = self.run(request, params, result_id=record["id"], created=record["created"])
        try:
            images, timings = await asyncio.wait_for(run, self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"job took longer than {self.config.request_timeout_s:.0f} s") from None
        self._count_images(images)
        if images and all(im.withheld for im in images):
            raise ImagesWithheldError(f"all {len(images)} image(s) were withheld: the image safety check flagged them")
        return {"status": "succeeded", "images": image_records(images), "timings": timings}

    @staticmethod
    def public(record: dict[str, Any]) -> dict[str, Any]:
        """A job record as clients see it: without the Ingress's own fields (lease, recorded request)."""
        return {k: v for k, v in record.items() if k not in INTERNAL_FIELDS}

    async def get_job(self, job_id: str, base_url: str) -> dict[str, Any]:
        record = self.public(await asyncio.to_thread(self.store.get_job, job_id))
        if record.get("status") != "succeeded":
            return record
        images = from_records(record.get("images", []))
        body = await asyncio.to_thread(
            self.render,
            record["created"],
            record["seed"],
            images,
            record.get("response_format", "url"),
            base_url,
            record.get("timings", {}),
        )
        out = {k: v for k, v in record.items() if k != "images"}
        out["result"] = body
        return out

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
