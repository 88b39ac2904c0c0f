"""Typed errors: the one place every error the runtime raises is documented.

Each error carries what an API layer needs to answer a client without guessing:
an HTTP status, an OpenAI-style ``type`` and ``code``, and for client mistakes the
offending ``field`` (``param`` in OpenAI's error shape) and ``value``.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type, args: tuple, state: dict) -> DarkroomError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class DarkroomError(Exception):
    """Base of every error Darkroom raises on purpose."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __reduce__(self):
        # Errors cross process boundaries (Ray pickles a replica's exception for the caller);
        # the default reduce would call cls(message) and lose field/value or fail outright.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_openai(self) -> dict[str, Any]:
        """The error in OpenAI's shape: ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": getattr(self, "field", None),
                "code": self.code,
            }
        }


class InvalidRequestError(DarkroomError, ValueError):
    """A client sent a value that breaks the request schema.

    ``field`` names the offending field (dotted for nested ones, e.g. ``size``), ``value``
    is what was sent. Example: ``InvalidRequestError("size", "100x100", "must be a multiple of 8")``
    reads ``size: must be a multiple of 8 (got '100x100')``.
    """

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"

    def __init__(self, field: str, value: Any, reason: str, *, code: str | None = None) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field}: {reason} (got {shown})", code=code)


class ModelNotFoundError(InvalidRequestError):
    """The requested model is not the one this server serves, or no such model folder exists."""

    status_code = 404
    code = "model_not_found"


class ModelLoadError(DarkroomError):
    """A model folder or repository exists but cannot be loaded (missing component, bad config)."""

    code = "model_load_error"


class StorageError(DarkroomError):
    """The result store failed. ``transient`` errors are worth retrying (503 + Retry-After)."""

    status_code = 503
    error_type = "server_error"
    code = "storage_unavailable"

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class NotFoundError(DarkroomError):
    """A stored object or job does not exist."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class AuthenticationError(DarkroomError):
    """Missing or wrong API key (``Authorization: Bearer <key>``)."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PayloadTooLargeError(DarkroomError):
    """The request body is over the configured limit."""

    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class ContentPolicyError(InvalidRequestError):
    """A prompt was refused by the prompt policy (blocklist, patterns or a checker model)."""

    code = "content_policy_violation"


class IdempotencyConflictError(InvalidRequestError):
    """An Idempotency-Key was reused with a different request body."""

    status_code = 409
    code = "idempotency_key_reused"


class JobConflictError(DarkroomError):
    """A job cannot do what was asked in its state (e.g. cancel a job that already succeeded)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "job_finished"


class OverloadedError(DarkroomError):
    """Queues are full: the client should retry after ``Retry-After`` seconds."""

    status_code = 503
    code = "overloaded"


class RateLimitError(DarkroomError):
    """A key is over its limit (requests per minute, or images in flight): 429 with ``Retry-After``.

    OpenAI's shape: ``type`` names what ran out (``requests`` or ``images``), ``code`` is
    ``rate_limit_exceeded``.
    """

    status_code = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str = "requests", retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.error_type = kind
        self.retry_after_s = retry_after_s


class ImagesWithheldError(DarkroomError):
    """Every image of a request was flagged by the image safety check: none is stored or returned.

    OpenAI's moderation refusal: 400, ``type: image_generation_user_error``, ``code: moderation_blocked``.
    """

    status_code = 400
    error_type = "image_generation_user_error"
    code = "moderation_blocked"


class RequestTimeoutError(DarkroomError):
    """A stage call or the whole request ran past its time limit; the work was cancelled."""

    status_code = 504
    code = "timeout"


class EngineError(DarkroomError):
    """An inference engine failed to load or run."""

    code = "engine_error"


__all__ = [
    "AuthenticationError",
    "ContentPolicyError",
    "DarkroomError",
    "IdempotencyConflictError",
    "ImagesWithheldError",
    "JobConflictError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RateLimitError",
    "RequestTimeoutError",
    "EngineError",
    "InvalidRequestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "NotFoundError",
    "StorageError",
]
