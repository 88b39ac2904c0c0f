"""Operator-set bounds on what one request may ask for, and the ``"WxH"`` size parser that checks them.

pydantic only: the HTTP schemas (serve/api/schemas.py), the deployment config and the CLI import it.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.errors import InvalidRequestError

#: The most images OpenAI's API lets one request ask for.
OPENAI_MAX_N = 10


class Limits(BaseModel):
    """Operator-set bounds on what one request may ask for (cost control, not model capability).

    Defaults allow up to 2048x2048 (4 MP): a 2048x2048 SD image is a 256x256 latent, about 16x
    the attention cost of 512x512, which is already minutes of a GPU at 150 steps.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_side: int = Field(2048, ge=8, description="Largest width or height in pixels a request may ask for.")
    max_pixels: int = Field(
        2048 * 2048,
        ge=64,
        description="Largest width*height in pixels (4 MP by default) a request may ask for.",
    )
    min_side: int = Field(8, ge=8, description="Smallest width or height in pixels a request may ask for.")
    max_prompt_chars: int = Field(
        2000,
        ge=1,
        description="Longest prompt or negative prompt, in characters (CLIP truncates at 77 tokens).",
    )
    max_n: int = Field(
        OPENAI_MAX_N,
        ge=1,
        description="Most images one request may ask for (`n`); OpenAI's API allows 10, a lower value is "
        "this server's own limit (and its 400 says so).",
    )
    max_steps: int = Field(150, ge=1, description="Most denoising steps (`num_inference_steps`) a request may ask for.")
    max_guidance: float = Field(
        30.0,
        ge=0,
        allow_inf_nan=False,
        description="Largest classifier-free guidance scale a request may ask for.",
    )

    @model_validator(mode="after")
    def _check_consistent(self) -> Limits:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must not exceed max_side ({self.max_side})")
        return self


DEFAULT_LIMITS = Limits()

# [0-9] and fullmatch, not \d and $: \d also matches e.g. Arabic-Indic digits, and $ matches
# before a trailing newline, so r"^\d+x\d+$" would accept "64x64\n".
_SIZE_RE = re.compile(r"([0-9]+)x([0-9]+)")


def split_size(value: str, field: str) -> tuple[str, str]:
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise InvalidRequestError(field, value, "must be 'WIDTHxHEIGHT' in pixels, e.g. '512x512'")
    return match[1], match[2]


def parse_size(value: str, limits: Limits, field: str = "size") -> tuple[int, int]:
    """Parse ``"WxH"`` into ``(width, height)`` and check it against ``limits``.

    Each side must be a multiple of 8 because the VAE works on a latent 8x smaller: a 100-pixel
    side has no whole latent size. Public because the CLI parses ``--size`` the same way.
    """
    if not isinstance(value, str):
        raise InvalidRequestError(field, value, "must be a string 'WIDTHxHEIGHT', e.g. '512x512'")
    sides = []
    for name, digits in zip(("width", "height"), split_size(value, field), strict=True):
        # Count digits before int(): a 5000-digit side would trip Python's int-parsing limit.
        side = int(digits) if len(digits) <= 18 else None
        if side is not None and side < limits.min_side:
            raise InvalidRequestError(field, value, f"{name} must be at least {limits.min_side}")
        if side is None or side > limits.max_side:
            raise InvalidRequestError(field, value, f"{name} must be at most {limits.max_side}")
        if side % 8:
            raise InvalidRequestError(field, value, f"{name} must be a multiple of 8")
        sides.append(side)
    width, height = sides
    if width * height > limits.max_pixels:
        raise InvalidRequestError(
            field, value, f"width*height must be at most {limits.max_pixels} pixels, is {width * height}"
        )
    return width, height


__all__ = ["DEFAULT_LIMITS", "OPENAI_MAX_N", "Limits", "parse_size", "split_size"]
