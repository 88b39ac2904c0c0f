"""The API's one middleware, in plain ASGI: API keys, ``X-Request-Id``, in-flight gauge, request
metrics and the access log line.

Plain ASGI rather than Starlette's ``@app.middleware("http")`` (``BaseHTTPMiddleware``): that
runs the app in a second task and relays every body chunk through a memory stream, a cost paid
per request and, for server-sent events, per event (measured on the 2-core dev machine: the
split app's Ingress spent 6.4 ms more CPU per streamed request than per plain one). Here the app
runs in the request's own task, so the request id bound for logging reaches every stage call.

Latency and the access line are taken when the response's last body chunk has gone out: for a
stream, its whole life (to the completed event), not the time to its headers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers

from serve.api.policy import OPEN_PATHS, OPEN_PREFIXES, api_key_ok
from serve.request_context import HEADER, bound, new_request_id, request_id_from

logger = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/images/generations", "/v1/images/jobs")
_HEADER_LOWER = HEADER.lower().encode("latin-1")


def route_path(scope: dict[str, Any]) -> str:
    """The route path without the app's prefix (Serve mounts apps under a root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ObserveMiddleware:
    """Refuses requests without a valid API key (``unauthorized(service)`` builds the 401), then
    runs the app with the request's id bound, counting it in flight and in the metrics.

    ``behind_serve_proxy``: Ray Serve's proxy already echoes the client's ``X-Request-Id`` (or
    makes one) and sets the header on the response: take its id as is, add no header.
    """

    def __init__(
        self,
        app: Any,
        *,
        get_service: Callable[[], Any],
        unauthorized: Callable[[Any], Any],
        behind_serve_proxy: bool = False,
    ) -> None:
        self.app = app
        self.get_service = get_service
        self.unauthorized = unauthorized
        self.behind_serve_proxy = behind_serve_proxy
        self.inflight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        service = self.get_service()
        service.start_background()  # the job sweeper, on the serving event loop
        headers = Headers(scope=scope)
        sent = headers.get(HEADER)
        request_id = (sent or new_request_id()) if self.behind_serve_proxy else request_id_from(sent)
        path = route_path(scope)
        generation = scope["method"] == "POST" and path in GENERATION_PATHS
        status = 500  # what the client gets if the app raises before answering
        t0 = time.perf_counter()
        ended: float | None = None

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = message["status"]
                if not self.behind_serve_proxy:
                    raw = [*message.get("headers", ()), (_HEADER_LOWER, request_id.encode("latin-1"))]
                    message = {**message, "headers": raw}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = time.perf_counter()
            await send(message)

        self.inflight += 1
        service.metrics.set("darkroom_queue_length", self.inflight)
        try:
            with bound(request_id):
                keys = service.config.api_keys
                if keys and not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):
                    if not api_key_ok(headers.get("authorization"), keys):
                        service.metrics.inc("darkroom_rejected_total", reason="unauthenticated")
                        await self.unauthorized(service)(scope, receive, observed_send)
                        return
                await self.app(scope, receive, observed_send)
        finally:
            self.inflight -= 1
            service.metrics.set("darkroom_queue_length", self.inflight)
            elapsed = (ended if ended is not None else time.perf_counter()) - t0
            service.metrics.inc("darkroom_requests_total", status=str(status))
            if generation:
                outcome = "ok" if status < 400 else "error"
                service.metrics.observe("darkroom_request_latency_seconds", elapsed, outcome=outcome)
            # One access line per request (probes at DEBUG: an orchestrator sends them every few seconds).
            level = logging.DEBUG if path in OPEN_PATHS else logging.INFO
            with bound(request_id):
                logger.log(level, "%s %s -> %d in %.0f ms", scope["method"], scope["path"], status, elapsed * 1e3)


__all__ = ["GENERATION_PATHS", "ObserveMiddleware", "route_path"]
