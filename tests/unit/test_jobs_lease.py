"""Job leases (serve/api/jobs.py): the pure lease policy, and runners that die, resume and give up,
over a real result store with the clock passed in (no sleeping on leases)."""

from __future__ import annotations

import asyncio

import pytest

from serve.api.jobs import ACTIVE_PREFIX, JobRunner, LeasePolicy
from serve.metrics import RecordingMetrics
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
    """A job's execution that runs until the test lets it finish (or its replica "dies")."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.release = asyncio.Event()

    def on(self, name: str):
        async def execute(record):
            self.calls.append((name, record["attempt"]))
            await self.release.wait()
            return {
                "status": "succeeded",
                "images": [{"key": f"images/{record['id']}-0.png", "content_type": "image/png"}],
            }

        return execute


async def until(predicate, timeout_s=10.0):
    async def poll():
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


def test_a_job_whose_replica_died_is_resumed_by_another_and_succeeds(tmp_path):
    async def scenario():
        store, clock, work = open_store(str(tmp_path)), Clock(), Work()
        metrics = RecordingMetrics("Ingress")
        a = JobRunner(store, POLICY, work.on("a"), owner="a", clock=clock)
        b = JobRunner(store, POLICY, work.on("b"), owner="b", clock=clock, metrics=metrics)
        await a.submit({"id": "job1", "status": "queued", "created": 1})
        await until(lambda: work.calls == [("a", 1)])
        assert store.get_job("job1")["status"] == "running"
        await a.close()  # replica a dies: its attempt stops, nothing is written
        assert await b.sweep_once() == {"job1": "keep"}  # a's lease still holds
        clock.now += POLICY.lease_s
        assert await b.sweep_once() == {"job1": "resumed"}
        assert await b.sweep_once() == {"job1": "keep"}  # b holds the new lease
        await until(lambda: ("b", 2) in work.calls)
        work.release.set()
        await until(lambda: store.get_job("job1")["status"] == "succeeded")
        record = store.get_job("job1")
        assert record["attempt"] == 2 and "lease" not in record
        await until(lambda: store.list_keys(ACTIVE_PREFIX) == [])  # dropped right after the final record
        assert metrics.value("darkroom_jobs_total", event="resumed") == 1
        await b.close()

    asyncio.run(scenario())


def test_a_job_past_its_retry_budget_fails_with_a_reason(tmp_path):
    async def scenario():
        store, clock, work = open_store(str(tmp_path)), Clock(), Work()
        runners = [JobRunner(store, POLICY, work.on(n), owner=n, clock=clock) for n in "abc"]
        await runners[0].submit({"id": "job2", "status": "queued", "created": 1})
        await until(lambda: len(work.calls) == 1)
        await runners[0].close()
        clock.now += POLICY.lease_s
        assert await runners[1].sweep_once() == {"job2": "resumed"}
        await until(lambda: len(work.calls) == 2)
        await runners[1].close()  # the second owner dies too: 2 attempts used
        clock.now += POLICY.lease_s
        assert await runners[2].sweep_once() == {"job2": "failed"}
        record = store.get_job("job2")
        assert record["status"] == "failed" and record["error"]["code"] == "job_lost"
        assert "lease" in record["error"]["message"]
        assert store.list_keys(ACTIVE_PREFIX) == []
        assert await runners[2].sweep_once() == {}

    asyncio.run(scenario())


def test_two_sweepers_resume_a_job_once(tmp_path):
    async def scenario():
        store, clock, work = open_store(str(tmp_path)), Clock(), Work()
        a, b, c = (JobRunner(store, POLICY, work.on(n), owner=n, clock=clock) for n in "abc")
        await a.submit({"id": "job3", "status": "queued", "created": 1})
        await until(lambda: len(work.calls) == 1)
        await a.close()
        clock.now += POLICY.lease_s
        outcomes = await asyncio.gather(b.sweep_once(), c.sweep_once())
        assert sorted(o["job3"] for o in outcomes) == ["claimed elsewhere", "resumed"]
        await until(lambda: len(work.calls) == 2)
        work.release.set()
        await until(lambda: store.get_job("job3")["status"] == "succeeded")
        await asyncio.gather(b.close(), c.close())

    asyncio.run(scenario())


def test_a_stalled_owner_that_lost_its_lease_stops_and_records_nothing(tmp_path):
    async def scenario():
        store, clock, work = open_store(str(tmp_path)), Clock(), Work()
        policy = LeasePolicy(lease_s=0.3, max_attempts=3, request_timeout_s=300.0)  # renews every 0.1 s
        # a is alive but stalled: every lease it writes has run out by the time others read it
        # (its clock lags 100 s). b takes over; a's next renewal finds attempt 2 and stops.
        a = JobRunner(store, policy, work.on("a"), owner="a", clock=lambda: clock.now - 100)
        b = JobRunner(store, policy, work.on("b"), owner="b", clock=clock)
        await a.submit({"id": "job4", "status": "queued", "created": 1})
        await until(lambda: len(work.calls) == 1)
        assert await b.sweep_once() == {"job4": "resumed"}
        await until(lambda: not a._tasks)  # a's attempt ended by itself
        work.release.set()
        await until(lambda: store.get_job("job4")["status"] == "succeeded")
        assert store.get_job("job4")["attempt"] == 2
        await b.close()

    asyncio.run(scenario())
