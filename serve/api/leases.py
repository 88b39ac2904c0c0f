"""Job leases: what lets a job survive the Ingress replica that ran it (serve/api/jobs.py runs jobs).

A job's record (``jobs/<id>.json``) holds its request as sent (with the resolved seed), the
attempt number and a lease ``{owner, started, expires}``. While an attempt runs, its Ingress
rewrites the lease every third of ``lease_s``. Every Ingress replica sweeps the active jobs
(``jobs/active/<id>.json`` markers) every half lease, and for each asks :meth:`LeasePolicy.decide`
-- a pure function of ``(record, now)`` -- what to do:

- ``keep``: the owner's lease holds;
- ``resume``: the lease ran out (the owner died or stalled) and tries are left: claim the next
  attempt with a create-if-absent write (``jobs/claims/<id>/<attempt>.json``: exactly one replica
  wins) and run the recorded request again: same seed, same image, stored under the same keys
  (``result_id`` = the job id), so nothing is stored twice. A job with a cancel mark
  (``jobs/cancel/<id>.json``, left by a DELETE) is ended ``cancelled`` instead: never resumed;
- ``fail``: the lease ran out and ``max_attempts`` were used: the record ends ``failed``, with why;
- ``done``: the record is final (``succeeded``, ``failed``, ``cancelled``); drop a leftover marker.

Worked example (lease 30 s, timeout 300 s): the owner dies at t=100 s after its last renewal at
t=95 s; its lease expires at 125 s; a sweep by t=140 s resumes the job. A live owner stops
renewing at started + timeout (its attempt is cancelled there), so a lease is void after
``started + request_timeout_s + lease_s`` whatever it says: no job stays ``queued`` or
``running`` longer than one lease past its attempt's time limit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from serve.errors import DarkroomError, NotFoundError, RequestTimeoutError
from serve.request_context import bound

logger = logging.getLogger(__name__)

#: A job in one of these statuses is over: never resumed, never cancelled again.
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_PREFIX = "jobs/active/"
#: Record fields for the Ingress only; GET /v1/images/jobs/{id} leaves them out.
INTERNAL_FIELDS = ("request", "lease", "api_key")


def active_key(job_id: str) -> str:
    return f"{ACTIVE_PREFIX}{job_id}.json"


def claim_key(job_id: str, attempt: int) -> str:
    return f"jobs/claims/{job_id}/{attempt}.json"


def cancel_key(job_id: str) -> str:
    return f"jobs/cancel/{job_id}.json"


@dataclass(frozen=True)
class LeasePolicy:
    """When a job's owner must renew, and what a sweeper does with a job: pure functions of time."""

    lease_s: float = 30.0
    max_attempts: int = 3
    request_timeout_s: float = 300.0

    @property
    def renew_every_s(self) -> float:
        return self.lease_s / 3

    @property
    def sweep_every_s(self) -> float:
        return self.lease_s / 2

    def lease(self, owner: str, started: float, now: float) -> dict[str, Any]:
        return {"owner": owner, "started": started, "expires": now + self.lease_s}

    def decide(self, record: dict[str, Any], now: float) -> str:
        """``keep``, ``resume``, ``fail`` or ``done`` for a job record at wall-clock time ``now``."""
        if record.get("status") in TERMINAL:
            return "done"
        lease = record.get("lease") or {}
        expires = float(lease.get("expires", 0.0))
        void_after = float(lease.get("started", 0.0)) + self.request_timeout_s + self.lease_s
        if now < expires and now < void_after:
            return "keep"
        return "fail" if int(record.get("attempt", 1)) >= self.max_attempts else "resume"


class JobSweeper:
    """The sweeping half of ``serve.api.jobs.JobManager``: every replica's pass over the active
    jobs, taking over those whose owner stopped renewing its lease.

    The manager provides ``store``, ``policy``, ``owner``, ``clock``, ``metrics``, ``_sweeper``,
    ``_store(op, fn, *args)`` (a timed store call) and ``_resume(record)`` (run the job here).
    """

    store: Any
    policy: LeasePolicy
    owner: str
    clock: Any
    metrics: Any
    _sweeper: asyncio.Task | None

    async def _store(self, op: str, fn: Any, *args: Any) -> Any:  # pragma: no cover - the manager's
        raise NotImplementedError

    async def _resume(self, record: dict[str, Any]) -> None:  # pragma: no cover - the manager's
        raise NotImplementedError

    def start_sweeper(self) -> None:
        """Sweep every half lease from now on (idempotent; needs a running event loop)."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            # Jitter: replicas started together should not all list the store at the same moment.
            await asyncio.sleep(self.policy.sweep_every_s * random.uniform(0.8, 1.2))
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("job sweep failed", exc_info=True)

    async def sweep_once(self) -> dict[str, str]:
        """One pass over the active jobs; returns ``{job id: action taken}``."""
        actions: dict[str, str] = {}
        keys = await self._store("job", self.store.list_keys, ACTIVE_PREFIX)
        for key in keys:
            job_id = key[len(ACTIVE_PREFIX) :].removesuffix(".json")
            try:
                record = await self._store("job", self.store.get_job, job_id)
            except NotFoundError:
                continue
            action = self.policy.decide(record, self.clock())
            if action == "done":
                await self._store("job", self.store.delete, key)
            elif action in ("resume", "fail"):
                action = await self._take_over(record, action)
            actions[job_id] = action
        return actions

    async def _take_over(self, record: dict[str, Any], action: str) -> str:
        job_id, attempt = record["id"], int(record.get("attempt", 1)) + 1
        won = await self._store(
            "claim", self.store.put_json_if_absent, claim_key(job_id, attempt), {"owner": self.owner}
        )
        if not won:
            return "claimed elsewhere"
        now = self.clock()
        previous = (record.get("lease") or {}).get("owner", "?")
        with bound(record.get("request_id")):
            # The claim of this attempt makes this replica the only writer of the record.
            if await self._store("job", self.store.exists, cancel_key(job_id)):
                return await self._end(record, attempt, {"status": "cancelled"})  # never resumed
            if action == "fail":
                err = RequestTimeoutError(
                    f"the job's Ingress replica stopped renewing its lease; gave up after {attempt - 1} attempt(s)"
                )
                ended = {"status": "failed", **err.to_openai()}
                ended["error"]["code"] = "job_lost"
                return await self._end(record, attempt, ended)
            logger.warning("job %s: lease of %s ran out; resuming as attempt %d", job_id, previous, attempt)
            resumed = {
                **record,
                "status": "queued",
                "attempt": attempt,
                "lease": self.policy.lease(self.owner, now, now),
            }
            for stale in ("progress", "preview"):  # the new attempt starts over (same seed, same image)
                resumed.pop(stale, None)
            try:
                await self._resume(resumed)
            except DarkroomError as exc:  # e.g. its request no longer parses here
                return await self._end(record, attempt, {"status": "failed", **exc.to_openai()})
            self.metrics.inc("darkroom_jobs_total", event="resumed")
        return "resumed"

    async def _end(self, record: dict[str, Any], attempt: int, ended: dict[str, Any]) -> str:
        """Write a lost job's final record (as ``attempt``, claimed here) and drop its marker."""
        done = {**record, "attempt": attempt, "finished": int(time.time()), **ended}
        done.pop("lease", None)
        await self._store("job", self.store.put_job, record["id"], done)
        self.metrics.inc("darkroom_jobs_total", event=ended["status"])
        await self._store("job", self.store.delete, active_key(record["id"]))
        return ended["status"]


__all__ = [
    "ACTIVE_PREFIX",
    "INTERNAL_FIELDS",
    "JobSweeper",
    "TERMINAL",
    "LeasePolicy",
    "active_key",
    "cancel_key",
    "claim_key",
]
