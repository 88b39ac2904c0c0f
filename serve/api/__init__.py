"""HTTP API schemas: pydantic only, importable without FastAPI, Ray or torch."""

from serve.api.schemas import (
    DEFAULT_LIMITS,
    ErrorBody,
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    Limits,
    invalid_request_from,
    parse_generation_request,
    parse_size,
)

__all__ = [
    "DEFAULT_LIMITS",
    "ErrorBody",
    "ErrorResponse",
    "ImageData",
    "ImageGenerationRequest",
    "ImagesResponse",
    "Limits",
    "invalid_request_from",
    "parse_generation_request",
    "parse_size",
]
