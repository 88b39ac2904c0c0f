"""Response bodies of the images API (pydantic only): OpenAI's shapes plus Darkroom's fields.

They describe what ``ImageService`` returns, for the OpenAPI document and for tests. A field
Darkroom does not fill is absent, never ``null`` (OpenAI's ``revised_prompt`` is a string when
present, and Darkroom never rewrites prompts).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from serve.errors import DarkroomError

#: The reproduction rule, stated once for the schema descriptions (and the README).
SEED_RULE = (
    "Image i of a request with seed s and n images is image i of the same request sent again with "
    "seed s and the same n (the seed draws the starting noise of all n images at once, as diffusers does)."
)


class ImageData(BaseModel):
    """One generated image: a URL or inline base64, and what reproduces it (seed, index)."""

    model_config = ConfigDict(extra="forbid")

    b64_json: str | None = Field(
        None, description="The encoded image, base64, when response_format='b64_json' (absent otherwise)."
    )
    url: str | None = Field(
        None, description="Where the stored image can be fetched, when response_format='url' (absent otherwise)."
    )
    seed: int = Field(..., description=f"The request's resolved seed s. {SEED_RULE}")
    index: int = Field(..., ge=0, description=f"This image's position i in the batch of n, from 0. {SEED_RULE}")


class ImagesResponse(BaseModel):
    """Body of a successful ``POST /v1/images/generations``."""

    model_config = ConfigDict(extra="forbid")

    created: int = Field(..., description="Unix time (seconds) the request was accepted.")
    data: list[ImageData] = Field(..., description="The images, in generation order (index 0..n-1).")
    timings: dict[str, float] = Field(
        default_factory=dict,
        description="Milliseconds per stage, e.g. {'encode': 10.2, 'denoise': 1900.5, 'decode': 200.1}.",
    )


class ErrorBody(BaseModel):
    """The inner object of OpenAI's error shape."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(..., description='Human-readable explanation, e.g. "n: must be at most 10 (got 11)".')
    type: str = Field(..., description="Error class, e.g. 'invalid_request_error' or 'server_error'.")
    param: str | None = Field(None, description="The offending request field, when one is to blame.")
    code: str | None = Field(None, description="Machine-readable code, e.g. 'invalid_value'.")


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorBody = Field(..., description="What went wrong.")

    @classmethod
    def from_exception(cls, exc: DarkroomError) -> ErrorResponse:
        """The response body for a typed Darkroom error."""
        return cls.model_validate(exc.to_openai())


__all__ = ["SEED_RULE", "ErrorBody", "ErrorResponse", "ImageData", "ImagesResponse"]
