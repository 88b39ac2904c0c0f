"""Job leases (serve/api/leases.py, serve/api/jobs.py): the pure lease policy, and job managers
that die, resume and give up, over a real result store with the clock passed in (no sleeping on
leases); the service under them is a stand-in whose generation runs until the test lets it end."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serve.api.jobs import JobManager
from serve.api.leases import ACTIVE_PREFIX, LeasePolicy, cancel_key
from serve.api.streaming import Developed
from serve.metrics import RecordingMetrics
from serve.stages.messages import DecodedImage
from serve.storage import open_store

POLICY = LeasePolicy(lease_s=30.0, max_attempts=2, request_timeout_s=300.0)


def running(attempt=1, started=0.0, expires=30.0, status="running"):
    return {
        "id": "j",
        "status": status,
        "attempt": attempt,
        "lease": {"owner": "a", "started": started, "expires": expires},
    }


@pytest.mark.parametrize(
    "record, now, action",
    [
        (running(), 29.9, "keep"),  # the owner's lease holds
        (running(), 30.0, "resume"),  # it ran out: resume, tries are left
        (running(attempt=2), 31.0, "fail"),  # ... unless max_attempts were used
        (running(status="queued"), 45.0, "resume"),  # a job queued by a replica that died
        (running(status="succeeded", expires=0), 1e9, "done"),
        (running(status="failed", expires=0), 1e9, "done"),
        # A lease renewed past its attempt's time limit + one lease is void: 300 + 30 = 330.
        (running(expires=400.0), 329.0, "keep"),
        (running(expires=400.0), 330.0, "resume"),
    ],
)
def test_lease_policy_is_a_function_of_record_and_time(record, now, action):
    assert POLICY.decide(record, now) == action


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Work:
    """Jobs' generation that runs until the test lets it finish (or its replica "dies")."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.release = asyncio.Event()

    def service(self, name: str, store) -> SimpleNamespace:
        """The part of ``ImageService`` a ``JobManager`` uses; generation records (replica, attempt)."""
        work = self
        managers: list[JobManager] = []

        def parse(body):
            request = SimpleNamespace(
                partial_images=0,
                response_format="url",
                quality=None,
                background=None,
                stream=False,
                model_dump=lambda **_: dict(body),
            )
            params = SimpleNamespace(
                seed=body["seed"], width=8, height=8, output_format="png", output_compression=None, loras=()
            )
            return request, params

        async def develop(request, params, partials, deadline, progress=False, *, result_id=None, created=None):
            work.calls.append((name, managers[0].live[result_id].record["attempt"]))
            await work.release.wait()
            yield Developed([DecodedImage(f"images/{result_id}-0.png", "image/png", None)], {})

        service = SimpleNamespace(
            store=store,
            config=SimpleNamespace(job_poll_s=0.05, request_timeout_s=300.0, stage_timeout_s=10.0),
            parse=parse,
            develop=develop,
            stream_context=lambda request, params: SimpleNamespace(completed=lambda data, index: {"index": index}),
            _count_images=lambda images: None,
        )
        service.managers = managers
        return service

    def manager(self, name: str, store, policy=None, clock=None, metrics=None) -> JobManager:
        service = self.service(name, store)
        extra = {"metrics": metrics} if metrics is not None else {}
        manager = JobManager(service, policy or POLICY, owner=name, clock=clock or time_now, **extra)
        service.managers.append(manager)
        return manager


def time_now() -> float:
    raise AssertionError("pass the test's clock")


async def submit(manager: JobManager, seed: int = 7) -> str:
    request, params = manager.service.parse({"prompt": "a kite", "seed": seed})
    return (await manager.submit(request, params))["id"]


async def until(predicate, timeout_s=10.0):
    async def poll():
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


def test_a_job_whose_replica_died_is_resumed_by_another_and_succeeds(tmp_path):
    async def scenario():
        store, clock, work = open_store(str(tmp_path)), Clock(), Work()
        metrics = RecordingMetrics("Ingress")
        a = work.manager("a", store, clock=clock)
        b = work.manager("b", store, clock=clock, metrics=metrics)
        job = await submit(a)
        await until(lambda: work.calls == [("a", 1)])
        assert "lease" not in (await a.get(job, "http://x"))  # clients never see the lease
        await a.close()  # replica a dies: its attempt stops, nothing is written
        assert store.get_job(job)["status"] == "queued"
        assert await b.sweep_once() == {job: "keep"}  # a's lease still holds
        clock.now += POLICY.lease_s
        assert await b.sweep_once() == {job: "resumed"}
        assert await b.sweep_once() == {job: "keep"}  # b holds the new lease
        await until(lambda: ("b", 2) in work.calls)
        assert store.get_job(job)["request"]["seed"] == 7  # the same request, the same seed
        work.release.set()
        await until(lambda: store.get_job(job)["status"] == "succeeded")
        record = store.get_job(job)
        assert record["attempt"] == 2 and "lease" not in record
        assert record["images"] == [{"key": f"images/{job}-0.png", "content_type": "image/png"}]
        await until(lambda: store.list_keys(ACTIVE_PREFIX) == [])  # dropped right after the final record
        assert metrics.value("darkroom_jobs_total", event="resumed") == 1
        assert metrics.value("darkroom_jobs_total", event="succeeded") == 1
        await b.close()

    asyncio.run(scenario())


def test_a_job_past_its_retry_budget_fails_with_a_reason(tmp_path):
    async def scenario():
        store, clock, work = open_store(str(tmp_path)), Clock(), Work()
        managers = [work.manager(n, store, clock=clock) for n in "abc"]
        job = await submit(managers[0])
        await until(lambda: len(work.calls) == 1)
        await managers[0].close()
        clock.now += POLICY.lease_s
        assert await managers[1].sweep_once() == {job: "resumed"}
        await until(lambda: len(work.calls) == 2)
        await managers[1].close()  # the second owner dies too: 2 attempts used
        clock.now += POLICY.lease_s
        assert await managers[2].sweep_once() == {job: "failed"}
        record = store.get_job(job)
        assert record["status"] == "failed" and record["error"]["code"] == "job_lost"
        assert "lease" in record["error"]["message"]
        assert store.list_keys(ACTIVE_PREFIX) == []
        assert await managers[2].sweep_once() == {}

    asyncio.run(scenario())


def test_two_sweepers_resume_a_job_once(tmp_path):
    async def scenario():
        store, clock, work = open_store(str(tmp_path)), Clock(), Work()
        a, b, c = (work.manager(n, store, clock=clock) for n in "abc")
        job = await submit(a)
        await until(lambda: len(work.calls) == 1)
        await a.close()
        clock.now += POLICY.lease_s
        outcomes = await asyncio.gather(b.sweep_once(), c.sweep_once())
        assert sorted(o[job] for o in outcomes) == ["claimed elsewhere", "resumed"]
        await until(lambda: len(work.calls) == 2)
        work.release.set()
        await until(lambda: store.get_job(job)["status"] == "succeeded")
        await asyncio.gather(b.close(), c.close())

    asyncio.run(scenario())


def test_a_cancelled_job_whose_replica_died_is_never_resumed(tmp_path):
    async def scenario():
        store, clock, work = open_store(str(tmp_path)), Clock(), Work()
        a, b = (work.manager(n, store, clock=clock) for n in "ab")
        job = await submit(a)
        await until(lambda: len(work.calls) == 1)
        await a.close()
        store.put_json(cancel_key(job), {"requested": 1})  # a DELETE answered by another replica
        clock.now += POLICY.lease_s
        assert await b.sweep_once() == {job: "cancelled"}
        assert store.get_job(job)["status"] == "cancelled" and len(work.calls) == 1
        assert store.list_keys(ACTIVE_PREFIX) == []
        await b.close()

    asyncio.run(scenario())


def test_a_stalled_owner_that_lost_its_lease_stops_and_records_nothing(tmp_path):
    async def scenario():
        store, clock, work = open_store(str(tmp_path)), Clock(), Work()
        policy = LeasePolicy(lease_s=0.3, max_attempts=3, request_timeout_s=300.0)  # renews every 0.1 s
        # a is alive but stalled: every lease it writes has run out by the time others read it
        # (its clock lags 100 s). b takes over; a's next renewal finds attempt 2 and stops.
        a = work.manager("a", store, policy, clock=lambda: clock.now - 100)
        b = work.manager("b", store, policy, clock=clock)
        job = await submit(a)
        await until(lambda: len(work.calls) == 1)
        assert await b.sweep_once() == {job: "resumed"}
        await until(lambda: not a._tasks)  # a's attempt ended by itself
        work.release.set()
        await until(lambda: store.get_job(job)["status"] == "succeeded")
        assert store.get_job(job)["attempt"] == 2
        await b.close()

    asyncio.run(scenario())
