"""The Serve proxy's middleware (deployments/proxy.py): a request the app below never answered
(its Ingress replica died) gets 503 + Retry-After in OpenAI's shape; answers pass untouched."""

from __future__ import annotations

import asyncio
import json

from deployments.proxy import ReplicaLossMiddleware, middlewares


def call(app, headers=()):
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations", "headers": list(headers)}
    asyncio.run(ReplicaLossMiddleware(app)(scope, receive, send))
    return sent


async def silent(scope, receive, send):
    # What Ray 2.60's proxy does when the replica died: it records a 500 and sends nothing.
    scope["headers"].append((b"x-request-id", b"made-by-serve"))


async def crashing(scope, receive, send):
    raise RuntimeError("the proxy's own bug")


async def answering(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_a_request_nobody_answered_gets_503_with_retry_after():
    start, body = call(silent)
    assert start["status"] == 503
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == b"1" and headers[b"x-request-id"] == b"made-by-serve"
    error = json.loads(body["body"])["error"]
    assert error["code"] == "replica_unavailable" and error["type"] == "server_error"
    assert call(crashing)[0]["status"] == 503


def test_answers_pass_untouched():
    assert [m.get("status") for m in call(answering)] == [200, None]


def test_serve_loads_it_as_a_starlette_middleware():
    (mw,) = middlewares()
    assert mw.cls is ReplicaLossMiddleware
