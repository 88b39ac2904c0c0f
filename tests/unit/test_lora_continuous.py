"""Adapters in the continuous Denoiser: mixed adapter sets join one running batch (and load before
they join, off the step thread); the one-group baseline never mixes them; both give each request
the latents it gets alone; an unknown adapter fails its request alone."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from serve.errors import InvalidRequestError
from serve.lora import runtime as lora_runtime
from serve.stages import Conditioning, DenoiseJob, Denoiser, TextEncoder
from serve.stages.continuous import ContinuousDenoiser
from tests.lora_helpers import write_adapters


@pytest.fixture(scope="module")
def parts(tiny_model, tmp_path_factory):
    folder = write_adapters(tiny_model, tmp_path_factory.mktemp("cont-loras"), names=("ink", "oil", "chalk"))
    encoder = TextEncoder.load(tiny_model, device="cpu")
    return encoder, Denoiser.load(tiny_model, device="cpu", loras=str(folder))


def job(encoder, seed, loras=(), steps=6) -> DenoiseJob:
    pos, neg = encoder.encode([f"prompt {seed}", ""])
    return DenoiseJob(
        conditioning=Conditioning(pos, neg),
        cfg_scale=7.5,
        seed=seed,
        num_inference_steps=steps,
        guidance_scale=7.5,
        width=64,
        height=64,
        loras=tuple(loras),
    )


def _run(loop: ContinuousDenoiser, jobs: list[DenoiseJob], together: bool = False):
    """Submit ``jobs`` at once. ``together``: they join the loop only when all are admitted-ready
    (their adapters pinned), so which requests share a step does not depend on how long each
    adapter load took on this machine."""
    if together:
        held: list = []
        enqueue = loop._enqueue

        def gate(entry) -> None:
            held.append(entry)
            if len(held) == len(jobs):
                for e in held:
                    enqueue(e)

        loop._enqueue = gate

    async def main():
        return await asyncio.gather(*(loop.submit(j) for j in jobs), return_exceptions=True)

    return asyncio.run(main())


SETS = [(("ink", 1.0),), (("oil", 0.7),), (), (("chalk", -1.0), ("ink", 0.5))]


def test_mixed_sets_share_the_batch_and_match_solo_runs(parts):
    encoder, denoiser = parts
    jobs = [job(encoder, 10 + i, s) for i, s in enumerate(SETS)]
    solo = [denoiser.denoise([j])[0] for j in jobs]
    loop = ContinuousDenoiser(denoiser, max_requests=8)
    results = _run(loop, jobs, together=True)
    assert loop.peak_requests == 4 and max(r.batch_size for r in results) == 4
    for got, want in zip(results, solo, strict=True):
        np.testing.assert_allclose(got.value, want, atol=1e-4)
    assert any(r.extra.get("lora_misses", 0) + r.extra.get("lora_hits", 0) for r in results)


def test_one_group_baseline_never_mixes_adapter_sets(parts):
    encoder, denoiser = parts
    jobs = [job(encoder, 20 + i, SETS[i % 2]) for i in range(4)]  # two sets, two requests each
    solo = [denoiser.denoise([j])[0] for j in jobs]
    loop = ContinuousDenoiser(denoiser, max_requests=8, lora_batching="one_group")
    results = _run(loop, jobs, together=True)
    assert loop.peak_requests == 2  # a batch held one set's two requests, never all four
    assert [r.batch_size for r in results] == [2, 2, 2, 2]
    for got, want in zip(results, solo, strict=True):
        np.testing.assert_allclose(got.value, want, atol=1e-4)


def test_an_unknown_adapter_fails_its_request_alone(parts):
    encoder, denoiser = parts
    loop = ContinuousDenoiser(denoiser, max_requests=8, step_delay_s=0.02)
    good, bad = job(encoder, 30, (("ink", 1.0),)), job(encoder, 31, (("nosuch", 1.0),))
    results = _run(loop, [good, bad])
    assert isinstance(results[1], InvalidRequestError) and results[1].field == "loras[0].name"
    np.testing.assert_allclose(results[0].value, denoiser.denoise([good])[0], atol=1e-4)


def test_concurrent_first_loads_hook_each_layer_once(tiny_model, parts):
    """Requests arriving together load their adapters in parallel threads: every layer still gets
    exactly one hook (twice would apply every update twice), and the latents equal a fresh replica's."""
    encoder, reference = parts
    fresh = Denoiser.load(tiny_model, device="cpu", loras=reference.lora_repository)
    jobs = [job(encoder, 40 + i, s) for i, s in enumerate(SETS)]
    # One first load per distinct adapter (a second request for one waits for the first's copy).
    barrier = threading.Barrier(len({n for s in SETS for n, _ in s}))
    original = fresh.lora._install

    def install_together(adapter):  # every first load reaches the hook installation at once
        try:
            barrier.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass
        original(adapter)

    fresh.lora._install = install_together
    results = _run(ContinuousDenoiser(fresh, max_requests=8, step_delay_s=0.02), jobs)
    assert not barrier.broken
    hooked = [m for m in fresh.engine.module.model.modules() if m._forward_hooks]
    assert hooked and all(len(m._forward_hooks) == 1 for m in hooked)
    for r, j in zip(results, jobs, strict=True):
        np.testing.assert_allclose(r.value, reference.denoise([j])[0], atol=1e-4)


def test_a_slow_adapter_load_never_blocks_steps_of_other_requests(tiny_model, parts, monkeypatch):
    """While one request's adapter is loading (held on purpose until the other is done), a request
    without it runs every one of its steps; then the first joins and both equal their solo runs."""
    encoder, reference = parts
    fresh = Denoiser.load(tiny_model, device="cpu", loras=reference.lora_repository)
    loading, release = threading.Event(), threading.Event()
    real_load = lora_runtime.load_adapter

    def held_load(*args, **kwargs):
        loading.set()
        release.wait(timeout=60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(lora_runtime, "load_adapter", held_load)
    styled, plain = job(encoder, 50, (("ink", 1.0),)), job(encoder, 51)
    loop = ContinuousDenoiser(fresh, max_requests=8, step_delay_s=0.02)

    async def main():
        first = asyncio.ensure_future(loop.submit(styled))
        assert await asyncio.to_thread(loading.wait, 30), "the adapter load never started"
        try:
            # Every step of the plain request runs while the load is held: a step waiting for
            # the load would wait for this very await, and time out.
            done_plain = await asyncio.wait_for(loop.submit(plain), timeout=60)
            assert not release.is_set() and loop.steps >= plain.num_inference_steps
        finally:
            release.set()
        return done_plain, await asyncio.wait_for(first, timeout=60)

    done_plain, done_styled = asyncio.run(main())
    assert done_plain.batch_size == 1  # the styled request had not joined: it was still loading
    np.testing.assert_allclose(done_plain.value, reference.denoise([plain])[0], atol=1e-4)
    np.testing.assert_allclose(done_styled.value, reference.denoise([styled])[0], atol=1e-4)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_cancelled_request_keeps_its_adapters_pinned_until_its_running_step_ends(parts, monkeypatch, streamed):
    """A client that leaves mid-step (plain call cancelled, or stream closed) must not unpin its
    adapters while the step that uses them still runs: an eviction for another request's load
    would pull them out from under it. They are unpinned when the loop drops the request."""
    encoder, denoiser = parts
    cache = denoiser.lora.cache
    in_step, go = threading.Event(), threading.Event()
    real_step, calls = denoiser.step, []

    def gated_step(states):
        calls.append(len(states))
        if len(calls) == 2:  # the second step: hold it while the client leaves
            in_step.set()
            assert go.wait(timeout=60), "the test never let the step finish"
        return real_step(states)

    monkeypatch.setattr(denoiser, "step", gated_step)
    loop = ContinuousDenoiser(denoiser, max_requests=8)
    styled = job(encoder, 60, (("oil", 1.0),), steps=6)

    async def consume():
        if not streamed:
            return await loop.submit(styled)
        async for _ in loop.stream(styled):
            pass

    async def main():
        task = asyncio.ensure_future(consume())
        assert await asyncio.to_thread(in_step.wait, 30), "the second step never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pinned_during_step = cache._pins.get("oil", 0)
        go.set()
        for _ in range(3000):  # the loop drops it after the held step (bounded: ~30 s at most)
            if cache._pins.get("oil", 0) == 0:
                break
            await asyncio.sleep(0.01)
        return pinned_during_step, cache._pins.get("oil", 0)

    during, after = asyncio.run(main())
    assert during == 1 and after == 0
    assert loop.in_flight == 0 and len(calls) == 2  # dropped before a third step
