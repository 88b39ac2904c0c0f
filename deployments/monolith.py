"""The monolithic baseline: ONE deployment (``Monolith``) running diffusers' whole
``StableDiffusionPipeline`` per request, behind the same HTTP API as the split app.

This is how Ray Serve's Stable Diffusion example serves a model: ``from_pretrained`` once per
replica, then ``pipe(prompt, ...)`` for one request at a time (here on a single worker thread,
so requests queue FIFO and a timed-out request that has not started never runs). Per request
the scheduler is ``scheduler_class(name, default).from_config(...)`` on a per-request copy of
the pipeline and the generator is ``torch.Generator("cpu").manual_seed(seed)``, so its images
are diffusers' own and meet the seed contract by construction.

Routes, validation, errors, jobs, files and readiness are ``serve.api``'s: ``MonolithService``
is an ``ImageService`` whose ``run`` calls the pipeline instead of three stages, and it reports
the same ``timings`` keys (encode = ``encode_prompt``, decode = VAE decode + image encoding,
denoise = the rest of the call, ``encode_queue`` = waiting for the pipeline thread; batch
sizes are always 1). Select it with ``darkroom serve --config deployments/configs/monolith.yaml``
or ``build_monolith_app(args)``; ``args`` are ``AppConfig``'s plus an optional ``monolith``
key (``DeploymentOptions``; default: the Denoiser's replicas/resources and the Ingress's
request limits).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve import Application

from deployments.config import AppConfig, DeploymentOptions
from deployments.observability import replica_observability
from serve.api.http import create_app
from serve.api.schemas import ImageGenerationRequest
from serve.api.service import ImageService, ServiceConfig
from serve.errors import ModelLoadError
from serve.families import family_of
from serve.imageio import encode_image
from serve.model import ModelInfo
from serve.params import GenerationParams
from serve.stages.messages import DecodedImage, StageResult
from serve.storage import ResultStore, open_store
from serve.storage.base import image_format, result_image_key

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "Monolith"


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class DiffusersRunner:
    """The family's own diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``FluxPipeline``), one call per request, with per-stage timers."""

    def __init__(self, info: ModelInfo, *, device: str | None = None, dtype: str | None = None) -> None:
        import diffusers

        from serve.engines import default_device, default_dtype

        if not (Path(info.path) / "model_index.json").is_file() or (Path(info.path) / "manifest.json").is_file():
            raise ModelLoadError(f"the monolith runs diffusers folders only; {info.path} is not one")
        self.family = family_of(info)
        dev = default_device(device)
        cls = getattr(diffusers, self.family.pipeline_class)
        extra = {"safety_checker": None, "requires_safety_checker": False} if self.family.name == "sd" else {}
        self.pipe = cls.from_pretrained(info.path, torch_dtype=default_dtype(dev, dtype), **extra).to(dev)
        self.pipe.set_progress_bar_config(disable=True)
        self.default_scheduler = type(self.pipe.scheduler).__name__
        self._decode_s = 0.0
        vae_decode = self.pipe.vae.decode

        def timed_decode(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return vae_decode(*args, **kwargs)
            finally:
                self._decode_s += time.perf_counter() - t0

        self.pipe.vae.decode = timed_decode  # shared by every per-request copy

    def generate(self, params: GenerationParams) -> tuple[np.ndarray, dict[str, float]]:
        """uint8 (n, H, W, 3) images and seconds per stage. Not thread-safe: one caller at a time."""
        import torch

        from serve.schedulers import scheduler_class

        t0 = time.perf_counter()
        cls = scheduler_class(params.scheduler, self.default_scheduler, self.family.schedulers)
        scheduler = cls.from_config(self.pipe.scheduler.config)
        # A per-request copy: diffusers keeps per-run state on the scheduler (diffusers #1606).
        extra = {"requires_safety_checker": False} if self.family.name == "sd" else {}
        pipe = type(self.pipe)(**{**self.pipe.components, "scheduler": scheduler}, **extra)
        pipe.set_progress_bar_config(disable=True)
        encode_s = 0.0
        encode_prompt = pipe.encode_prompt

        def timed_encode(*args: Any, **kwargs: Any) -> Any:
            nonlocal encode_s
            a = time.perf_counter()
            try:
                return encode_prompt(*args, **kwargs)
            finally:
                encode_s += time.perf_counter() - a

        pipe.encode_prompt = timed_encode
        self._decode_s = 0.0
        out = pipe(
            **self.family.pipeline_kwargs(params),
            generator=torch.Generator("cpu").manual_seed(params.seed),
            output_type="np",
        )
        images = (out.images * 255).round().astype("uint8")
        total = time.perf_counter() - t0
        decode_s = self._decode_s
        return images, {"encode": encode_s, "decode": decode_s, "denoise": total - encode_s - decode_s}


class MonolithStages:
    """The ``StageClient`` slot of ``ImageService``: only readiness is asked of it here,
    because ``MonolithService.run`` replaces the three stage calls."""

    async def encode(self, texts: list[str]) -> StageResult:
        raise NotImplementedError("the monolith has no separate stages")

    async def denoise(self, job: Any) -> StageResult:
        raise NotImplementedError("the monolith has no separate stages")

    async def decode(self, latents: np.ndarray, request: Any) -> StageResult:
        raise NotImplementedError("the monolith has no separate stages")

    async def ready(self) -> dict[str, str]:
        return {DEPLOYMENT_NAME: "ok"}


class MonolithService(ImageService):
    """``ImageService`` whose generation is one ``StableDiffusionPipeline`` call per request."""

    def __init__(
        self, config: ServiceConfig, info: ModelInfo, runner: DiffusersRunner, store: ResultStore, metrics=None
    ) -> None:
        super().__init__(config, info, MonolithStages(), store, **({"metrics": metrics} if metrics else {}))
        self.runner = runner
        self.safety: Any = None  # serve.safety.ImageSafetyChecker when the policy names one, as the Decoder's
        # One worker: the pipeline runs one request at a time, in arrival order.
        self._executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="monolith")

    def _generate(self, params: GenerationParams, submitted: float) -> tuple[np.ndarray, dict[str, float]]:
        queued = time.perf_counter() - submitted
        images, seconds = self.runner.generate(params)
        return images, {**seconds, "queue": queued}

    def _store(self, images: np.ndarray, params: GenerationParams, metadata: dict, inline: bool, result_id: str):
        out, encode_s, store_s = [], 0.0, 0.0
        extension, _ = image_format(params.output_format)
        flagged = self.safety.check(images) if self.safety is not None else [False] * len(images)
        for index, img in enumerate(images):
            if flagged[index]:
                self.metrics.inc("darkroom_policy_blocks_total", check="image")
                out.append(DecodedImage("", "", None, withheld=True))
                continue
            a = time.perf_counter()
            data = encode_image(img, params.output_format, params.output_compression)
            b = time.perf_counter()
            # Keys from the request's result id, written once: as the split app's Decoder stores.
            key = result_image_key(result_id, index, extension, metadata["created"])
            stored = self.store.save_image(data, params.output_format, {**metadata, "index": index}, key=key)
            store_s += time.perf_counter() - b
            encode_s += b - a
            out.append(DecodedImage(stored.key, stored.content_type, data if inline else None))
        return out, encode_s, store_s

    async def run(
        self,
        request: ImageGenerationRequest,
        params: GenerationParams,
        *,
        result_id: str | None = None,
        created: float | None = None,
    ) -> tuple[list[DecodedImage], dict]:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._executor, self._generate, params, t0)
        images, s = await self._bounded(work, DEPLOYMENT_NAME)
        metadata = self.metadata(
            params, {"encode": _ms(s["encode"]), "denoise": _ms(s["denoise"]), "decode": _ms(s["decode"])}
        )
        if created is not None:
            metadata["created"] = int(created)
        inline = request.response_format == "b64_json"
        result_id = result_id or uuid.uuid4().hex
        stored, encode_s, store_s = await asyncio.to_thread(self._store, images, params, metadata, inline, result_id)
        timings = {
            "encode": _ms(s["encode"]),
            "denoise": _ms(s["denoise"]),
            "decode": _ms(s["decode"] + encode_s),
            "storage": _ms(store_s),
            "encode_queue": _ms(s["queue"]),
            "denoise_queue": 0.0,
            "decode_queue": 0.0,
            "encode_batch": 1.0,
            "denoise_batch": 1.0,
            "decode_batch": 1.0,
            "total": _ms(time.perf_counter() - t0),
        }
        return stored, timings


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()  # late-bound, like deployments.ingress.Ingress
class Monolith:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(config)
        metrics = replica_observability(DEPLOYMENT_NAME, cfg.log_level)
        if cfg.backend not in ("torch", "auto"):
            logger.warning("the monolith runs diffusers (torch); ignoring backend=%s", cfg.backend)
        info = cfg.model_info()
        service_cfg = cfg.service_config(info.name)
        store = open_store(cfg.storage, url_expiry_s=cfg.url_expiry_s, s3_options=cfg.storage_options)
        load = cfg.load_kwargs()
        runner = DiffusersRunner(info, device=load["device"], dtype=load["dtype"])
        self.service = MonolithService(service_cfg, info, runner, store, metrics)
        if cfg.prompt_policy.image_checker:
            from serve.safety import ImageSafetyChecker, checker_folder

            folder = checker_folder(cfg.prompt_policy.image_checker, info.path)
            self.service.safety = ImageSafetyChecker.load(folder, device=str(runner.pipe.device))

    def __serve_build_asgi_app__(self):
        return create_app(self.service, behind_serve_proxy=True)


def monolith_options(cfg: AppConfig, override: dict[str, Any] | DeploymentOptions | None) -> DeploymentOptions:
    """The ``monolith`` options given, else the Denoiser's replicas/resources (it is the model
    replica) with the Ingress's request limits (it is the HTTP entry too)."""
    if isinstance(override, DeploymentOptions):
        return override
    if override is not None:
        return DeploymentOptions.model_validate(override)
    # Every Denoiser option (replicas, autoscaling, resources, shutdown) but the request limits.
    return cfg.denoiser.model_copy(
        update={
            "max_ongoing_requests": cfg.ingress.max_ongoing_requests,
            "max_queued_requests": cfg.ingress.max_queued_requests,
            "max_batch_size": 1,
        }
    )


def build_monolith_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """The baseline app: ``AppConfig`` args (plus optional ``monolith`` options) -> one deployment."""
    raw: dict[str, Any] | AppConfig = dict(args or {}) if not isinstance(args, AppConfig) else args
    override = raw.pop("monolith", None) if isinstance(raw, dict) else None
    cfg = raw if isinstance(raw, AppConfig) else AppConfig.model_validate(raw)
    if "://" not in cfg.storage:  # replicas do not share the caller's working directory
        cfg = cfg.model_copy(update={"storage": str(Path(cfg.storage).expanduser().resolve())})
    opts = monolith_options(cfg, override)
    return Monolith.options(**opts.serve_options(DEPLOYMENT_NAME)).bind(cfg.model_dump(mode="json"))
