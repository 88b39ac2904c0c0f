"""Stage 2: the scheduler loop over the UNet, batched across requests.

Every request keeps its own scheduler, generator and latents; one UNet call per iteration
serves all requests of the same latent size, each at its own timestep (the UNet takes a
per-sample timestep vector). Requests with different step counts or schedulers share the
loop: a request leaves the batch when its timesteps run out. Requests of different sizes run
as separate groups.

Per request this is exactly diffusers' ``StableDiffusionPipeline.__call__`` steps 4-7:
``set_timesteps`` -> initial latents from ``Generator("cpu").manual_seed(seed)`` ->
for each t: CFG doubling, ``scale_model_input``, UNet, guidance, ``step``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from serve.engines import Engine
from serve.errors import InvalidRequestError
from serve.model import ModelInfo
from serve.schedulers import make_scheduler, step_kwargs
from serve.stages.loading import load_stage_engine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenoiseJob:
    """One request's input to the Denoiser: small numpy data only (it crosses processes).

    ``negative_embeds`` is the encoded negative prompt ("" when none was given) and is
    required exactly when classifier-free guidance is on (``guidance_scale > 1``).
    """

    prompt_embeds: np.ndarray  # (seq, hidden)
    negative_embeds: np.ndarray | None  # (seq, hidden) or None
    seed: int
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    n: int = 1
    scheduler: str | None = None

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass(eq=False)
class _State:
    """A request in flight: its own scheduler, generator and latents."""

    index: int  # position in the denoise() call
    job: DenoiseJob
    scheduler: Any
    generator: torch.Generator
    kwargs: dict[str, Any]
    timesteps: list[torch.Tensor]
    latents: torch.Tensor
    embeds: torch.Tensor  # (n or 2n, seq, hidden): [negative x n, prompt x n] with CFG
    i: int = 0
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.cancelled or self.i >= len(self.timesteps)


def guidance_enabled(info: ModelInfo, guidance_scale: float) -> bool:
    """diffusers' rule: CFG when guidance > 1 and the UNet has no guidance embedding."""
    return guidance_scale > 1.0 and info.time_cond_proj_dim is None


class Denoiser:
    """Runs batches of ``DenoiseJob``s; returns each job's final latents (n, C, h, w)."""

    def __init__(self, info: ModelInfo, engine: Engine, *, max_batch_samples: int = 32) -> None:
        self.info = info
        self.engine = engine
        self.max_batch_samples = max_batch_samples
        self.unet_calls = 0
        self.last_batch_sizes: list[int] = []  # UNet batch sizes of the last call, for tests/metrics

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        backend: str = "torch",
        device: str | None = None,
        dtype: str | None = None,
    ) -> Denoiser:
        info, engine = load_stage_engine(source, "unet", backend=backend, device=device, dtype=dtype)
        return cls(info, engine)

    def validate(self, job: DenoiseJob) -> None:
        """Reject a job before it joins a batch, so one bad job never fails its batch-mates."""
        f = self.info.vae_scale_factor
        for name, side in (("width", job.width), ("height", job.height)):
            if side <= 0 or side % f:
                raise InvalidRequestError(name, side, f"must be a positive multiple of {f} for this model")
        if job.num_inference_steps < 1:
            raise InvalidRequestError("num_inference_steps", job.num_inference_steps, "must be at least 1")
        if job.n < 1:
            raise InvalidRequestError("n", job.n, "must be at least 1")
        expected = (self.info.max_token_length, self.info.text_hidden_size)
        if tuple(job.prompt_embeds.shape) != expected:
            raise InvalidRequestError("prompt_embeds", tuple(job.prompt_embeds.shape), f"expected {expected}")
        if guidance_enabled(self.info, job.guidance_scale):
            if job.negative_embeds is None or tuple(job.negative_embeds.shape) != expected:
                raise InvalidRequestError("negative_embeds", None, "required with guidance_scale > 1")
        make_scheduler(job.scheduler, self.info.scheduler_config, self.info.scheduler_class)

    def _start(self, index: int, job: DenoiseJob) -> _State:
        dev, dtype = self.engine.device, self.engine.dtype
        scheduler = make_scheduler(job.scheduler, self.info.scheduler_config, self.info.scheduler_class)
        scheduler.set_timesteps(job.num_inference_steps, device=dev)
        generator = torch.Generator("cpu").manual_seed(job.seed)
        shape = self.info.latent_shape(job.n, job.width, job.height)
        latents = randn_tensor(shape, generator=generator, device=dev, dtype=dtype) * scheduler.init_noise_sigma
        prompt = torch.tensor(np.asarray(job.prompt_embeds), device=dev, dtype=dtype)  # copy: may be read-only
        embeds = prompt[None].expand(job.n, -1, -1)
        if guidance_enabled(self.info, job.guidance_scale):
            neg = torch.tensor(np.asarray(job.negative_embeds), device=dev, dtype=dtype)
            embeds = torch.cat([neg[None].expand(job.n, -1, -1), embeds])
        return _State(
            index=index,
            job=job,
            scheduler=scheduler,
            generator=generator,
            kwargs=step_kwargs(scheduler, generator),
            timesteps=list(scheduler.timesteps),
            latents=latents,
            embeds=embeds,
        )

    def denoise(
        self,
        jobs: Sequence[DenoiseJob],
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[np.ndarray | None]:
        """Final latents for each job, in order, as float32 numpy arrays.

        ``progress(done, total)`` is called after each iteration (total = iterations of all groups).
        ``cancelled(i)`` is asked before each iteration: a cancelled job leaves the batch at once
        (its slot in the result is None), so a timed-out request stops costing UNet time.
        """
        for job in jobs:
            self.validate(job)
        self.last_batch_sizes = []
        states = [self._start(i, job) for i, job in enumerate(jobs)]
        groups: dict[tuple[int, int], list[_State]] = {}
        for s in states:
            groups.setdefault((s.job.width, s.job.height), []).append(s)
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
                if progress is not None:
                    progress(done, total)
        return [None if s.cancelled else self.result(s) for s in states]

    # -- the step-level API used by continuous batching (serve/stages/continuous.py) -------------
    def start(self, job: DenoiseJob, index: int = 0) -> _State:
        """A validated job's state in flight: its scheduler, generator and initial latents."""
        return self._start(index, job)

    def step(self, states: Sequence[_State]) -> None:
        """One iteration for every unfinished state: one UNet call (chunked) per latent size."""
        groups: dict[tuple[int, int], list[_State]] = {}
        for s in states:
            if not s.done:
                groups.setdefault((s.job.width, s.job.height), []).append(s)
        self.last_batch_sizes = []
        for group in groups.values():
            self._iterate(group)

    @staticmethod
    def result(state: _State) -> np.ndarray:
        return state.latents.float().cpu().numpy()

    def _iterate(self, active: list[_State]) -> None:
        """One denoising iteration for every active request: UNet calls in chunks, then steps."""
        inputs, timesteps = [], []
        for s in active:
            t = s.timesteps[s.i]
            x = torch.cat([s.latents] * 2) if guidance_enabled(self.info, s.job.guidance_scale) else s.latents
            x = s.scheduler.scale_model_input(x, t)
            inputs.append(x)
            # The UNet turns timesteps into float32 embeddings (get_timestep_embedding's .float()).
            timesteps.append(t.to(torch.float32).reshape(1).expand(x.shape[0]))
        sample = torch.cat(inputs)
        tvec = torch.cat(timesteps).to(self.engine.device)
        embeds = torch.cat([s.embeds for s in active])
        outs = []
        chunk = min(self.max_batch_samples, self.engine.max_batch_samples or self.max_batch_samples)
        for lo in range(0, sample.shape[0], chunk):
            hi = lo + chunk
            outs.append(
                self.engine.run(sample=sample[lo:hi], timestep=tvec[lo:hi], encoder_hidden_states=embeds[lo:hi])
            )
            self.unet_calls += 1
            self.last_batch_sizes.append(min(hi, sample.shape[0]) - lo)
        noise = torch.cat(outs)
        offset = 0
        for s, x in zip(active, inputs, strict=True):
            pred = noise[offset : offset + x.shape[0]]
            offset += x.shape[0]
            if guidance_enabled(self.info, s.job.guidance_scale):
                uncond, text = pred.chunk(2)
                pred = uncond + s.job.guidance_scale * (text - uncond)
            t = s.timesteps[s.i]
            s.latents = s.scheduler.step(pred, t, s.latents, **s.kwargs, return_dict=False)[0]
            s.i += 1
