"""Request ids: one per HTTP request, on its response (``X-Request-Id``) and on every log line of it.

The id is the client's ``X-Request-Id`` when it sends a usable one (so a client, a load balancer
and our logs name a request the same way), else a fresh one. It lives in a context variable
while a request is handled: ``asyncio`` tasks and ``asyncio.to_thread`` copy it, so lines logged
anywhere below the route carry it. Stage calls carry it explicitly (``DenoiseJob.request_id``,
``DecodeRequest.request_id``, ``encode(texts, request_id)``): a stage replica sets it around its
own work with :func:`bound`, and a batch of several requests logs all their ids.

``RequestIdFilter`` puts ``request_id`` (``-`` outside a request), ``stage`` and ``replica`` on every
record of the handler it is attached to; :data:`LOG_FORMAT` shows them.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import uuid
from collections.abc import Iterable, Iterator

HEADER = "X-Request-Id"
# What a client may choose: enough for UUIDs, trace ids and "svc-1234:retry-2", nothing that could
# forge a log line or a header (no spaces, quotes or control characters), at most 128 characters.
_VALID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
LOG_FORMAT = (
    "%(asctime)s %(levelname)s %(name)s [stage=%(stage)s replica=%(replica)s request_id=%(request_id)s] %(message)s"
)

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("darkroom_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(header: str | None) -> str:
    """The client's id when it is usable, else a new one (an unusable id is replaced, not refused)."""
    if header is not None and _VALID.fullmatch(header):
        return header
    return new_request_id()


def current() -> str | None:
    """The id of the request being handled here, if any."""
    return _request_id.get()


@contextlib.contextmanager
def bound(request_id: str | Iterable[str] | None) -> Iterator[None]:
    """Within ``with``, log lines carry ``request_id`` (several ids, comma-separated, for a batch)."""
    if request_id is not None and not isinstance(request_id, str):
        ids = [r for r in request_id if r]
        request_id = ",".join(dict.fromkeys(ids)) or None
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id``, ``stage`` and ``replica`` to every record (it filters nothing out)."""

    def __init__(self, stage: str = "-", replica: str = "-") -> None:
        super().__init__()
        self.stage = stage
        self.replica = replica

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get() or "-"
        if not hasattr(record, "stage"):
            record.stage = self.stage
        if not hasattr(record, "replica"):
            record.replica = self.replica
        return True


__all__ = ["HEADER", "LOG_FORMAT", "RequestIdFilter", "bound", "current", "new_request_id", "request_id_from"]
