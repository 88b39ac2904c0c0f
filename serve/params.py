"""The internal, fully resolved generation request that every stage works from.

The HTTP schema (``serve/api/schemas.py``) and the CLI both turn what a user typed into one
``GenerationParams``; below that point nothing is optional or defaulted any more, so stages
never guess a size, a seed or a scheduler. Pure Python on purpose: stages, engines and the
load generator import it without pulling in pydantic or torch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from serve.errors import InvalidRequestError
from serve.schedulers import SCHEDULER_NAMES

#: Encodings the decoder stage can write.
OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")

#: Seeds are fed to ``torch.Generator.manual_seed``; keeping them in uint32 range means every
#: client (JavaScript numbers included) can round-trip the seed we return.
MAX_SEED = 2**32 - 1


def random_seed() -> int:
    """A fresh seed in ``0..2**32-1`` for requests that sent none (returned to the client).

    ``secrets`` rather than ``random`` so that seeds do not repeat across forked workers that
    inherited the same ``random`` state.
    """
    return secrets.randbelow(MAX_SEED + 1)


def _is_int(value: object) -> bool:
    # bool is an int subclass; a True width is a bug, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationParams:
    """One request, every choice made: what the stages receive.

    Built by ``ImageGenerationRequest.to_params`` or by the CLI. The checks in
    ``__post_init__`` are a last line of defence against a caller that built one by hand with
    nonsense; user-facing limits (max size, max steps) are enforced earlier, in the schema.
    """

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    n: int
    scheduler: str | None
    output_format: str
    #: Flux only: classifier-free guidance with the negative prompt, as FluxPipeline's
    #: ``true_cfg_scale`` (1 = off, its default; the family refuses it elsewhere).
    true_cfg_scale: float = 1.0
    #: jpeg/webp encoder quality 0..100; None = the encoder's default (92).
    output_compression: int | None = None
    #: The client's end-user id (OpenAI's ``user``), stored with the images; not used otherwise.
    user: str | None = None
    #: LoRA adapters and their scales, ``((name, scale), ...)``, as ``set_adapters(names, scales)``.
    loras: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise InvalidRequestError("prompt", self.prompt, "must be a string")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise InvalidRequestError("negative_prompt", self.negative_prompt, "must be a string or None")
        for name in ("width", "height"):
            value = getattr(self, name)
            # The VAE downsamples by 8: a side that is not a multiple of 8 has no latent size.
            if not _is_int(value) or value <= 0 or value % 8:
                raise InvalidRequestError(name, value, "must be a positive multiple of 8")
        for name in ("num_inference_steps", "n"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise InvalidRequestError(name, value, "must be an integer >= 1")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            raise InvalidRequestError("guidance_scale", self.guidance_scale, "must be a number")
        if not 0 <= self.guidance_scale < float("inf"):
            raise InvalidRequestError("guidance_scale", self.guidance_scale, "must be a finite number >= 0")
        if isinstance(self.true_cfg_scale, bool) or not isinstance(self.true_cfg_scale, (int, float)):
            raise InvalidRequestError("true_cfg_scale", self.true_cfg_scale, "must be a number")
        if not 0 <= self.true_cfg_scale < float("inf"):
            raise InvalidRequestError("true_cfg_scale", self.true_cfg_scale, "must be a finite number >= 0")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequestError("seed", self.seed, f"must be an integer in 0..{MAX_SEED}")
        if self.scheduler is not None and self.scheduler not in SCHEDULER_NAMES:
            raise InvalidRequestError("scheduler", self.scheduler, f"must be one of {', '.join(SCHEDULER_NAMES)}")
        if self.output_compression is not None and (
            not _is_int(self.output_compression) or not 0 <= self.output_compression <= 100
        ):
            raise InvalidRequestError("output_compression", self.output_compression, "must be an integer in 0..100")
        if self.loras:
            from serve.lora.catalog import MAX_LORAS, MAX_SCALE
            from serve.lora.files import check_choices

            object.__setattr__(self, "loras", check_choices(self.loras, max_loras=MAX_LORAS, max_scale=MAX_SCALE))
        if self.output_format not in OUTPUT_FORMATS:
            raise InvalidRequestError(
                "output_format", self.output_format, f"must be one of {', '.join(OUTPUT_FORMATS)}"
            )


__all__ = ["MAX_SEED", "OUTPUT_FORMATS", "SCHEDULER_NAMES", "GenerationParams", "random_seed"]
