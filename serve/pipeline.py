"""The in-process pipeline: the three stages composed in one process, no serving stack.

Used by ``darkroom generate`` and as the benchmark's in-process limit. It runs the named stages
of diffusers' ``__call__``: check inputs (the family's ``plan``) -> encode prompt -> prepare
latents + denoise -> decode, for any family.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serve.families import Family, Plan
from serve.imageio import encode_image
from serve.model import ModelInfo, read_model_info
from serve.params import GenerationParams
from serve.stages import Decoder, DenoiseJob, Denoiser, TextEncoder

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


def make_jobs(encoder: TextEncoder, plans: Sequence[Plan]) -> list[DenoiseJob]:
    """Encode every plan's texts (with its text-encoder adapters) in one TextEncoder call, then
    build each Denoiser job."""
    results = encoder.encode_requests([(plan.texts, plan.params.loras) for plan in plans])
    return [plan.denoise_job(r.value) for plan, r in zip(plans, results, strict=True)]


class Pipeline:
    """TextEncoder + Denoiser + Decoder in one process."""

    def __init__(self, text_encoder: TextEncoder, denoiser: Denoiser, decoder: Decoder) -> None:
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.decoder = decoder
        self.info: ModelInfo = denoiser.info
        self.family: Family = denoiser.family

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        backend: str = "torch",
        device: str | None = None,
        dtype: str | None = None,
        family: str | None = None,
        torch_options: Any = None,
        step_cache: Any = None,
        loras: Any = None,
        lora_cache_bytes: int | None = None,
    ) -> Pipeline:
        """``torch_options``: the torch backend's (``serve.engines.torch_options.TorchOptions``);
        ``step_cache``: the Denoiser's default ``StepCache`` (None: off, the seed contract);
        ``loras``: an adapter repository (folder, ``s3://bucket/prefix`` or a ``LoraRepository``)
        for requests' ``loras``."""
        info = read_model_info(source, family)
        kw = {"backend": backend, "device": device, "dtype": dtype, "torch_options": torch_options}
        if loras is not None:
            from serve.lora import LoraRepository

            repo = loras if isinstance(loras, LoraRepository) else LoraRepository(str(loras))  # one for both
            lkw = {"loras": repo, "lora_cache_bytes": lora_cache_bytes}
        else:
            lkw = {}
        return cls(
            TextEncoder.load(info, **kw, **lkw),
            Denoiser.load(info, **kw, **lkw, step_cache=step_cache),
            Decoder.load(info, **kw),
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
        plans = [self.family.plan(p) for p in batch]
        t0 = time.perf_counter()
        jobs = make_jobs(self.text_encoder, plans)
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
