"""Async jobs that survive their Ingress replica: leases in the result store, renewed by the
owner, taken over by another replica when they run out.

A job's record (``jobs/<id>.json``) holds its request as sent (with the resolved seed), the
attempt number and a lease ``{owner, started, expires}``. While an attempt runs, its Ingress
rewrites the lease every third of ``lease_s``. Every Ingress replica sweeps the active jobs
(``jobs/active/<id>.json`` markers) every half lease, and for each asks :meth:`LeasePolicy.decide`
-- a pure function of ``(record, now)`` -- what to do:

- ``keep``: the owner's lease holds;
- ``resume``: the lease ran out (the owner died or stalled) and tries are left: claim the next
  attempt with a create-if-absent write (``jobs/claims/<id>/<attempt>.json``: exactly one replica
  wins) and run the recorded request again: same seed, same image, stored under the same keys
  (``result_id`` = the job id), so nothing is stored twice;
- ``fail``: the lease ran out and ``max_attempts`` were used: the record ends ``failed``, with why;
- ``done``: the record is final; drop a leftover marker.

Worked example (lease 30 s, timeout 300 s): the owner dies at t=100 s after its last renewal at
t=95 s; its lease expires at 125 s; a sweep by t=140 s resumes the job. A live owner stops
renewing at started + timeout (its attempt is cancelled there), so a lease is void after
``started + request_timeout_s + lease_s`` whatever it says: no job stays ``queued`` or
``running`` longer than one lease past its attempt's time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from serve.errors import DarkroomError, NotFoundError, RequestTimeoutError
from serve.metrics import NO_METRICS, Metrics
from serve.request_context import bound
from serve.storage import ResultStore

logger = logging.getLogger(__name__)

FINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_PREFIX = "jobs/active/"
#: Record fields for the Ingress only; GET /v1/images/jobs/{id} leaves them out.
INTERNAL_FIELDS = ("request", "lease", "api_key")


def active_key(job_id: str) -> str:
    return f"{ACTIVE_PREFIX}{job_id}.json"


def claim_key(job_id: str, attempt: int) -> str:
    return f"jobs/claims/{job_id}/{attempt}.json"


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
        if record.get("status") in FINAL:
            return "done"
        lease = record.get("lease") or {}
        expires = float(lease.get("expires", 0.0))
        void_after = float(lease.get("started", 0.0)) + self.request_timeout_s + self.lease_s
        if now < expires and now < void_after:
            return "keep"
        return "fail" if int(record.get("attempt", 1)) >= self.max_attempts else "resume"


Execute = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class JobRunner:
    """Runs jobs with leases, and resumes other replicas' jobs whose leases ran out.

    ``execute(record)`` runs a job's recorded request and returns the fields of its final
    record (``status: succeeded`` and its images); it raises on failure. Records are written
    from worker threads (the store blocks).
    """

    def __init__(
        self,
        store: ResultStore,
        policy: LeasePolicy,
        execute: Execute,
        *,
        metrics: Metrics = NO_METRICS,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.policy = policy
        self.execute = execute
        self.metrics = metrics
        self.owner = owner or uuid.uuid4().hex[:12]
        self.clock = clock
        self._tasks: set[asyncio.Task] = set()  # strong refs: the loop only keeps weak ones
        self._sweeper: asyncio.Task | None = None
        self.on_finish: Callable[[dict[str, Any]], None] | None = None  # e.g. release a key's images

    # -- store access, timed -------------------------------------------------------------------
    async def _store(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await asyncio.to_thread(fn, *args)
        except NotFoundError:
            raise
        except Exception:
            self.metrics.inc("darkroom_store_errors_total", op=op)
            raise
        finally:
            self.metrics.observe("darkroom_store_seconds", time.perf_counter() - t0, op=op)

    async def _write(self, record: dict[str, Any]) -> None:
        await self._store("job", self.store.put_job, record["id"], record)

    # -- running a job -------------------------------------------------------------------------
    async def submit(self, record: dict[str, Any]) -> dict[str, Any]:
        """Record a new job (attempt 1, owned here) and start it; returns the record as stored."""
        now = self.clock()
        record = {**record, "attempt": 1, "lease": self.policy.lease(self.owner, now, now)}
        await self._store("claim", self.store.put_json_if_absent, claim_key(record["id"], 1), {"owner": self.owner})
        await self._write(record)
        await self._store("job", self.store.put_json, active_key(record["id"]), {"id": record["id"]})
        self.metrics.inc("darkroom_jobs_total", event="submitted")
        self._start(record)
        return record

    def _start(self, record: dict[str, Any]) -> None:
        task = asyncio.create_task(self._run(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, record: dict[str, Any]) -> None:
        job_id = record["id"]
        started = float(record["lease"]["started"])
        with bound(record.get("request_id")):
            record = {**record, "status": "running", "lease": self.policy.lease(self.owner, started, self.clock())}
            try:
                await self._write(record)
            except Exception:  # the lease runs out and a sweep (maybe this replica's) resumes the job
                logger.warning("job %s: could not start attempt %d", job_id, record["attempt"], exc_info=True)
                if self.on_finish is not None:
                    self.on_finish(record)
                return
            logger.info("job %s: attempt %d running here (owner %s)", job_id, record["attempt"], self.owner)
            work = asyncio.create_task(self.execute(record))
            renewer = asyncio.create_task(self._renew(record, work))
            try:
                finished = await work
                done = {**record, **finished}
                event = "succeeded" if done.get("status") == "succeeded" else "failed"
            except asyncio.CancelledError:
                if not renewer.done() or renewer.result() != "lost":
                    raise  # this replica is stopping: the lease runs out and another one resumes
                logger.warning("job %s: attempt %d lost its lease; stopped", job_id, record["attempt"])
                return
            except Exception as exc:  # the job records any failure; the server carries on
                logger.exception("job %s failed", job_id)
                err = exc if isinstance(exc, DarkroomError) else DarkroomError(f"generation failed: {exc}")
                done = {**record, "status": "failed", **err.to_openai()}
                event = "failed"
            finally:
                renewer.cancel()
                if self.on_finish is not None:
                    self.on_finish(record)
            await self._finish(record, {**done, "finished": int(self.clock())}, event)

    async def _renew(self, record: dict[str, Any], work: asyncio.Task) -> str:
        """Rewrite the lease every third of it, while this attempt still owns the job."""
        started = float(record["lease"]["started"])
        while not work.done():
            await asyncio.sleep(self.policy.renew_every_s)
            now = self.clock()
            try:
                current = await self._store("job", self.store.get_job, record["id"])
                if int(current.get("attempt", 1)) != record["attempt"]:
                    work.cancel()  # another replica took the job over: this attempt is void
                    return "lost"
                if now > started + self.policy.request_timeout_s:
                    return "expired"  # stop renewing: the attempt's own time limit ends it
                record["lease"] = self.policy.lease(self.owner, started, now)
                await self._write({**current, "lease": record["lease"]})
            except asyncio.CancelledError:
                raise
            except Exception:  # a missed renewal is survivable; the next one may work
                logger.warning("job %s: lease renewal failed", record["id"], exc_info=True)
        return "finished"

    async def _finish(self, record: dict[str, Any], done: dict[str, Any], event: str, *, check: bool = True) -> None:
        """Write the final record, unless (``check``) another attempt took the job over meanwhile."""
        job_id = record["id"]
        try:
            current = await self._store("job", self.store.get_job, job_id) if check else record
            if int(current.get("attempt", 1)) != record["attempt"]:
                logger.warning("job %s: attempt %d finished after a takeover; not recorded", job_id, record["attempt"])
                return
            done.pop("lease", None)
            await self._write(done)
            self.metrics.inc("darkroom_jobs_total", event=event)
            await self._store("job", self.store.delete, active_key(job_id))
        except Exception:
            logger.exception("could not record the end of job %s", job_id)

    # -- sweeping other replicas' jobs ---------------------------------------------------------
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
            if action == "fail":
                err = RequestTimeoutError(
                    f"the job's Ingress replica stopped renewing its lease; gave up after {attempt - 1} attempt(s)"
                )
                done = {**record, "attempt": attempt, "status": "failed", "finished": int(now), **err.to_openai()}
                done["error"]["code"] = "job_lost"
                # The claim of this attempt makes this replica the only writer: no check needed.
                await self._finish(done, done, "failed", check=False)
                return "failed"
            logger.warning("job %s: lease of %s ran out; resuming as attempt %d", job_id, previous, attempt)
            resumed = {**record, "attempt": attempt, "lease": self.policy.lease(self.owner, now, now)}
            await self._write(resumed)
            self.metrics.inc("darkroom_jobs_total", event="resumed")
            self._start(resumed)
        return "resumed"

    async def close(self) -> None:
        """Stop sweeping and cancel this replica's attempts (their leases run out; others resume them)."""
        tasks = [t for t in (self._sweeper, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


__all__ = ["ACTIVE_PREFIX", "FINAL", "INTERNAL_FIELDS", "JobRunner", "LeasePolicy", "active_key", "claim_key"]
