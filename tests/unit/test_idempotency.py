"""IdempotencyGuard over a real local store: first result wins, concurrent duplicates run once."""

from __future__ import annotations

import asyncio

import pytest

from serve.api.idempotency import IdempotencyGuard, record_key
from serve.errors import IdempotencyConflictError, InvalidRequestError
from serve.storage import open_store


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path))


def test_put_json_if_absent_has_one_winner(store):
    assert store.put_json_if_absent("idempotency/x.json", {"a": 1})
    assert not store.put_json_if_absent("idempotency/x.json", {"a": 2})
    assert store.get_json("idempotency/x.json") == {"a": 1}


def test_sequential_repeat_returns_first_result(store):
    guard = IdempotencyGuard(store, stale_after_s=60)
    runs = []

    async def produce():
        runs.append(1)
        return {"seed": len(runs)}

    async def main():
        first = await guard.run("key-1", {"prompt": "a"}, produce, 10)
        again = await guard.run("key-1", {"prompt": "a"}, produce, 10)
        return first, again

    first, again = asyncio.run(main())
    assert runs == [1] and first["seed"] == again["seed"] == 1
    # A second guard (another Ingress replica) sees the stored record too.
    other = IdempotencyGuard(store, stale_after_s=60)
    assert asyncio.run(other.run("key-1", {"prompt": "a"}, produce, 10))["seed"] == 1 and runs == [1]


def test_concurrent_duplicates_generate_once(store):
    guards = [IdempotencyGuard(store, stale_after_s=60, poll_s=0.01) for _ in range(2)]
    runs = []

    async def produce():
        runs.append(1)
        await asyncio.sleep(0.2)
        return {"seed": 7}

    async def main():
        calls = [guards[i % 2].run("dup", {"prompt": "a"}, produce, 10) for i in range(8)]
        return await asyncio.gather(*calls)

    results = asyncio.run(main())
    assert len(runs) == 1 and all(r["seed"] == 7 for r in results)


def test_reused_key_with_other_body_conflicts(store):
    guard = IdempotencyGuard(store, stale_after_s=60)

    async def produce():
        return {"seed": 1}

    asyncio.run(guard.run("k", {"prompt": "a"}, produce, 10))
    with pytest.raises(IdempotencyConflictError) as err:
        asyncio.run(guard.run("k", {"prompt": "b"}, produce, 10))
    assert err.value.status_code == 409 and err.value.field == "Idempotency-Key"


def test_failure_releases_the_claim(store):
    guard = IdempotencyGuard(store, stale_after_s=60)

    async def fail():
        raise RuntimeError("boom")

    async def ok():
        return {"seed": 3}

    with pytest.raises(RuntimeError):
        asyncio.run(guard.run("k2", {"p": 1}, fail, 10))
    assert asyncio.run(guard.run("k2", {"p": 1}, ok, 10))["seed"] == 3


def test_stale_claim_is_taken_over(store):
    store.put_json(record_key("k3"), {"status": "pending", "fingerprint": "x", "claimed": 0})
    guard = IdempotencyGuard(store, stale_after_s=5)

    async def ok():
        return {"seed": 9}

    assert asyncio.run(guard.run("k3", {"p": 1}, ok, 10))["seed"] == 9


def test_client_key_never_becomes_a_path():
    key = record_key("../../etc/passwd")
    assert key.startswith("idempotency/") and ".." not in key
    with pytest.raises(InvalidRequestError):
        record_key("")
    with pytest.raises(InvalidRequestError):
        record_key("x" * 300)
