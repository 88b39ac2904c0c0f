"""Middleware for Ray Serve's HTTP proxy: a request whose Ingress replica died mid-call gets a
503 with ``Retry-After`` in OpenAI's error shape, never an empty 500.

Ray 2.60's proxy maps a replica that died under a request (``RayActorError``) to status 500 and
then sends nothing (``send_http_response_on_exception`` only writes 408, 429 and 503 bodies), so
uvicorn answers a bare "500 Internal Server Error". Whether the request's work ran is unknown
("may or may not have been executed"): that is a transient failure to retry, which a client only
learns from a 503. Anything our app answered itself passes through untouched: this middleware
only speaks when the app below it sent no response at all.

Serve loads it in the proxy from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` =
``deployments.proxy:middlewares``, which ``deployments/local_cluster.py`` sets for the clusters
``darkroom serve`` starts (set it in the Ray cluster's environment elsewhere, e.g. KubeRay).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.middleware import Middleware

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class ReplicaLossMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started:
                raise
            logger.warning("the proxy failed before answering", exc_info=True)
        if started:
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")
        logger.warning("request %s: its Ingress replica went away before answering; sent 503", request_id or "-")
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                    *([(b"x-request-id", request_id.encode("latin-1"))] if request_id else []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(_ERROR).encode()})


_ERROR = {
    "error": {
        "message": "the replica serving this request stopped before answering; retry after Retry-After seconds "
        "(with the same Idempotency-Key to be sure it runs once)",
        "type": "server_error",
        "param": None,
        "code": "replica_unavailable",
    }
}


def middlewares() -> list[Middleware]:
    """What Serve's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` calls in the proxy."""
    return [Middleware(ReplicaLossMiddleware)]


__all__ = ["ReplicaLossMiddleware", "middlewares"]
