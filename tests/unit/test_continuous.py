"""Continuous batching: late requests join the running batch, results equal solo runs,
cancelled requests leave it, and a failing step fails only its batch."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve.stages import Conditioning, DenoiseJob, Denoiser, TextEncoder
from serve.stages.continuous import ContinuousDenoiser


@pytest.fixture(scope="module")
def parts(tiny_model):
    return TextEncoder.load(tiny_model, device="cpu"), Denoiser.load(tiny_model, device="cpu")


def job(encoder, seed, steps=6, **kw) -> DenoiseJob:
    pos, neg = encoder.encode([f"prompt {seed}", ""])
    base = dict(
        conditioning=Conditioning(pos, neg),
        cfg_scale=7.5,
        seed=seed,
        num_inference_steps=steps,
        guidance_scale=7.5,
        width=64,
        height=64,
    )
    base.update(kw)
    return DenoiseJob(**base)


def test_late_requests_join_and_match_solo_runs(parts):
    encoder, denoiser = parts
    jobs = [job(encoder, 1, steps=12), job(encoder, 2, scheduler="euler_a"), job(encoder, 3, width=48, n=2)]
    solo = [denoiser.denoise([j])[0] for j in jobs]
    # 0.1 s per step: the first request's 12 steps certainly last past the others' arrival.
    loop = ContinuousDenoiser(denoiser, max_requests=8, step_delay_s=0.1)

    async def main():
        calls = denoiser.model_calls
        first = asyncio.create_task(loop.submit(jobs[0]))
        deadline = asyncio.get_running_loop().time() + 60
        while denoiser.model_calls == calls:  # the first request is mid-way through its steps
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.005)
        rest = [asyncio.create_task(loop.submit(j)) for j in jobs[1:]]
        return await asyncio.gather(first, *rest)

    results = asyncio.run(main())
    assert loop.peak_requests == 3  # the late ones joined the running batch
    assert results[0].batch_size == 3
    for got, want in zip(results, solo, strict=True):
        np.testing.assert_allclose(got.value, want, atol=1e-4)
        assert got.compute_s > 0


def test_max_requests_bounds_the_batch(parts):
    encoder, denoiser = parts
    loop = ContinuousDenoiser(denoiser, max_requests=2)

    async def main():
        return await asyncio.gather(*(loop.submit(job(encoder, s, steps=3)) for s in range(5)))

    results = asyncio.run(main())
    assert len(results) == 5 and loop.peak_requests == 2


def test_cancelled_request_leaves_the_batch(parts):
    encoder, denoiser = parts
    # Each step takes at least 10 ms: the 0.2 s timeout ends the 150-step job after ~20 steps
    # on any machine, however fast (without the delay a fast one finishes 100 steps in 0.2 s).
    loop = ContinuousDenoiser(denoiser, max_requests=8, step_delay_s=0.01)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.submit(job(encoder, 9, steps=150)), timeout=0.2)
        quick = await loop.submit(job(encoder, 10, steps=3))
        return quick

    quick = asyncio.run(main())
    assert quick.value.shape == (1, 4, 8, 8)
    # The cancelled job stopped after the steps it ran in its 0.2 s (at most ~21 at 10 ms each),
    # not after its 150: all steps taken, the quick job's 3 included, stay far below that.
    assert loop.steps < 100


def test_step_delay_makes_every_step_slow(parts):
    """The fault-injection hook: a job of k steps takes at least k x the delay (a lower bound
    only, so no machine is too slow for it)."""
    encoder, denoiser = parts
    loop = ContinuousDenoiser(denoiser, max_requests=8, step_delay_s=0.05)

    async def main():
        t0 = asyncio.get_running_loop().time()
        result = await loop.submit(job(encoder, 13, steps=4))
        return result, asyncio.get_running_loop().time() - t0

    result, elapsed = asyncio.run(main())
    assert result.value.shape == (1, 4, 8, 8)
    assert elapsed >= 4 * 0.05


def test_a_failing_step_fails_its_batch_and_the_loop_goes_on(parts, monkeypatch):
    encoder, denoiser = parts
    loop = ContinuousDenoiser(denoiser, max_requests=8)
    real = denoiser.step
    calls = {"n": 0}

    def flaky(states):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("engine hiccup")
        return real(states)

    monkeypatch.setattr(denoiser, "step", flaky)

    async def main():
        with pytest.raises(RuntimeError, match="hiccup"):
            await loop.submit(job(encoder, 11, steps=4))
        return await loop.submit(job(encoder, 12, steps=3))

    assert asyncio.run(main()).value.shape == (1, 4, 8, 8)


def test_a_full_batch_keeps_stepping_while_requests_queue(parts):
    """Queued requests that cannot join (every slot taken) do not send the stepping thread back
    to the event loop after each step: a stretch in the thread runs until the batch can change."""
    encoder, denoiser = parts
    release = threading.Event()

    class Gated(ThreadPoolExecutor):
        """The first stretch waits until all four requests are queued: the sequence is then fixed."""

        def submit(self, fn, /, *args, **kwargs):
            def gated(*a, **kw):
                assert release.wait(timeout=60)
                return fn(*a, **kw)

            return super().submit(gated, *args, **kwargs)

    pool = Gated(max_workers=1)
    loop = ContinuousDenoiser(denoiser, max_requests=2, executor=pool)

    async def main():
        tasks = [asyncio.create_task(loop.submit(job(encoder, s, steps=6, scheduler="ddim"))) for s in range(4)]
        deadline = asyncio.get_running_loop().time() + 60
        # One or two admitted (their first stretch held at the gate), the rest queued.
        while (stats := loop.stats())["queued"] + stats["in_flight"] < 4:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.005)
        release.set()
        return stats["in_flight"], await asyncio.gather(*tasks)

    try:
        first, results = asyncio.run(main())
    finally:
        pool.shutdown()
    assert len(results) == 4 and loop.peak_requests == 2
    stats = loop.stats()
    # One stretch: the queued requests join in the stepping thread as slots free, with no
    # return to the event loop. Two first: two batches of two, 6 + 6 steps. One first: it steps
    # alone once, the second joins, then the third and fourth as the first two finish: 13 steps.
    # Returning at each batch change would be 2 or 5 stretches; after every step, 7 or 9.
    assert (stats["steps"], stats["stretches"]) == ((12, 1) if first == 2 else (13, 1))


def test_on_done_time_is_not_the_denoisers(parts):
    """What ``on_done`` takes in a stretch (the colocated VAE pass, reported as the Decoder's time)
    is left out of the request's denoise compute time."""
    encoder, denoiser = parts
    pool = ThreadPoolExecutor(1)
    loop = ContinuousDenoiser(denoiser, max_requests=8, executor=pool, on_done=lambda latents: time.sleep(0.5))

    async def main():
        t0 = time.perf_counter()
        result = await loop.submit(job(encoder, 0, steps=2))
        return result, time.perf_counter() - t0

    result, wall = asyncio.run(main())
    pool.shutdown()
    assert 0 < result.compute_s <= wall - 0.5
    assert result.extra["decoded_s"] >= 0.5  # for the service's timings: decode, not queueing


def test_on_done_gets_the_finished_latents_in_the_stepping_thread(parts):
    """``on_done`` sees, in the thread that stepped them, the very arrays the requests get back;
    one that raises costs no request its result."""
    encoder, denoiser = parts
    seen: list[tuple[str, list]] = []

    def on_done(latents):
        seen.append((threading.current_thread().name, latents))
        if len(seen) == 1:
            raise RuntimeError("a broken hook")

    pool = ThreadPoolExecutor(1, thread_name_prefix="stepper")
    loop = ContinuousDenoiser(denoiser, max_requests=8, executor=pool, on_done=on_done)

    async def main():
        return await asyncio.gather(*(loop.submit(job(encoder, s, steps=2 + s)) for s in range(3)))

    results = asyncio.run(main())
    pool.shutdown()
    handed = [lat for _, batch in seen for lat in batch]
    assert all(name.startswith("stepper") for name, _ in seen)
    assert len(handed) == 3  # every request once, the first hook's failure notwithstanding
    assert {id(r.value) for r in results} == {id(lat) for lat in handed}
    for r, s in zip(results, range(3), strict=True):
        np.testing.assert_allclose(r.value, denoiser.denoise([job(encoder, s, steps=2 + s)])[0], atol=1e-4)
