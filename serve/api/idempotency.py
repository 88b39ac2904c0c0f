"""``Idempotency-Key``: a repeated key returns the first result; concurrent duplicates run once.

Records live in the result store (``idempotency/<sha256 of the key>.json``), so every Ingress
replica sees them; the client's key is hashed and never becomes a storage key itself. The
first request claims the record with a create-if-absent write (S3 ``If-None-Match: *``, a
hard link locally): exactly one caller wins and generates; the others wait for its result.
Duplicates on the same replica also share one in-memory future, so they cost no polling.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from serve.errors import IdempotencyConflictError, InvalidRequestError, NotFoundError, RequestTimeoutError
from serve.storage import ResultStore

logger = logging.getLogger(__name__)

MAX_KEY_CHARS = 255


def record_key(idempotency_key: str) -> str:
    if not idempotency_key or len(idempotency_key) > MAX_KEY_CHARS or not idempotency_key.isprintable():
        raise InvalidRequestError(
            "Idempotency-Key", idempotency_key, f"must be 1..{MAX_KEY_CHARS} printable characters"
        )
    return "idempotency/" + hashlib.sha256(idempotency_key.encode()).hexdigest() + ".json"


def fingerprint(request_fields: dict[str, Any]) -> str:
    """Same fields, same fingerprint (key order and the transport's formatting do not matter)."""
    return hashlib.sha256(json.dumps(request_fields, sort_keys=True, default=str).encode()).hexdigest()


class IdempotencyGuard:
    """Run ``produce`` once per key; later and concurrent callers get its stored result."""

    def __init__(self, store: ResultStore, *, stale_after_s: float, poll_s: float = 0.2) -> None:
        self.store = store
        self.stale_after_s = stale_after_s  # a pending claim older than this was abandoned
        self.poll_s = poll_s
        self._inflight: dict[str, asyncio.Future] = {}

    async def run(
        self,
        idempotency_key: str,
        fields: dict[str, Any],
        produce: Callable[[], Awaitable[dict[str, Any]]],
        timeout_s: float,
    ) -> dict[str, Any]:
        key = record_key(idempotency_key)
        fp = fingerprint(fields)
        if key in self._inflight:
            result = await asyncio.shield(self._inflight[key])
            return self._checked(result, fp)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._claim_or_wait(key, fp, produce, timeout_s)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[key]

    async def _claim_or_wait(self, key, fp, produce, timeout_s) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            claim = {"status": "pending", "fingerprint": fp, "claimed": time.time()}
            if await asyncio.to_thread(self.store.put_json_if_absent, key, claim):
                return await self._produce(key, fp, produce)
            try:
                record = await asyncio.to_thread(self.store.get_json, key)
            except NotFoundError:
                continue  # the holder gave up and removed its claim: try again
            if record.get("status") == "done":
                return self._checked(record, fp)
            if time.time() - float(record.get("claimed", 0)) > self.stale_after_s:
                logger.warning("idempotency claim %s is stale; taking it over", key)
                await asyncio.to_thread(self.store.delete, key)
                continue
            if time.monotonic() > deadline:
                raise RequestTimeoutError("a request with this Idempotency-Key is still running")
            await asyncio.sleep(self.poll_s)

    async def _produce(self, key, fp, produce) -> dict[str, Any]:
        try:
            result = await produce()
        except BaseException:
            # Failed or cancelled: release the claim so a retry with the same key can run.
            try:
                await asyncio.shield(asyncio.to_thread(self.store.delete, key))
            except Exception:
                logger.warning("could not release idempotency claim %s", key, exc_info=True)
            raise
        record = {"status": "done", "fingerprint": fp, "claimed": time.time(), **result}
        await asyncio.to_thread(self.store.put_json, key, record)
        return record

    @staticmethod
    def _checked(record: dict[str, Any], fp: str) -> dict[str, Any]:
        if record.get("fingerprint") != fp:
            raise IdempotencyConflictError("Idempotency-Key", None, "was already used with a different request body")
        return record
