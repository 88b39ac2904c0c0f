"""Server-sent events of the images API: OpenAI's image-generation stream events, plus jobs' own.

``POST /v1/images/generations`` with ``stream: true`` answers ``text/event-stream`` with the two
event types of OpenAI's published spec (``ImageGenPartialImageEvent``, ``ImageGenCompletedEvent``;
pinned in tests/openai_images_schemas.json), their fields in the spec's order:

    event: image_generation.partial_image
    data: {"type": "image_generation.partial_image", "b64_json": "...", "created_at": 1767225600,
           "size": "auto", "quality": "auto", "background": "auto", "output_format": "png",
           "partial_image_index": 0, "image_index": 0, "seed": 42}

then one ``image_generation.completed`` per image (``usage`` instead of ``partial_image_index``).
Where Darkroom's values fall outside the spec's enums, the event says so in the spec's words:
``size`` is the image's size when it is one of the spec's (1024x1024, 1024x1536, 1536x1024) and
``auto`` otherwise (e.g. 512x512: the client knows the size it asked for, and the image carries
it); ``quality`` maps DALL-E 3's ``standard``/``hd`` to ``medium``/``high`` (the same step shares);
``usage`` is all zeros (Darkroom does not meter tokens). Extension fields follow the spec's:
``image_index`` (which of the n images: each image's events are tagged) and ``seed`` (what
reproduces it), and ``url`` on completed events when ``response_format`` is ``url``. The spec's
schemas allow extra fields, and the official client keeps them (``event.model_extra``).

Partial images are drawn at the latent grid's resolution (1/8 of each side for SD, SDXL and
Flux; serve/families/preview.py): a client shows them scaled up.

A failure after the stream has started is an ``error`` event carrying OpenAI's error object
(the official client raises ``APIError`` from it). Jobs' event streams add ``job.progress`` and
``job.status`` events (Darkroom's own: the spec has no progress event).

Ray-free and torch-free: the Ingress imports it.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.errors import DarkroomError, ImagesWithheldError
from serve.imageio import encode_image
from serve.stages.messages import DecodedImage

logger = logging.getLogger(__name__)

PARTIAL = "image_generation.partial_image"
COMPLETED = "image_generation.completed"
JOB_PROGRESS = "job.progress"
JOB_STATUS = "job.status"
ERROR = "error"

#: ``size`` values of the spec's stream events (besides ``auto``).
SPEC_SIZES = frozenset({"1024x1024", "1024x1536", "1536x1024"})
#: Request ``quality`` -> the stream events' enum (low, medium, high, auto).
SPEC_QUALITY = {"low": "low", "medium": "medium", "high": "high", "standard": "medium", "hd": "high", "auto": "auto"}
#: The spec requires ``usage`` on completed events; Darkroom counts no tokens.
ZERO_USAGE = {
    "total_tokens": 0,
    "input_tokens": 0,
    "output_tokens": 0,
    "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
}

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not buffer events


@dataclass(frozen=True)
class Developed:
    """The end of ``ImageService.develop``: the stored images (with their bytes) and timings (ms)."""

    images: list[DecodedImage]
    timings: dict[str, float]


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: its name and a one-line JSON payload."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def sse_comment(text: str = "") -> bytes:
    """A comment line: keeps a connection alive through proxies; clients ignore it."""
    return f": {text}\n\n".encode()


@dataclass(frozen=True)
class StreamContext:
    """What every event of one request repeats: the request's settings as the spec names them."""

    size: str
    quality: str
    background: str
    output_format: str
    seed: int
    output_compression: int | None = None
    response_format: str = "b64_json"

    @classmethod
    def of(
        cls,
        *,
        width: int,
        height: int,
        quality: str | None,
        background: str | None,
        output_format: str,
        seed: int,
        output_compression: int | None = None,
        response_format: str = "b64_json",
    ) -> StreamContext:
        size = f"{width}x{height}"
        return cls(
            size=size if size in SPEC_SIZES else "auto",
            quality=SPEC_QUALITY[quality or "auto"],
            background=background or "auto",
            output_format=output_format,
            seed=seed,
            output_compression=output_compression,
            response_format=response_format,
        )

    def _head(self, kind: str, b64: str) -> dict[str, Any]:
        return {
            "type": kind,
            "b64_json": b64,
            "created_at": int(time.time()),
            "size": self.size,
            "quality": self.quality,
            "background": self.background,
            "output_format": self.output_format,
        }

    def encode(self, pixels: np.ndarray) -> str:
        """One (h, w, 3) uint8 image in the request's format, base64."""
        return base64.b64encode(encode_image(pixels, self.output_format, self.output_compression)).decode("ascii")

    def partial(self, b64: str, partial_index: int, image_index: int) -> dict[str, Any]:
        """An ``image_generation.partial_image`` payload (``ImageGenPartialImageEvent``)."""
        event = self._head(PARTIAL, b64)
        event["partial_image_index"] = partial_index
        event["image_index"] = image_index
        event["seed"] = self.seed
        return event

    def partials(self, preview: np.ndarray, partial_index: int) -> list[dict[str, Any]]:
        """A preview of all n images, (n, h, w, 3) uint8 -> one partial event per image."""
        return [self.partial(self.encode(px), partial_index, i) for i, px in enumerate(preview)]

    def completed(self, data: bytes, image_index: int, url: str | None = None) -> dict[str, Any]:
        """An ``image_generation.completed`` payload (``ImageGenCompletedEvent``) for one final image."""
        event = self._head(COMPLETED, base64.b64encode(data).decode("ascii"))
        event["usage"] = dict(ZERO_USAGE)
        event["image_index"] = image_index
        event["seed"] = self.seed
        if url is not None:
            event["url"] = url
        return event


async def generation_events(
    items: AsyncIterator[Any],
    ctx: StreamContext,
    url_for: Callable[[str], str | None],
    count_images: Callable[[list[DecodedImage]], None],
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed generation from ``ImageService.develop``'s items: partial images,
    then one completed event per image (``url_for(key)``: its url, or None for b64_json only).
    ``count_images`` counts the final images (returned, withheld). A failure after the headers
    went out becomes an ``error`` event in OpenAI's error shape."""
    try:
        async for item in items:
            if isinstance(item, Developed):
                count_images(item.images)
                if item.images and all(im.withheld for im in item.images):
                    n = len(item.images)
                    raise ImagesWithheldError(f"all {n} image(s) were withheld: the image safety check flagged them")
                for index, image in enumerate(item.images):
                    if image.withheld:  # its index is missing from the completed events
                        continue
                    yield sse(COMPLETED, ctx.completed(image.data or b"", index, url_for(image.key)))
            elif item.preview is not None:
                for payload in ctx.partials(item.preview, item.partial_index or 0):
                    yield sse(PARTIAL, payload)
    except DarkroomError as exc:
        # Headers (200) are gone: the error is an event, in OpenAI's error shape.
        logger.warning("stream failed: %s: %s", type(exc).__name__, exc.message)
        yield sse(ERROR, error_payload(exc.message, exc.error_type, getattr(exc, "field", None), exc.code))
    except Exception:
        logger.exception("stream failed")
        yield sse(ERROR, error_payload("internal server error", "server_error", None, None))


def error_payload(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error object, as an ``error`` event's data (the official client raises on it)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def progress_payload(job_id: str, status: str, step: int, total_steps: int) -> dict[str, Any]:
    """A ``job.progress`` payload: Darkroom's own event on a job's stream."""
    return {
        "type": JOB_PROGRESS,
        "id": job_id,
        "status": status,
        "progress": {"step": step, "total_steps": total_steps},
    }


def status_payload(record: dict[str, Any]) -> dict[str, Any]:
    """A ``job.status`` payload: the job's record (without its images) when its status changes."""
    return {"type": JOB_STATUS, **{k: v for k, v in record.items() if k not in ("images", "preview")}}


__all__ = [
    "COMPLETED",
    "ERROR",
    "JOB_PROGRESS",
    "JOB_STATUS",
    "PARTIAL",
    "SPEC_QUALITY",
    "SPEC_SIZES",
    "SSE_HEADERS",
    "ZERO_USAGE",
    "Developed",
    "StreamContext",
    "error_payload",
    "generation_events",
    "progress_payload",
    "sse",
    "sse_comment",
    "status_payload",
]
