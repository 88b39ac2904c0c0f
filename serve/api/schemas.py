"""Schemas for ``POST /v1/images/generations``: OpenAI's request shape plus Darkroom's extensions.

pydantic only (no FastAPI, no torch) so the CLI, tests and the load generator import it cheaply.
A request validates itself against ``Limits`` (passed in through pydantic's validation context,
so one operator-tuned object bounds sizes, steps and prompt lengths everywhere) and converts
itself into the internal ``GenerationParams``. Every failure surfaces as exactly one
``InvalidRequestError`` naming the field and the value sent, which the ingress turns into
OpenAI's ``{"error": {...}}`` body with ``param`` set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from serve.api.request_limits import DEFAULT_LIMITS, OPENAI_MAX_N, Limits, parse_size, split_size
from serve.api.validation import invalid_request_from as _invalid_request_from
from serve.api.validation import json_type as _json_type
from serve.errors import InvalidRequestError
from serve.lora.catalog import MAX_LORAS, MAX_SCALE
from serve.lora.files import check_name
from serve.params import MAX_SEED, SCHEDULER_NAMES, GenerationParams, random_seed

# ``quality`` -> a share of the model's default step count, when the request sets no
# ``num_inference_steps`` (which wins). OpenAI's GPT-image values are low/medium/high, DALL-E 3's
# standard/hd; ``auto`` (and null) is the default itself. Worked example: SD's 50 steps give low
# 20, medium 30, high 50; Flux dev's 28 give 11, 17, 28. Capped by ``Limits.max_steps``.
QUALITY_FRACTION: dict[str, float] = {
    "low": 0.4,
    "medium": 0.6,
    "standard": 0.6,
    "high": 1.0,
    "hd": 1.0,
    "auto": 1.0,
}
DEFAULT_STEPS = 50

_LIMITS_CONTEXT_KEY = "limits"
# Fields OpenAI documents as nullable with a default: `"n": null` means "the default", so
# clients that serialise unset options as null keep working.
_NULL_MEANS_DEFAULT = (
    "n",
    "response_format",
    "output_format",
    "num_inference_steps",
    "guidance_scale",
    "true_cfg_scale",
)


def _limits_from(info: ValidationInfo) -> Limits:
    context = info.context
    if isinstance(context, Mapping) and isinstance(context.get(_LIMITS_CONTEXT_KEY), Limits):
        return context[_LIMITS_CONTEXT_KEY]
    return DEFAULT_LIMITS


def _reject_nul(value: str | None) -> None:
    # NUL bytes truncate strings in C libraries (tokenizers, PNG text chunks, S3 metadata).
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")


class LoraChoice(BaseModel):
    """One adapter of a request's ``loras``: its name in the server's adapter repository and scale."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(
        ..., description="The adapter's name: its file's name without .safetensors (see GET /v1/loras)."
    )
    scale: StrictFloat = Field(
        1.0,
        ge=-MAX_SCALE,
        le=MAX_SCALE,
        allow_inf_nan=False,
        description=f"How strongly it applies, -{MAX_SCALE:g}..{MAX_SCALE:g}, as diffusers' set_adapters weights "
        "(1 = as trained, 0 = off, negative = away from the style).",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        try:
            return check_name(value, "name")
        except InvalidRequestError as exc:
            raise ValueError(exc.reason) from None


class ImageGenerationRequest(BaseModel):
    """Body of ``POST /v1/images/generations``: OpenAI's fields, then Darkroom's extensions.

    Types are strict on purpose: ``"n": "2"`` or ``"n": true`` is a client bug we report rather
    than guess at; the one coercion allowed is an integer where a float is expected.
    Build one with ``parse_generation_request`` to get a single ``InvalidRequestError``.
    """

    model_config = ConfigDict(extra="forbid")

    # OpenAI fields (every request field of OpenAI's CreateImageRequest: accepted with the meaning
    # described, or refused with a 400 naming it).
    model: StrictStr | None = Field(None, description="Model to use; None means the one this server serves.")
    prompt: StrictStr = Field(
        ..., description="What to draw. Must not be blank; at most Limits.max_prompt_chars characters."
    )
    n: StrictInt = Field(
        1,
        ge=1,
        description="How many images to make, 1..Limits.max_n (10 by default, OpenAI's maximum). Image i of a "
        "request with seed s is image i of the same request sent again with seed s and the same n.",
    )
    size: StrictStr | None = Field(
        None,
        description="'WIDTHxHEIGHT' in pixels, each side a multiple of 8 within Limits; 'auto' or None means "
        "the model's native size.",
    )
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = Field(
        None,
        description="A step preset used when num_inference_steps is not sent (which wins), as a share of the "
        "model's default steps: low 40%, medium and standard 60%, high, hd, auto and None 100% (SD's 50: 20, "
        "30, 50). Capped by Limits.max_steps.",
    )
    response_format: Literal["url", "b64_json"] = Field(
        "url", description="'url': a link to the stored image; 'b64_json': the image inline, base64-encoded."
    )
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image encoding.")
    output_compression: StrictInt | None = Field(
        None,
        ge=0,
        le=100,
        description="jpeg and webp only: the encoder's quality, 0..100 (100 = least compression, largest "
        "file); None: 92. With png only 100 (lossless anyway) or None is accepted.",
    )
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None,
        description="auto (None) or opaque: the model draws opaque images. transparent is refused (400): "
        "no model here draws an alpha channel.",
    )
    moderation: Literal["auto", "low"] | None = Field(
        None,
        description="How strictly the prompt policy applies. auto (None): the blocklist, the patterns and "
        "the checker (a classifier hook). low: the blocklist and the patterns only, without the checker.",
    )
    style: StrictStr | None = Field(
        None, description="DALL-E 3's vivid/natural: no model here has styles, so any value but None is a 400."
    )
    stream: StrictBool | None = Field(
        None,
        description="true: answer text/event-stream with OpenAI's image_generation.partial_image and "
        "image_generation.completed events (one completed event per image, each event tagged with its "
        "image_index); false or None: one JSON response. Jobs stream through GET /v1/images/jobs/{id}/events.",
    )
    partial_images: StrictInt | None = Field(
        None,
        ge=0,
        le=3,
        description="Partial images per image while streaming (and on a job's event stream), 0..3 (None: 0), "
        "at evenly spaced steps; drawn cheaply from the latents at 1/8 of each side. Ignored without stream.",
    )
    user: StrictStr | None = Field(
        None, description="End-user id, for abuse tracking: stored in each image's metadata, not used otherwise."
    )

    # Darkroom extensions.
    negative_prompt: StrictStr | None = Field(
        None, description="What not to draw (replaces the empty unconditional prompt of guidance)."
    )
    num_inference_steps: StrictInt = Field(
        DEFAULT_STEPS,
        ge=1,
        description="Denoising steps, 1..Limits.max_steps (150 by default); default: the quality preset, else "
        "50, within Limits.max_steps.",
    )
    guidance_scale: StrictFloat = Field(
        7.5,
        ge=0,
        allow_inf_nan=False,
        description="Classifier-free guidance scale, 0..Limits.max_guidance (30 by default); <= 1 disables guidance.",
    )
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = Field(
        None, description=f"Seed in 0..{MAX_SEED} for reproducible images; None picks one (returned)."
    )
    scheduler: StrictStr | None = Field(
        None,
        description=f"One of {', '.join(SCHEDULER_NAMES)} (UNet models: all but flow matching; Flux: euler); "
        "None means the model's own scheduler.",
    )
    true_cfg_scale: StrictFloat = Field(
        1.0,
        ge=0,
        allow_inf_nan=False,
        description="Flux only: classifier-free guidance with negative_prompt, as FluxPipeline's true_cfg_scale "
        "(> 1 turns it on and needs a negative_prompt; 1 = off). Other families refuse it.",
    )

    loras: list[LoraChoice] | None = Field(
        None,
        max_length=MAX_LORAS,
        description=f"LoRA adapters (fine-tuned styles) from the server's repository, up to {MAX_LORAS}, each with "
        "a scale: the image is diffusers' after load_lora_weights + set_adapters(names, scales). Requests with "
        "different adapters share the denoiser's batch. Torch backend only (ONNX/TensorRT deployments refuse it).",
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and any(k in data and data[k] is None for k in _NULL_MEANS_DEFAULT):
            return {k: v for k, v in data.items() if not (k in _NULL_MEANS_DEFAULT and v is None)}
        return data

    @field_validator("model", "user")
    @classmethod
    def _check_text(cls, value: str | None) -> str | None:
        _reject_nul(value)
        return value

    @field_validator("style")
    @classmethod
    def _check_style(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("not supported: this model has no styles (send null or leave it out)")
        return value

    @field_validator("background")
    @classmethod
    def _check_background(cls, value: str | None) -> str | None:
        if value == "transparent":
            raise ValueError("'transparent' is not supported: the model draws opaque images (use auto or opaque)")
        return value

    @model_validator(mode="after")
    def _check_loras_unique(self) -> ImageGenerationRequest:
        seen: set[str] = set()
        for i, choice in enumerate(self.loras or ()):
            if choice.name in seen:
                raise InvalidRequestError(f"loras[{i}].name", choice.name, "is listed twice; give each adapter once")
            seen.add(choice.name)
        return self

    @model_validator(mode="after")
    def _check_compression(self) -> ImageGenerationRequest:
        if self.output_format == "png" and self.output_compression not in (None, 100):
            raise InvalidRequestError(
                "output_compression", self.output_compression, "applies to jpeg and webp only (png is lossless)"
            )
        return self

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _check_prompt(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        _reject_nul(value)
        if info.field_name == "prompt" and not value.strip():
            raise ValueError("must not be empty or only whitespace")
        limit = _limits_from(info).max_prompt_chars
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters, is {len(value)}")
        return value

    @field_validator("n")
    @classmethod
    def _check_n(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits_from(info).max_n
        if value > limit:
            why = "" if limit == OPENAI_MAX_N else f" (this server's limit; OpenAI's API allows {OPENAI_MAX_N})"
            raise ValueError(f"must be at most {limit}{why}")
        return value

    @field_validator("num_inference_steps")
    @classmethod
    def _check_steps(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits_from(info).max_steps
        if value > limit:
            raise ValueError(f"must be at most {limit}")
        return value

    @field_validator("guidance_scale", "true_cfg_scale")
    @classmethod
    def _check_guidance(cls, value: float, info: ValidationInfo) -> float:
        limit = _limits_from(info).max_guidance
        if value > limit:
            raise ValueError(f"must be at most {limit:g}")
        return value

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value == "auto":  # OpenAI's default: the model's own size
            return None
        if value is not None:
            _reject_nul(value)
            parse_size(value, _limits_from(info))
        return value

    @field_validator("scheduler")
    @classmethod
    def _check_scheduler(cls, value: str | None) -> str | None:
        if value is not None and value not in SCHEDULER_NAMES:
            raise ValueError(f"must be one of {', '.join(SCHEDULER_NAMES)} (or null for the model's own)")
        return value

    def check_limits(self, limits: Limits) -> None:
        """Re-validate against other ``limits`` (e.g. a per-model policy), raising one error."""
        # Only what the client sent: a default (50 steps) must not fail a server whose max is 30.
        parse_generation_request(self.model_dump(exclude_unset=True), limits)

    def to_params(
        self,
        *,
        default_size: tuple[int, int],
        limits: Limits | None = None,
        seed: int | None = None,
        defaults: Mapping[str, float] | None = None,
    ) -> GenerationParams:
        """Resolve every default into ``GenerationParams``.

        ``default_size`` is the model's native ``(width, height)``, used when ``size`` is None.
        With ``limits`` the request is re-checked against them, the native size included (so a
        server whose limits are below its model's native size asks clients for a ``size``).
        ``seed`` is the fallback when the request has none (e.g. a job retry keeping its seed);
        with neither, a fresh ``random_seed()``. ``defaults`` are the model family's own for
        fields the client did not send (``Family.request_defaults``: e.g. Flux's guidance 3.5 and
        28 steps, as its diffusers pipeline defaults them).
        """
        if limits is not None:
            self.check_limits(limits)
        if self.size is not None:
            # Already checked against the limits it was validated with; only split it here.
            width, height = (int(side) for side in split_size(self.size, "size"))
        else:
            width, height = default_size
            if limits is not None:
                try:
                    parse_size(f"{width}x{height}", limits)
                except InvalidRequestError as exc:
                    raise InvalidRequestError(
                        "size",
                        None,
                        f"is required: the model's native size {width}x{height} is outside this "
                        f"server's limits ({exc.reason})",
                    ) from exc
        defaults = defaults or {}
        unset = {name for name in defaults if name not in self.model_fields_set}
        guidance = float(defaults["guidance_scale"]) if "guidance_scale" in unset else float(self.guidance_scale)
        steps = self.num_inference_steps
        if "num_inference_steps" not in self.model_fields_set:
            # The family's default step count (else 50), scaled by the quality preset.
            base = int(defaults.get("num_inference_steps", DEFAULT_STEPS))
            steps = max(1, round(base * QUALITY_FRACTION[self.quality or "auto"]))
            if limits is not None:
                steps = min(steps, limits.max_steps)  # the default, within this server's limit
        if self.seed is not None:
            resolved_seed = self.seed
        elif seed is not None:
            resolved_seed = seed
        else:
            resolved_seed = random_seed()
        return GenerationParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=resolved_seed,
            n=self.n,
            scheduler=self.scheduler,
            output_format=self.output_format,
            true_cfg_scale=float(self.true_cfg_scale),
            output_compression=self.output_compression,
            user=self.user,
            loras=tuple((c.name, float(c.scale)) for c in self.loras or ()),
        )


def invalid_request_from(exc: ValidationError) -> InvalidRequestError:
    """One ``InvalidRequestError`` for a request's ``ValidationError`` (serve/api/validation.py),
    with "did you mean" among the request's fields."""
    return _invalid_request_from(exc, ImageGenerationRequest.model_fields)


def _load_json(raw: str | bytes | bytearray | memoryview) -> Any:
    if isinstance(raw, memoryview):
        raw = raw.tobytes()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidRequestError("body", raw[:100], f"is not valid JSON ({exc})") from exc


def parse_generation_request(data: Any, limits: Limits | None = None) -> ImageGenerationRequest:
    """Validate a request body (a dict, or raw JSON ``str``/``bytes``) against ``limits``.

    Raises exactly one ``InvalidRequestError``: ``field="body"`` for bodies that are not a JSON
    object, otherwise the (dotted) name of the first offending field and the value sent.
    """
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        data = _load_json(data)
    if not isinstance(data, Mapping):
        raise InvalidRequestError("body", data, f"must be a JSON object, not {_json_type(data)}")
    context = {_LIMITS_CONTEXT_KEY: limits if limits is not None else DEFAULT_LIMITS}
    try:
        return ImageGenerationRequest.model_validate(dict(data), context=context)
    except ValidationError as exc:
        raise invalid_request_from(exc) from exc


# Response models live in serve/api/responses.py; re-exported here for existing imports.
from serve.api.responses import ErrorBody, ErrorResponse, ImageData, ImagesResponse  # noqa: E402

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_STEPS",
    "OPENAI_MAX_N",
    "QUALITY_FRACTION",
    "ErrorBody",
    "ErrorResponse",
    "ImageData",
    "ImageGenerationRequest",
    "ImagesResponse",
    "Limits",
    "LoraChoice",
    "invalid_request_from",
    "parse_generation_request",
    "parse_size",
]
