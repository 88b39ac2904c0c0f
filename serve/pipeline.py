"""The in-process pipeline: the three stages composed in one process, no serving stack.

Used by ``darkroom generate`` and as the benchmark's in-process limit. It runs the named stages
of diffusers' ``__call__``: check inputs -> encode prompt -> prepare latents + denoise -> decode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve.imageio import encode_image
from serve.model import ModelInfo
from serve.params import GenerationParams
from serve.stages import Decoder, DenoiseJob, Denoiser, TextEncoder, guidance_enabled

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """One request's images (encoded), its seed, and seconds spent per stage."""

    params: GenerationParams
    images: list[bytes]
    pixels: list[np.ndarray] = field(repr=False)
    timings: dict[str, float]

    @property
    def seed(self) -> int:
        return self.params.seed


def make_jobs(encoder: TextEncoder, info: ModelInfo, batch: Sequence[GenerationParams]) -> list[DenoiseJob]:
    """Encode every prompt (and negative prompt, "" when none, for CFG requests) in one call."""
    texts: list[str] = []
    for p in batch:
        texts.append(p.prompt)
        if guidance_enabled(info, p.guidance_scale):
            texts.append(p.negative_prompt or "")
    embeds = encoder.encode(texts)
    jobs, k = [], 0
    for p in batch:
        pos = embeds[k]
        k += 1
        neg = None
        if guidance_enabled(info, p.guidance_scale):
            neg = embeds[k]
            k += 1
        jobs.append(job_for(p, pos, neg))
    return jobs


def job_for(p: GenerationParams, prompt_embeds: np.ndarray, negative_embeds: np.ndarray | None) -> DenoiseJob:
    return DenoiseJob(
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
        seed=p.seed,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        width=p.width,
        height=p.height,
        n=p.n,
        scheduler=p.scheduler,
    )


class Pipeline:
    """TextEncoder + Denoiser + Decoder in one process."""

    def __init__(self, text_encoder: TextEncoder, denoiser: Denoiser, decoder: Decoder) -> None:
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.decoder = decoder
        self.info = denoiser.info

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        backend: str = "torch",
        device: str | None = None,
        dtype: str | None = None,
    ) -> Pipeline:
        return cls(
            TextEncoder.load(source, backend=backend, device=device, dtype=dtype),
            Denoiser.load(source, backend=backend, device=device, dtype=dtype),
            Decoder.load(source, backend=backend, device=device, dtype=dtype),
        )

    def generate(
        self, params: GenerationParams, progress: Callable[[int, int], None] | None = None
    ) -> GenerationResult:
        return self.generate_batch([params], progress=progress)[0]

    def generate_batch(
        self, batch: Sequence[GenerationParams], progress: Callable[[int, int], None] | None = None
    ) -> list[GenerationResult]:
        """Several requests through each stage together (the stages batch across them).

        Timings are per batch: every request of the batch reports the same stage times.
        """
        t0 = time.perf_counter()
        jobs = make_jobs(self.text_encoder, self.info, batch)
        t1 = time.perf_counter()
        latents = self.denoiser.denoise(jobs, progress=progress)
        t2 = time.perf_counter()
        pixels = self.decoder.decode(latents)
        t3 = time.perf_counter()
        results = []
        for p, px in zip(batch, pixels, strict=True):
            images = [encode_image(img, p.output_format) for img in px]
            results.append(GenerationResult(params=p, images=images, pixels=list(px), timings={}))
        t4 = time.perf_counter()
        timings = {"encode": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2, "image_encode": t4 - t3}
        for r in results:
            r.timings = dict(timings)
        return results
