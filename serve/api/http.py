"""FastAPI routes of the OpenAI-compatible images API (plus jobs, files, models, health).

The body of ``POST /v1/images/*`` is parsed by ``parse_generation_request`` rather than by
FastAPI, so every client mistake becomes one 4xx in OpenAI's error shape naming the field
(FastAPI's own 422 lists pydantic internals). The request schema is still published in the
OpenAPI document for clients and fuzzers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serve.api.middleware import ObserveMiddleware
from serve.api.policy import bearer_key
from serve.api.responses import ImagesResponse
from serve.api.schemas import ImageGenerationRequest
from serve.api.service import ImageService
from serve.api.streaming import SSE_HEADERS
from serve.errors import (
    AuthenticationError,
    ContentPolicyError,
    DarkroomError,
    ImagesWithheldError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitError,
    RequestTimeoutError,
    StorageError,
)
from serve.storage import guess_content_type

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: The playground's files (package data): index.html at ``/``, the rest under ``PLAYGROUND_PREFIX``.
STATIC = Path(__file__).with_name("static")
PLAYGROUND_PREFIX = "/playground"

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ImageGenerationRequest.model_json_schema()}},
    }
}


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None,
    code: str | None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    headers = {**({"Retry-After": "5"} if status == 503 else {}), **(headers or {})}
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def server_timing(timings: dict[str, float]) -> str:
    """``Server-Timing: encode;dur=12.1, denoise;dur=950.3, ...`` (durations in ms)."""
    counts = ("lora_hits", "lora_misses")  # counts, not durations
    return ", ".join(f"{k};dur={v:.3f}" for k, v in timings.items() if not k.endswith("_batch") and k not in counts)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes (by header, and while streaming: a client
    may lie about or omit Content-Length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` that stops its body as soon as the client disconnects, whatever the
    server's ASGI version (Starlette listens only below ASGI 2.4): the body's generator is
    cancelled, and with it the stage calls it awaits (the Denoiser drops the job before its next step)."""

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def body() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(body)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (uvicorn does not cancel a
    handler whose client left; Ray Serve's proxy does, and then this is a second, harmless way).
    The cancelled work cancels its stage calls: the Denoiser drops the request before its next step."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            raise ClientDisconnect()
        return task.result()
    finally:
        watcher.cancel()
        task.cancel()


@functools.cache
def playground_html() -> str:
    return (STATIC / "index.html").read_text(encoding="utf-8")


def _darkroom_error_response(exc: DarkroomError) -> JSONResponse:
    # A misconfigured store (no bucket, access denied) is our fault and will not pass by
    # itself: 500, not 503 + Retry-After.
    permanent = isinstance(exc, StorageError) and not exc.transient
    status = 500 if permanent else exc.status_code
    retry = getattr(exc, "retry_after_s", None)
    headers = {"Retry-After": str(retry)} if retry is not None else None
    return error_response(status, exc.message, exc.error_type, getattr(exc, "field", None), exc.code, headers)


def rejection_reason(exc: DarkroomError) -> str | None:
    """``darkroom_rejected_total``'s reason for an error answered to a client (None: not a refusal)."""
    if isinstance(exc, RateLimitError):
        return "inflight_limited" if exc.error_type == "images" else "rate_limited"
    for cls, reason in (
        (AuthenticationError, "unauthenticated"),
        (PayloadTooLargeError, "body_too_large"),
        (ContentPolicyError, "content_policy"),
        (ImagesWithheldError, "moderation_blocked"),
        (InvalidRequestError, "invalid"),
        (OverloadedError, "overloaded"),
        (RequestTimeoutError, "timeout"),
    ):
        if isinstance(exc, cls):
            return reason
    return None


def _caller(service: ImageService, request: Request) -> str | None:
    """Whose limits apply: the API key (checked by the middleware); without configured keys,
    everyone's (one shared identity: a made-up bearer token must not buy a fresh bucket)."""
    return bearer_key(request.headers.get("authorization")) if service.config.api_keys else None


def _unauthorized(_service: ImageService) -> JSONResponse:
    err = AuthenticationError("missing or invalid API key: send 'Authorization: Bearer <key>'")
    response = _darkroom_error_response(err)
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def install_routes(
    app: FastAPI, get_service: Callable[[], ImageService], *, behind_serve_proxy: bool = False
) -> FastAPI:
    """Add every route and error handler to ``app``; ``get_service`` is read per request.

    Every response carries ``X-Request-Id`` (the client's when usable, else a new one) and every
    log line of the request names it. ``behind_serve_proxy``: Ray Serve's proxy already does the
    header (it echoes the client's id or makes one, and hands it to the app): take its id as
    is, and do not add the header a second time.
    """

    # One plain-ASGI middleware (serve/api/middleware.py): keys, request ids, metrics, access log.
    app.add_middleware(
        ObserveMiddleware,
        get_service=get_service,
        unauthorized=_unauthorized,
        behind_serve_proxy=behind_serve_proxy,
    )

    @app.exception_handler(DarkroomError)
    async def _darkroom_error(_: Request, exc: DarkroomError) -> JSONResponse:
        if exc.status_code >= 500:
            logger.warning("%s: %s", type(exc).__name__, exc.message)
        reason = rejection_reason(exc)
        if reason is not None:
            get_service().metrics.inc("darkroom_rejected_total", reason=reason)
        return _darkroom_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = str(exc.detail)
        allow = (exc.headers or {}).get("Allow")
        if exc.status_code == 405 and allow:
            message = f"method {request.method} is not allowed on {request.url.path}; allowed: {allow}"
        # Starlette's headers carry e.g. a 405's Allow (RFC 9110: a 405 must list the methods).
        return error_response(exc.status_code, message, type_, None, None, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, f"{loc}: {first.get('msg', 'invalid')}", "invalid_request_error", loc, None)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(_: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, "internal server error", "server_error", None, None)

    @app.post(
        "/v1/images/generations",
        openapi_extra=_BODY_DOC,
        responses={200: {"model": ImagesResponse, "description": "The images, each with its seed and index."}},
    )
    async def generations(request: Request) -> Response:
        service = get_service()
        raw = await read_body(request, service.config.max_body_bytes)
        key = request.headers.get("idempotency-key")
        api_key = _caller(service, request)
        events = await service.generate_stream(raw, str(request.base_url), idempotency_key=key, api_key=api_key)
        if events is not None:
            return EventStreamResponse(events)
        work = service.generate(raw, str(request.base_url), idempotency_key=key, api_key=api_key)
        body, timings = await until_disconnected(request, work)
        return JSONResponse(body, headers={"Server-Timing": server_timing(timings)})

    @app.post("/v1/images/jobs", status_code=202, openapi_extra=_BODY_DOC)
    async def submit_job(request: Request) -> JSONResponse:
        service = get_service()
        raw = await read_body(request, service.config.max_body_bytes)
        record = await service.submit_job(raw, api_key=_caller(service, request))
        location = f"/v1/images/jobs/{record['id']}"
        return JSONResponse(record, status_code=202, headers={"Location": location})

    @app.get("/v1/images/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await get_service().get_job(job_id, str(request.base_url)))

    @app.delete("/v1/images/jobs/{job_id}")
    async def cancel_job(job_id: str) -> JSONResponse:
        status, record = await get_service().cancel_job(job_id)
        return JSONResponse(record, status_code=status)

    @app.get("/v1/images/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> Response:
        return EventStreamResponse(await get_service().job_events(job_id, str(request.base_url)))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(get_service().models())

    @app.get("/v1/loras")
    async def loras() -> JSONResponse:
        """The adapter repository: each adapter's name, family, components, size and fit."""
        return JSONResponse(await asyncio.to_thread(get_service().lora_listing))

    @app.get("/v1/files/{key:path}")
    async def files(key: str) -> Response:
        data = await get_service().file(key)
        return Response(data, media_type=guess_content_type(key))

    # HEAD as well as GET (FastAPI's get() registers GET only): clients check a file with HEAD.
    # The server sends the headers (Content-Length included) without the body.
    app.add_api_route("/v1/files/{key:path}", files, methods=["HEAD"], include_in_schema=False)

    @app.get("/", include_in_schema=False)
    async def playground(request: Request) -> Response:
        # The page names its files and the API from the app's mount point (Serve's route prefix),
        # so it works at / and under a prefix such as /split alike.
        root = re.sub(r"[^A-Za-z0-9/_.-]", "", request.scope.get("root_path", "")).rstrip("/")
        return HTMLResponse(playground_html().replace("{{ROOT}}", root))

    app.mount(PLAYGROUND_PREFIX, StaticFiles(directory=STATIC), name="playground")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready, status = await get_service().readiness()
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": status}, 200 if ready else 503)

    return app


def create_app(service: ImageService, *, behind_serve_proxy: bool = False) -> FastAPI:
    """The app over one service: standalone (e.g. ``uvicorn`` over ``LocalStages``), or a Serve
    replica's (``behind_serve_proxy``: the proxy owns ``X-Request-Id``)."""
    app = FastAPI(title="Darkroom", version="0.1.0")
    return install_routes(app, lambda: service, behind_serve_proxy=behind_serve_proxy)
