"""Stage 2: the scheduler loop over the denoiser (UNet or transformer), batched across requests.

Every request keeps its own scheduler, generator and latents; one denoiser call per iteration
serves all requests with the same batch key (the family's: the latent size), each at its own
timestep (the denoiser takes a per-sample timestep vector) and guidance. Requests with different
step counts or schedulers share the loop: a request leaves the batch when its timesteps run
out. Requests with different keys run as separate groups.

Per request this is the family's diffusers ``__call__`` steps "prepare timesteps" to "denoising
loop": ``set_timesteps`` -> initial latents from ``Generator("cpu").manual_seed(seed)`` -> for
each t: CFG doubling, ``scale_model_input``, denoiser, guidance, ``step`` (``serve/families``
says what each of those is for SD, SDXL and Flux).

LoRA adapters (``job.loras``) are not part of the batch key: requests with different adapters
(or none) share each denoiser call, and each call states which rows use which adapters
(``serve.lora.runtime``: a request's rows, CFG's negative ones included, form one run).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.engines import Engine
from serve.errors import InvalidRequestError
from serve.families import Family, family_of
from serve.lora.catalog import refuse_loras
from serve.model import ModelInfo
from serve.schedulers import scheduler_class
from serve.stages.loading import load_stage_engines
from serve.stages.messages import DenoiseJob, DenoiseProgress, StageResult, StepCache
from serve.stages.progress import preview_iterations, scaled_step

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _State:
    """A request in flight: its own scheduler, generator, latents and conditioning rows."""

    index: int  # position in the denoise() call
    job: DenoiseJob
    key: Hashable  # the family's batch key
    scheduler: Any
    kwargs: dict[str, Any]
    timesteps: list[torch.Tensor]
    latents: torch.Tensor
    inputs: dict[str, torch.Tensor]  # per-row conditioning: [negative x n, positive x n] with CFG
    i: int = 0
    cancelled: bool = False
    preview_at: tuple[int, ...] = ()  # iterations after which to draw a partial image
    preview: np.ndarray | None = None  # the partial image drawn by the last iteration, if any
    cache: Any = None  # serve.engines.step_cache.RequestCache when the request runs a step cache

    @property
    def done(self) -> bool:
        return self.cancelled or self.i >= len(self.timesteps)

    def progress(self) -> DenoiseProgress:
        """Where this request stands, with the partial image of the last iteration (if one was due)."""
        total = self.job.num_inference_steps
        step = scaled_step(self.i, len(self.timesteps), total)
        if self.preview is None:
            return DenoiseProgress(step, total)
        return DenoiseProgress(step, total, self.preview, self.preview_at.index(self.i))


class Denoiser:
    """Runs batches of ``DenoiseJob``s; returns each job's final latents (n, C, h, w)."""

    def __init__(
        self,
        info: ModelInfo,
        engine: Engine,
        *,
        max_batch_samples: int = 32,
        step_cache: StepCache | None = None,
        loras: Any = None,
        lora_cache_bytes: int | None = None,
    ) -> None:
        from serve.lora import DEFAULT_CACHE_BYTES, runtime_for

        self.info = info
        self.family: Family = family_of(info)
        self.engine = engine
        self.max_batch_samples = max_batch_samples
        # The step cache of jobs that do not name one (config; None: off, the seed contract holds).
        self.step_cache = step_cache
        self.lora_repository = loras
        engines = {self.family.denoiser_component: engine}
        self.lora = runtime_for(engines, self.family, loras, max_bytes=lora_cache_bytes or DEFAULT_CACHE_BYTES)
        if self.lora is not None and hasattr(engine, "run_eagerly"):
            # Per-row LoRA hooks read each call's row runs: a captured CUDA graph would replay the
            # runs of its capture, a compiled or traced module would freeze them, and bucket padding
            # would add rows no run covers. So with adapters the denoiser runs eagerly.
            engine.run_eagerly("per-request LoRA adapters")
        self.model_calls = 0
        self.last_batch_sizes: list[int] = []  # denoiser batch sizes of the last call, for tests/metrics
        self.last_cache_stats: list[dict[str, int] | None] = []  # per job of the last denoise(): step-cache use

    @classmethod
    def load(
        cls,
        source: str | Path | ModelInfo,
        *,
        backend: str = "torch",
        device: str | None = None,
        dtype: str | None = None,
        torch_options: Any = None,
        step_cache: StepCache | None = None,
        loras: Any = None,
        lora_cache_bytes: int | None = None,
    ) -> Denoiser:
        info, family, engines = load_stage_engines(
            source, role="denoiser", backend=backend, device=device, dtype=dtype, torch_options=torch_options
        )
        return cls(
            info,
            engines[family.denoiser_component],
            step_cache=step_cache,
            loras=loras,
            lora_cache_bytes=lora_cache_bytes,
        )

    def warm_up(self, requests: int) -> list[int]:
        """Prepare the denoiser's shapes before the first request (Triton's ``model_warmup``).

        With traces (``jit``), CUDA graphs or ``torch.compile`` the first batch of each input
        shape pays a trace, a capture or a compile (a tiny-model trace ~0.6 s on a CPU; a compile
        can take a minute on a GPU), and the request that brings it waits. So one step runs here
        for each batch of 1..``requests`` single-image requests at the model's native size, with
        the family's default guidance: the batches continuous batching forms most. Other sizes,
        guidance off and n > 1 still pay on their first batch. Returns the batch rows run: none
        for an engine that prepares nothing per shape, or with ``TorchOptions.warm_up`` off.
        """
        engine = self.engine
        if requests < 1 or not getattr(engine, "shape_specialized", False) or not engine.options.warm_up:
            return []
        from serve.params import GenerationParams

        width, height = self.info.native_size
        defaults = self.family.request_defaults()
        params = GenerationParams(
            prompt="",
            negative_prompt=None,
            width=width,
            height=height,
            num_inference_steps=1,
            guidance_scale=defaults["guidance_scale"],
            seed=0,
            n=1,
            scheduler=None,
            output_format="png",
        )
        plan = self.family.plan(params)
        zeros = {name: np.zeros(shape, np.float32) for name, shape in self.family.conditioning_shapes().items()}
        job = plan.denoise_job([zeros] * len(plan.texts))
        rows: list[int] = []
        t0 = time.perf_counter()
        for k in range(1, requests + 1):
            self.denoise([job] * k)
            rows.extend(self.last_batch_sizes)
        logger.info(
            "warmed the denoiser up for %d batch size(s) at %dx%d in %.1f s",
            len(rows),
            width,
            height,
            time.perf_counter() - t0,
        )
        self.model_calls = 0  # counts requests' calls (tests, metrics), not the warm-up's
        return rows

    def validate(self, job: DenoiseJob) -> None:
        """Reject a job before it joins a batch, so one bad job never fails its batch-mates."""
        m = self.family.size_multiple
        for name, side in (("width", job.width), ("height", job.height)):
            if side <= 0 or side % m:
                raise InvalidRequestError(name, side, f"must be a positive multiple of {m} for this model")
        if job.num_inference_steps < 1:
            raise InvalidRequestError("num_inference_steps", job.num_inference_steps, "must be at least 1")
        if job.n < 1:
            raise InvalidRequestError("n", job.n, "must be at least 1")
        if job.partial_images < 0:
            raise InvalidRequestError("partial_images", job.partial_images, "must be at least 0")
        if job.partial_images and job.preview_map is not None:
            shape = (self.info.latent_channels + 1, 3)
            if tuple(np.shape(job.preview_map)) != shape:
                raise InvalidRequestError("preview_map", tuple(np.shape(job.preview_map)), f"expected {shape}")
        expected = self.family.conditioning_shapes()
        for side, rows in (("positive", job.conditioning.positive), ("negative", job.conditioning.negative)):
            if rows is None:
                if side == "negative" and job.cfg:
                    raise InvalidRequestError("conditioning.negative", None, "required with classifier-free guidance")
                continue
            if set(rows) != set(expected):
                raise InvalidRequestError(f"conditioning.{side}", sorted(rows), f"expected arrays {sorted(expected)}")
            for name, shape in expected.items():
                if tuple(np.shape(rows[name])) != shape:
                    field = f"conditioning.{side}.{name}"
                    raise InvalidRequestError(field, tuple(np.shape(rows[name])), f"expected {shape}")
        # The name only: building a scheduler here (from_config introspects its __init__) cost
        # ~35% of the colocated replica's event-loop time per request (py-spy, c=8); start() builds it.
        scheduler_class(job.scheduler, self.info.scheduler_class, self.family.schedulers)
        kind = getattr(self.engine, "step_cache_kind", None)
        if job.step_cache is not None and job.step_cache.kind != kind:
            have = f"{kind} only" if kind else "none"
            raise InvalidRequestError("step_cache", job.step_cache.kind, f"this denoiser's engine runs {have}")
        refuse_loras(self.lora, self.lora_repository, [self.engine], job.loras)

    def use_loras(self, job: DenoiseJob) -> contextlib.AbstractContextManager:
        """Load (if needed) and pin the job's adapters while the block runs; raises a 400 naming
        ``loras[i].name`` for an unknown or unfitting adapter. Call it before the job joins a batch."""
        if not job.loras:
            return contextlib.nullcontext()
        refuse_loras(self.lora, self.lora_repository, [self.engine], job.loras)
        return self.lora.use(job.loras)

    # -- the step-level API used by continuous batching (serve/stages/continuous.py) -------------
    def start(self, job: DenoiseJob, index: int = 0) -> _State:
        """A validated job's state in flight: its scheduler, generator and initial latents."""
        dev, dtype = self.engine.device, self.engine.dtype
        family = self.family
        scheduler = family.new_scheduler(job.scheduler)
        family.set_timesteps(scheduler, job, dev)
        generator = torch.Generator("cpu").manual_seed(job.seed)
        latents = family.initial_latents(job, generator, scheduler, dev, dtype)
        timesteps = list(scheduler.timesteps)
        previews = job.partial_images if job.preview_map is not None else 0  # no map: no partial images
        return _State(
            index=index,
            job=job,
            key=family.batch_key(job),
            scheduler=scheduler,
            kwargs=family.step_kwargs(scheduler, generator),
            timesteps=timesteps,
            latents=latents,
            inputs=family.request_inputs(job, dev, dtype),
            preview_at=preview_iterations(len(timesteps), previews),
            cache=self._request_cache(job),
        )

    def _request_cache(self, job: DenoiseJob) -> Any:
        """The job's own step cache state, when it (or the stage's default) asks for one this engine runs."""
        config = job.step_cache or self.step_cache
        # Requests with adapters run uncached (see ``_iterate``); docs/loras.md says so.
        if config is None or job.loras or config.kind != getattr(self.engine, "step_cache_kind", None):
            return None
        from serve.engines.step_cache import RequestCache

        return RequestCache(config)

    @staticmethod
    def cache_stats(state: _State) -> dict[str, int] | None:
        """Full and cached denoiser steps of a request that ran a step cache (None otherwise)."""
        if state.cache is None:
            return None
        return {"full_steps": state.cache.full_steps, "cached_steps": state.cache.cached_steps}

    def step(self, states: Sequence[_State]) -> None:
        """One iteration for every unfinished state: one denoiser call (chunked) per batch key."""
        groups: dict[Hashable, list[_State]] = {}
        for s in states:
            if not s.done:
                groups.setdefault(s.key, []).append(s)
        self.last_batch_sizes = []
        for group in groups.values():
            self._iterate(group)

    def result(self, state: _State) -> np.ndarray:
        """The state's final latents as the Decoder takes them: float32 (n, C, h, w)."""
        return self.family.final_latents(state.latents, state.job).float().cpu().numpy()

    def denoise(
        self,
        jobs: Sequence[DenoiseJob],
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
        on_step: Callable[[int, DenoiseProgress], None] | None = None,
    ) -> list[np.ndarray | None]:
        """Final latents for each job, in order, as float32 numpy arrays.

        ``progress(done, total)`` is called after each iteration (total = iterations of all groups).
        ``cancelled(i)`` is asked before each iteration: a cancelled job leaves the batch at once
        (its slot in the result is None), so a timed-out request stops costing denoiser time.
        ``on_step(i, progress)`` is called after each iteration for every job i that took part
        (with its partial image when one was due).
        """
        for job in jobs:
            self.validate(job)
        with contextlib.ExitStack() as pins:
            for job in jobs:
                pins.enter_context(self.use_loras(job))
            return self._denoise(jobs, progress, cancelled, on_step)

    def _denoise(self, jobs, progress, cancelled, on_step) -> list[np.ndarray | None]:
        self.last_batch_sizes = []
        states = [self.start(job, i) for i, job in enumerate(jobs)]
        groups: dict[Hashable, list[_State]] = {}
        for s in states:
            groups.setdefault(s.key, []).append(s)
        total = sum(max(len(s.timesteps) for s in group) for group in groups.values())
        done = 0
        for group in groups.values():
            while True:
                if cancelled is not None:
                    for s in group:
                        if not s.done and cancelled(s.index):
                            s.cancelled = True
                active = [s for s in group if not s.done]
                if not active:
                    break
                self._iterate(active)
                done += 1
                if on_step is not None:
                    for s in active:
                        on_step(s.index, s.progress())
                if progress is not None:
                    progress(done, total)
        self.last_cache_stats = [self.cache_stats(s) for s in states]
        return [None if s.cancelled else self.result(s) for s in states]

    def denoise_requests(self, jobs: Sequence[DenoiseJob]) -> list[StageResult]:
        """``denoise`` for a batch of requests, each answer with the batch's compute time."""
        t0 = time.perf_counter()
        latents = self.denoise(list(jobs))
        dt = time.perf_counter() - t0
        return [StageResult(lat, dt, batch_size=len(jobs)) for lat in latents]

    def _iterate(self, active: list[_State]) -> None:
        """One denoising iteration for every active request: denoiser calls in chunks, then steps."""
        if any(s.job.loras for s in active) and any(s.cache is not None for s in active):
            # A step cache calls the model on subsets of the rows (DeepCache's full and shallow
            # rows, TeaCache's computing rows), which per-row LoRA runs cannot follow: requests
            # with adapters (never cached, ``_request_cache``) take this step in the uncached
            # call, the cached ones in their own. Each request's step is its own, so splitting
            # the iteration changes no request's result.
            self._iterate([s for s in active if s.cache is None])
            self._iterate([s for s in active if s.cache is not None])
            return
        family, dtype = self.family, self.engine.dtype
        samples, timesteps, runs = [], [], []
        for s in active:
            t = s.timesteps[s.i]
            x = torch.cat([s.latents] * 2) if s.job.cfg else s.latents
            x = family.scale_input(s.scheduler, x, t)
            samples.append(x)
            timesteps.append(family.timestep_input(t, x.shape[0], dtype))
            runs.append((x.shape[0], s.job.loras))
        sample = torch.cat(samples)
        tvec = torch.cat(timesteps).to(self.engine.device)
        conditioning = {name: torch.cat([s.inputs[name] for s in active]) for name in active[0].inputs}
        if any(s.cache is not None for s in active):
            noise = self._cached_calls(active, samples, sample, tvec, conditioning)
        else:
            noise = self._calls(active, sample, tvec, conditioning, runs)
        offset = 0
        for s, x in zip(active, samples, strict=True):
            pred = noise[offset : offset + x.shape[0]]
            offset += x.shape[0]
            if s.job.cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + s.job.cfg_scale * (text - uncond)
            t = s.timesteps[s.i]
            s.preview = None
            if s.i + 1 in s.preview_at:
                # Only for requests that asked, at their few chosen steps: an x0 estimate and a
                # (C x 3) map per latent pixel, no VAE (serve/families/preview.py).
                rows = s.latents.shape[0]
                s.preview = family.preview(family.denoised(s.scheduler, x[:rows], pred, t), s.job)
            s.latents = s.scheduler.step(pred, t, s.latents, **s.kwargs, return_dict=False)[0]
            s.i += 1

    def _lora_rows(self, runs: list[tuple[int, tuple]], lo: int, hi: int) -> contextlib.AbstractContextManager:
        """The row -> adapters runs of the chunk ``lo:hi`` of this call. With a runtime, even a call
        without adapters holds its call lock, so an adapter loading meanwhile hooks no layer mid-call."""
        if self.lora is None:
            return contextlib.nullcontext()
        from serve.lora.runtime import slice_runs

        return self.lora.rows(slice_runs(runs, lo, hi))

    def _calls(self, active, sample, tvec, conditioning, runs) -> torch.Tensor:
        """The denoiser over the whole batch, in chunks of at most ``max_batch_samples`` rows."""
        family = self.family
        outs = []
        chunk = min(self.max_batch_samples, self.engine.max_batch_samples or self.max_batch_samples)
        for lo in range(0, sample.shape[0], chunk):
            hi = lo + chunk
            part = {name: x[lo:hi] for name, x in conditioning.items()}
            inputs = family.step_inputs(sample[lo:hi], tvec[lo:hi], part, active[0].job)
            with self._lora_rows(runs, lo, hi):
                outs.append(self.engine.run(**inputs)["noise_pred"])
            self.model_calls += 1
            self.last_batch_sizes.append(min(hi, sample.shape[0]) - lo)
        return torch.cat(outs)

    def _cached_calls(self, active, samples, sample, tvec, conditioning) -> torch.Tensor:
        """The denoiser with step caches: chunks hold whole requests (a request's cache covers all
        its rows), each request's rows a group that its cache runs full or cached this step.
        No row here uses an adapter (``_iterate`` runs those apart): the cache calls the model on
        subsets of the rows, which per-row LoRA runs could not follow."""
        from serve.engines.step_cache import CacheGroup

        limit = min(self.max_batch_samples, self.engine.max_batch_samples or self.max_batch_samples)
        chunks: list[list[int]] = [[]]
        rows = 0
        for k, x in enumerate(samples):
            if chunks[-1] and rows + x.shape[0] > limit:
                chunks.append([])
                rows = 0
            chunks[-1].append(k)
            rows += x.shape[0]
        starts = [0]
        for x in samples:
            starts.append(starts[-1] + x.shape[0])
        outs = []
        for chunk in chunks:
            lo, hi = starts[chunk[0]], starts[chunk[-1] + 1]
            part = {name: x[lo:hi] for name, x in conditioning.items()}
            inputs = self.family.step_inputs(sample[lo:hi], tvec[lo:hi], part, active[chunk[0]].job)
            groups = [
                CacheGroup(
                    slice(starts[k] - lo, starts[k + 1] - lo), active[k].cache, active[k].i, len(active[k].timesteps)
                )
                for k in chunk
            ]
            with self._lora_rows([], lo, hi):  # no adapter rows; the call lock only
                outs.append(self.engine.run_step_cache(inputs, groups)["noise_pred"])
            self.model_calls += 1
            self.last_batch_sizes.append(hi - lo)
        return torch.cat(outs)


__all__ = ["Denoiser"]
