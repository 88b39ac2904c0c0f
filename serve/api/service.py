"""The image service behind the HTTP API: validate -> encode -> denoise -> decode+store -> respond.

Ray-free: it talks to the three stages through a ``StageClient`` (Ray deployment handles in
``deployments/``, plain in-process stage objects in ``LocalStages``), so the same request
handling serves the split Ray app, the monolithic baseline and unit tests.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from serve.api.idempotency import IdempotencyGuard
from serve.api.policy import PromptPolicy
from serve.api.schemas import ImageGenerationRequest, Limits, parse_generation_request
from serve.errors import (
    DarkroomError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    RequestTimeoutError,
)
from serve.families import family_of
from serve.model import ModelInfo
from serve.params import GenerationParams
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
    #: The stages' engine backend: per-request LoRA needs torch (``serve.lora.LORA_BACKENDS``).
    backend: str = "torch"


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def lora_list(loras: tuple[tuple[str, float], ...]) -> list[dict[str, Any]]:
    """``(("ink", 0.8),)`` -> ``[{"name": "ink", "scale": 0.8}]``: as the request sends them."""
    return [{"name": n, "scale": s} for n, s in loras]


class ImageService:
    """Request handling for ``/v1/images/*``, ``/v1/models``, ``/v1/files``, readiness."""

    def __init__(
        self,
        config: ServiceConfig,
        info: ModelInfo,
        stages: StageClient,
        store: ResultStore,
        loras: Any = None,
    ) -> None:
        self.config = config
        self.info = info
        self.family = family_of(info)
        self.stages = stages
        self.store = store
        self.loras = loras  # serve.lora.LoraCatalog of the adapter repository, or None
        self._jobs: set[asyncio.Task] = set()  # strong refs: the loop only keeps weak ones
        self.idempotency = IdempotencyGuard(store, stale_after_s=config.request_timeout_s + 30)

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
        policy.check(params.prompt, params.negative_prompt, moderation=request.moderation or "auto")
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
        try:
            return await asyncio.wait_for(coro, timeout=self.config.stage_timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"{stage} did not answer within {self.config.stage_timeout_s:.0f} s") from None

    async def run(self, request: ImageGenerationRequest, params: GenerationParams) -> tuple[list[DecodedImage], dict]:
        """Run one request through the stages; returns its stored images and timings (ms)."""
        timings: dict[str, float] = {}
        wake = getattr(self.stages, "wake", None)
        if wake is not None:
            wake()  # start scaled-to-zero stages now, not one after another
        plan = self.family.plan(params)
        t0 = time.perf_counter()
        # Without adapters, the one-argument call every StageClient takes.
        encoding = (
            self.stages.encode(list(plan.texts), params.loras) if params.loras else self.stages.encode(list(plan.texts))
        )
        enc = await self._bounded(encoding, "TextEncoder")
        t1 = time.perf_counter()
        job = plan.denoise_job(enc.value)
        den = await self._bounded(self.stages.denoise(job), "Denoiser")
        t2 = time.perf_counter()
        metadata = self.metadata(params, {"encode": _ms(enc.compute_s), "denoise": _ms(den.compute_s)})
        dec_req = DecodeRequest(
            params.output_format,
            metadata,
            inline=request.response_format == "b64_json",
            output_compression=params.output_compression,
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
        for key in ("lora_hits", "lora_misses"):  # the Denoiser's adapter cache, for the bench
            if key in den.extra:
                timings[key] = float(den.extra[key])
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
        if params.loras:
            meta["loras"] = lora_list(params.loras)
        return meta

    async def generate(
        self, body: Any, base_url: str, idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """``POST /v1/images/generations``: the OpenAI response body and the timings."""
        request, params = self.parse(body)
        if params.loras:
            await asyncio.to_thread(self.check_loras, params)

        async def produce() -> dict[str, Any]:
            created = int(time.time())
            try:
                images, timings = await asyncio.wait_for(self.run(request, params), self.config.request_timeout_s)
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
                out["images"] = [{"key": im.key, "content_type": im.content_type} for im in out["images"]]
                return out

            out = await self.idempotency.run(idempotency_key, fields, produce_record, self.config.request_timeout_s)
            images = [DecodedImage(im["key"], im["content_type"], None) for im in out["images"]]
        body_out = await asyncio.to_thread(
            self.render, out["created"], out["seed"], images, request.response_format, base_url, out["timings"]
        )
        if params.loras:
            body_out["loras"] = lora_list(params.loras)  # what made these images, beside the seed
        return body_out, out["timings"]

    def render(
        self,
        created: int,
        seed: int,
        images: list[DecodedImage],
        response_format: str,
        base_url: str,
        timings: dict[str, float],
    ) -> dict[str, Any]:
        data = []
        # Each image carries what reproduces it: the request's seed and its index in the batch of
        # n (image i of seed s and n is image i when sent again with s and n). Fields Darkroom does
        # not fill (OpenAI's revised_prompt) are absent, never null.
        for index, image in enumerate(images):
            item: dict[str, Any] = {"seed": seed, "index": index}
            if response_format == "b64_json":
                raw = image.data if image.data is not None else self.store.get_bytes(image.key)
                item["b64_json"] = base64.b64encode(raw).decode("ascii")
            else:
                item["url"] = self.url_for(image.key, base_url)
            data.append(item)
        return {"created": created, "data": data, "timings": timings}

    def url_for(self, key: str, base_url: str) -> str:
        if isinstance(self.store, LocalStore):
            return f"{base_url.rstrip('/')}/v1/files/{key}"
        return self.store.url(key)

    # -- async jobs ---------------------------------------------------------------------------
    async def submit_job(self, body: Any) -> dict[str, Any]:
        request, params = self.parse(body)
        if params.loras:
            await asyncio.to_thread(self.check_loras, params)
        job_id = uuid.uuid4().hex
        record = {
            "id": job_id,
            "object": "image.job",
            "status": "queued",
            "created": int(time.time()),
            "response_format": request.response_format,
            "seed": params.seed,
        }
        if params.loras:
            record["loras"] = lora_list(params.loras)
        await asyncio.to_thread(self.store.put_job, job_id, record)
        task = asyncio.create_task(self._run_job(record, request, params))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return record

    async def _run_job(self, record: dict, request: ImageGenerationRequest, params: GenerationParams) -> None:
        job_id = record["id"]
        try:
            await asyncio.to_thread(self.store.put_job, job_id, {**record, "status": "running"})
            images, timings = await asyncio.wait_for(self.run(request, params), self.config.request_timeout_s)
            done = {
                **record,
                "status": "succeeded",
                "finished": int(time.time()),
                "images": [{"key": im.key, "content_type": im.content_type} for im in images],
                "timings": timings,
            }
        except Exception as exc:  # the job records any failure; the server carries on
            logger.exception("job %s failed", job_id)
            err = exc if isinstance(exc, DarkroomError) else DarkroomError(f"generation failed: {exc}")
            done = {**record, "status": "failed", "finished": int(time.time()), **err.to_openai()}
        try:
            await asyncio.to_thread(self.store.put_job, job_id, done)
        except Exception:
            logger.exception("could not record the end of job %s", job_id)

    async def get_job(self, job_id: str, base_url: str) -> dict[str, Any]:
        record = await asyncio.to_thread(self.store.get_job, job_id)
        if record.get("status") != "succeeded":
            return record
        images = [DecodedImage(im["key"], im["content_type"], None) for im in record.get("images", [])]
        body = await asyncio.to_thread(
            self.render,
            record["created"],
            record["seed"],
            images,
            record.get("response_format", "url"),
            base_url,
            record.get("timings", {}),
        )
        if record.get("loras"):
            body["loras"] = record["loras"]
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
