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
sizes are always 1). Streaming, jobs' progress and cancellation go through diffusers'
``callback_on_step_end``: after each step it reports progress (and a partial image of the
current latents, normalised: the callback gets no noise prediction, so no x0 estimate), and a
request whose client left, or a cancelled job, raises out of the pipeline there, freeing the
pipeline thread after the step in progress. Select it with ``darkroom serve --config deployments/configs/monolith.yaml``
or ``build_monolith_app(args)``; ``args`` are ``AppConfig``'s plus an optional ``monolith``
key (``DeploymentOptions``; default: the Denoiser's replicas/resources and the Ingress's
request limits).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
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
from serve.api.streaming import Developed
from serve.errors import ModelLoadError, RequestTimeoutError
from serve.families import family_of
from serve.families.preview import fit_latent_rgb
from serve.imageio import encode_image
from serve.model import ModelInfo
from serve.params import GenerationParams
from serve.stages.messages import Conditioning, DecodedImage, DenoiseJob, DenoiseProgress, StageResult
from serve.stages.progress import EventChannel, preview_iterations, scaled_step
from serve.storage import ResultStore, open_store
from serve.storage.base import image_format, result_image_key

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "Monolith"


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class DiffusersRunner:
    """The family's own diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``FluxPipeline``), one call per request, with per-stage timers."""

    def __init__(
        self, info: ModelInfo, *, device: str | None = None, dtype: str | None = None, step_delay_s: float = 0.0
    ) -> None:
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
        self._preview_map: np.ndarray | None = None
        self.step_delay_s = step_delay_s  # AppConfig.debug_step_delay_s: tests' slow-on-purpose hook

    def preview_map(self) -> np.ndarray | None:
        """The partial images' latent -> RGB map, fitted on this pipeline's VAE at first use."""
        if self._preview_map is None:
            vae = self.pipe.vae
            try:
                self._preview_map = fit_latent_rgb(
                    self.family, lambda z: vae.decode(z).sample, device=vae.device, dtype=vae.dtype
                )
            except Exception:
                logger.warning("could not fit the preview map: partial images are off", exc_info=True)
        return self._preview_map

    def _callback(self, params: GenerationParams, stop: threading.Event | None, on_step: Any, previews: int) -> Any:
        """diffusers' ``callback_on_step_end``: progress and partial images after each step, and
        the way to stop a run between steps (raising out of the pipeline)."""
        job = DenoiseJob(Conditioning({}), params.seed, params.num_inference_steps, params.guidance_scale,
                         params.width, params.height, params.n, partial_images=previews,
                         preview_map=self._preview_map if previews else None)  # fmt: skip

        def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if self.step_delay_s > 0:
                time.sleep(self.step_delay_s)
            if stop is not None and stop.is_set():
                raise _Stopped()
            if on_step is not None:
                iterations = len(pipe.scheduler.timesteps)
                at = preview_iterations(iterations, job.partial_images if job.preview_map is not None else 0)
                step = scaled_step(i + 1, iterations, params.num_inference_steps)
                if i + 1 in at:
                    # diffusers hands callbacks the latents after the step, not the noise
                    # prediction: the preview is of the current (noisy) latents, normalised.
                    latents = self.family.scale_input(pipe.scheduler, kwargs["latents"], t)
                    preview = self.family.preview(latents, job)
                    on_step(DenoiseProgress(step, params.num_inference_steps, preview, at.index(i + 1)))
                else:
                    on_step(DenoiseProgress(step, params.num_inference_steps))
            return kwargs

        return callback

    def generate(
        self,
        params: GenerationParams,
        stop: threading.Event | None = None,
        on_step: Any = None,
        partial_images: int = 0,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """uint8 (n, H, W, 3) images and seconds per stage. Not thread-safe: one caller at a time.

        ``stop`` set ends the run after the step in progress (``_Stopped``); ``on_step`` gets a
        ``DenoiseProgress`` after each step (with ``partial_images`` previews)."""
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
        if partial_images:
            self.preview_map()
        out = pipe(
            **self.family.pipeline_kwargs(params),
            generator=torch.Generator("cpu").manual_seed(params.seed),
            output_type="np",
            callback_on_step_end=self._callback(params, stop, on_step, partial_images),
        )
        images = (out.images * 255).round().astype("uint8")
        total = time.perf_counter() - t0
        decode_s = self._decode_s
        return images, {"encode": encode_s, "decode": decode_s, "denoise": total - encode_s - decode_s}


class _Stopped(Exception):
    """Raised from the step callback to end a run whose client left (or that timed out)."""


class MonolithStages:
    """The ``StageClient`` slot of ``ImageService``: only readiness is asked of it here,
    because ``MonolithService.run`` replaces the three stage calls."""

    async def encode(self, texts: list[str]) -> StageResult:
        raise NotImplementedError("the monolith has no separate stages")

    async def denoise(self, job: Any) -> StageResult:
        raise NotImplementedError("the monolith has no separate stages")

    async def decode(self, latents: np.ndarray, request: Any) -> StageResult:
        raise NotImplementedError("the monolith has no separate stages")

    def denoise_stream(self, job: Any) -> Any:
        raise NotImplementedError("the monolith has no separate stages")

    async def preview_map(self) -> np.ndarray | None:
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

    def _generate(
        self, params: GenerationParams, submitted: float, stop: threading.Event, on_step: Any = None, previews: int = 0
    ) -> tuple[np.ndarray, dict[str, float]]:
        queued = time.perf_counter() - submitted
        if stop.is_set():  # its client left while it queued: never start it
            raise _Stopped()
        images, seconds = self.runner.generate(params, stop, on_step, previews)
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
        stop = threading.Event()
        work = asyncio.get_running_loop().run_in_executor(self._executor, self._generate, params, t0, stop)
        work.add_done_callback(lambda f: f.cancelled() or f.exception())  # a stopped run's _Stopped is expected
        try:
            images, s = await self._bounded(asyncio.shield(work), DEPLOYMENT_NAME)
        except BaseException:
            stop.set()  # timed out or cancelled (the client left): the run ends after its current step
            raise
        inline = request.response_format == "b64_json"
        return await self._stored(inline, images, s, params, t0, result_id, created)

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
    ) -> AsyncIterator[Any]:
        """``ImageService.develop`` on the one pipeline: progress from its step callback."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        channel, stop = EventChannel(loop), threading.Event()
        work = loop.run_in_executor(self._executor, self._generate, params, t0, stop, channel.push, partial_images)

        def done(future: asyncio.Future) -> None:
            if future.cancelled():
                channel.finish(asyncio.CancelledError())
            elif future.exception() is not None:
                channel.finish(future.exception())
            else:
                channel.finish(StageResult(future.result(), 0.0))

        work.add_done_callback(done)
        result = None
        try:
            async with contextlib.aclosing(channel.__aiter__()) as items:
                while result is None:
                    remaining = deadline - loop.time()
                    try:
                        item = await asyncio.wait_for(anext(items), max(remaining, 0.0))
                    except asyncio.TimeoutError:
                        raise RequestTimeoutError(f"{DEPLOYMENT_NAME} did not finish in time") from None
                    if isinstance(item, StageResult):
                        result = item.value
                    else:
                        yield item
        finally:
            stop.set()  # no-op when the run is done; otherwise it ends after its current step
        images, s = result
        stored, timings = await self._stored(True, images, s, params, t0, result_id, created)
        yield Developed(stored, timings)

    async def _stored(
        self,
        inline: bool,
        images: np.ndarray,
        s: dict[str, float],
        params: GenerationParams,
        t0: float,
        result_id: str | None = None,
        created: float | None = None,
    ) -> tuple[list[DecodedImage], dict]:
        metadata = self.metadata(
            params, {"encode": _ms(s["encode"]), "denoise": _ms(s["denoise"]), "decode": _ms(s["decode"])}
        )
        if created is not None:
            metadata["created"] = int(created)
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
        metrics = replica_observability(DEPLOYMENT_NAME, cfg.log_level, cfg.gil_interval_ms())
        if cfg.backend not in ("torch", "auto"):
            logger.warning("the monolith runs diffusers (torch); ignoring backend=%s", cfg.backend)
        info = cfg.model_info()
        service_cfg = cfg.service_config(info.name)
        store = open_store(cfg.storage, url_expiry_s=cfg.url_expiry_s, s3_options=cfg.storage_options)
        load = cfg.load_kwargs()
        runner = DiffusersRunner(info, device=load["device"], dtype=load["dtype"], step_delay_s=cfg.debug_step_delay_s)
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
