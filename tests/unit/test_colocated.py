"""The colocated profile without Ray: every stage in one process over one model thread.

Same images as the split stages and as diffusers (seed contract), concurrent requests batched
together, the batch policy as a pure function, and the model thread handed over between steps.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import numpy as np
import pytest

from serve.api import parse_generation_request
from serve.api.local_stages import LocalStages
from serve.api.service import ImageService, ServiceConfig
from serve.imageio import decode_image
from serve.model import read_model_info
from serve.pipeline import Pipeline
from serve.stages import Decoder, Denoiser, TextEncoder
from serve.stages.batching import BatchPolicy, BatchQueue, ModelThread, batch_to_start
from serve.stages.colocated import ColocatedOptions, ColocatedStages
from serve.storage import open_store
from tests.conftest import max_level_diff

# -- the batch policy: a pure function of (queued, oldest wait, busy) -----------------------------


def test_batch_to_start_policy():
    p = BatchPolicy(max_batch_size=8, batch_wait_timeout_s=0.01)
    assert batch_to_start(0, 1.0, False, p) == 0  # nothing queued
    assert batch_to_start(3, 0.004, False, p) == 0  # waits for more
    assert batch_to_start(3, 0.012, False, p) == 3  # the wait ran out
    assert batch_to_start(11, 0.0, False, p) == 8  # a full batch goes at once
    assert batch_to_start(11, 5.0, True, p) == 0  # never while a batch runs
    assert batch_to_start(1, 0.0, False, BatchPolicy(4)) == 1  # wait 0: start at once
    with pytest.raises(ValueError):
        BatchPolicy(0)
    with pytest.raises(ValueError):
        BatchPolicy(1, -1.0)


def test_batch_queue_gathers_arrivals_during_a_batch_and_drops_cancelled():
    gate = threading.Event()
    calls: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        calls.append(list(items))
        if items == [0]:
            gate.wait(10)  # the first batch runs until the others are queued
        if -1 in items:
            raise ValueError("bad item")
        return [i * 10 for i in items]

    reports: list[tuple[int, int]] = []

    async def main():
        q = BatchQueue(fn, BatchPolicy(4), report=lambda waiting, running: reports.append((waiting, running)))
        first = asyncio.create_task(q.submit(0))
        while not calls:
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(q.submit(i)) for i in (1, 2, 3, 4, 5)]
        cancelled = asyncio.create_task(q.submit(6))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        gate.set()
        results = await asyncio.gather(first, *rest)
        with pytest.raises(ValueError, match="bad item"):
            await q.submit(-1)
        return results, q

    results, q = asyncio.run(main())
    assert results == [0, 10, 20, 30, 40, 50]
    # Arrivals during the first batch rode the next ones, at most 4 per call; 6 never ran.
    assert calls[:3] == [[0], [1, 2, 3, 4], [5]] and all(6 not in c for c in calls)
    assert q.batches == 4
    # The gauges' feed: 6 waiting behind the first batch of 1, then batches of 4 and 1; idle at the end.
    assert (6, 1) in reports and (2, 4) in reports and reports[-1] == (0, 0)


def test_model_thread_counts_waiting_calls():
    thread = ModelThread()
    gate = threading.Event()
    running = thread.submit(gate.wait, 10)
    deadline = time.monotonic() + 10
    while thread.queued:  # the first call has started: it no longer counts
        assert time.monotonic() < deadline
        time.sleep(0.001)
    waiting = thread.submit(lambda: threading.current_thread().name)
    assert thread.queued == 1
    gate.set()
    assert running.result(10) is True and waiting.result(10).startswith("darkroom-model")
    assert thread.queued == 0
    thread.shutdown()


# -- the stages in one process ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tiny_model):
    return (
        TextEncoder.load(tiny_model, device="cpu"),
        Denoiser.load(tiny_model, device="cpu"),
        Decoder.load(tiny_model, device="cpu"),
    )


def _service(tiny_model, stages, store) -> ImageService:
    return ImageService(ServiceConfig(model_name="tiny"), read_model_info(tiny_model), stages, store)


def _images(out: dict) -> np.ndarray:
    return np.stack([decode_image(im.data) for im in out])


BODIES = [
    {"prompt": "a small boat", "seed": 4, "num_inference_steps": 5, "n": 2, "size": "48x64"},
    {"prompt": "a red fox", "seed": 9, "num_inference_steps": 7, "scheduler": "euler_a", "negative_prompt": "fog"},
    {"prompt": "a castle", "seed": 1, "num_inference_steps": 4, "guidance_scale": 1.0},
    {"prompt": "a lighthouse", "seed": 2, "num_inference_steps": 6, "scheduler": "dpmpp_2m"},
]


def test_colocated_images_equal_split_stages_and_diffusers(tiny_model, parts, reference, tmp_path):
    """Concurrent requests through the colocated stages: the images the split stages make for the
    same seeds (LocalStages: one request at a time), and diffusers' within the contract."""
    store = open_store(str(tmp_path))
    # 20 ms per step (test hook): the requests certainly overlap in the Denoiser.
    colocated = ColocatedStages.from_stages(*parts, store, ColocatedOptions(step_delay_s=0.02))
    split = LocalStages(Pipeline(*parts), store)

    async def run(stages, bodies):
        service = _service(tiny_model, stages, store)
        outs = []
        for body in bodies:
            request, params = service.parse({**body, "response_format": "b64_json"})
            outs.append(service.run(request, params))
        return await asyncio.gather(*outs)

    got = asyncio.run(run(colocated, BODIES))
    want = asyncio.run(run(split, BODIES))
    assert colocated.denoise_loop.peak_requests >= 2  # they shared denoiser steps
    for (images, timings), (ref_images, _), body in zip(got, want, BODIES, strict=True):
        a, b = _images(images), _images(ref_images)
        assert max_level_diff(a, b) <= 3  # the same images as the split stages...
        params = parse_generation_request(body).to_params(default_size=(64, 64))
        assert max_level_diff(a, reference(params)) <= 3  # ...and as diffusers
        assert timings["denoise"] > 0 and timings["decode"] > 0
    assert asyncio.run(colocated.ready()) == {"TextEncoder": "ok", "Denoiser": "ok", "Decoder": "ok"}
    colocated.close()


def test_finished_requests_are_decoded_in_the_step_loop(tiny_model, parts, tmp_path):
    """A request's VAE pass runs in the stretch of the step loop that finished it: its ``decode``
    never queues for the model thread again, and requests finishing together share one pass."""
    store = open_store(str(tmp_path))
    stages = ColocatedStages.from_stages(*parts, store, ColocatedOptions())
    service = _service(tiny_model, stages, store)
    queued: list[int] = []

    async def main():
        await stages._stages()  # the queues exist once the stages are up
        submit = stages._vae_queue.submit

        async def counting(item):
            queued.append(1)
            return await submit(item)

        stages._vae_queue.submit = counting
        bodies = [{"prompt": f"kite {i}", "seed": i, "num_inference_steps": 4} for i in range(3)]
        parsed = [service.parse({**b, "response_format": "b64_json"}) for b in bodies]
        # Their prompts cached: all three reach the Denoiser before its loop first runs, join
        # the same step and finish in the same stretch.
        await stages.encode([f"kite {i}" for i in range(3)] + [""])
        return await asyncio.gather(*(service.run(r, p) for r, p in parsed))

    try:
        outs = asyncio.run(main())
    finally:
        stages.close()
    assert queued == []  # no decode went back to the VAE queue
    assert stages._decoded == {}  # every decoded answer was taken
    for images, timings in outs:
        assert len(images) == 1 and timings["decode"] > 0
    assert stages.denoise_loop.peak_requests == 3
    assert stages._vae_queue.batches == 0


def test_loaded_stages_are_taken_without_a_hop_through_the_event_loop(parts, tmp_path, monkeypatch):
    """Every stage call asks for the stages: once they are loaded, the answer is at hand, not a
    ``wrap_future`` of the load (a call_soon_threadsafe and an extra loop iteration each time)."""
    stages = ColocatedStages.from_stages(*parts, open_store(str(tmp_path)))
    wrapped: list[int] = []
    real = asyncio.wrap_future
    monkeypatch.setattr(asyncio, "wrap_future", lambda f, **kw: wrapped.append(1) or real(f, **kw))

    async def main():
        first = await stages._stages()
        return first, [await stages._stages() for _ in range(3)]

    try:
        first, again = asyncio.run(main())
    finally:
        stages.close()
    assert wrapped == [1]  # the first call waited for the load; the others did not
    assert all(a == first for a in again) and first == tuple(parts)


def test_the_vae_pass_in_the_step_loop_is_not_reported_as_waiting(tiny_model, parts, tmp_path):
    """The VAE pass that runs in the step loop before ``denoise`` returns is the request's decode
    time: its timings do not count it again as ``denoise_queue``."""
    store = open_store(str(tmp_path))
    stages = ColocatedStages.from_stages(*parts, store, ColocatedOptions())
    service = _service(tiny_model, stages, store)
    vae = stages._vae

    def slow_vae(batch):
        time.sleep(2.0)  # far longer than any hop between threads
        return vae(batch)

    stages._vae = slow_vae

    async def main():
        request, params = service.parse({"prompt": "a kite", "seed": 1, "num_inference_steps": 2})
        return await service.run(request, params)

    try:
        _, timings = asyncio.run(main())
    finally:
        stages.close()
    assert timings["denoise_queue"] < 2000 <= timings["total"]


def test_colocated_stages_load_in_the_background_and_report_loading(parts, tmp_path):
    gate = threading.Event()

    def load():
        gate.wait(30)
        return parts

    stages = ColocatedStages(load, open_store(str(tmp_path)))

    async def main():
        assert await stages.ready() == dict.fromkeys(("TextEncoder", "Denoiser", "Decoder"), "loading")
        pending = asyncio.create_task(stages.encode(["a kite"]))  # waits for the load
        await asyncio.sleep(0.05)
        assert not pending.done()
        gate.set()
        result = await asyncio.wait_for(pending, 30)
        assert result.value[0]["encoder_hidden_states"].shape[0] == 77
        again = await stages.encode(["a kite"])  # cached: answered without the model thread
        assert again.compute_s == 0.0
        with pytest.raises(TypeError):
            await stages.encode([])
        return await stages.ready()

    assert asyncio.run(main()) == dict.fromkeys(("TextEncoder", "Denoiser", "Decoder"), "ok")
    stages.close()


def test_failed_load_is_reported_not_hung(tmp_path):
    def load():
        raise RuntimeError("no weights here")

    stages = ColocatedStages(load, open_store(str(tmp_path)))

    async def main():
        with pytest.raises(RuntimeError, match="no weights"):
            await asyncio.wait_for(stages.encode(["x"]), 10)
        return await stages.ready()

    ready = asyncio.run(main())
    assert all(v.startswith("unavailable") and "no weights" in v for v in ready.values())


def test_encoder_waiting_interrupts_the_step_loop(parts, tmp_path):
    """A new prompt waits for the model thread one denoiser step, not a whole request's steps."""
    encoder, denoiser, decoder = parts
    # 50 ms per step (test hook): the 40-step request lasts >= 2 s on any machine.
    options = ColocatedOptions(step_delay_s=0.05)
    stages = ColocatedStages.from_stages(encoder, denoiser, decoder, open_store(str(tmp_path)), options)
    service = ImageService(ServiceConfig(model_name="tiny"), encoder.info, stages, stages.store)

    async def main():
        request, params = service.parse({"prompt": "slow one", "seed": 3, "num_inference_steps": 40})
        calls = denoiser.model_calls
        long = asyncio.create_task(service.run(request, params))
        deadline = time.monotonic() + 60
        while denoiser.model_calls == calls:  # the long request is denoising
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        await stages.encode([f"a prompt never seen {time.time()}"])
        steps_before_encode = denoiser.model_calls - calls
        await long
        return steps_before_encode, denoiser.model_calls - calls

    before, total = asyncio.run(main())
    # Without the hand-over the encoder would run only after all of them (PNDM: 41 UNet calls).
    assert total >= 40 and before < total // 2, (before, total)
    stages.close()


def test_colocated_decode_checks_keys_once_and_records_each_stage(tiny_model, parts, tmp_path):
    """The colocated path keeps the split Decoder's contract: once-only keys from the result id,
    the safety check withholding flagged images, and metrics under each stage's own name."""
    from serve.metrics import RecordingMetrics
    from serve.safety import ImageSafetyChecker
    from serve.stages.messages import DecodeRequest
    from serve.tiny.safety import write_tiny_safety_checker

    encoder, denoiser, _ = parts
    decoder = Decoder.load(tiny_model, device="cpu")  # its own: the test sets its safety checker
    storage = tmp_path / "store"
    metrics = RecordingMetrics("Ingress")
    stages = ColocatedStages.from_stages(encoder, denoiser, decoder, open_store(str(storage)), metrics=metrics)
    service = _service(tiny_model, stages, stages.store)
    c = decoder.info.latent_channels
    latents = np.random.default_rng(0).standard_normal((2, c, 8, 8)).astype(np.float32)
    req = DecodeRequest("png", {"created": 1_700_000_000}, inline=False, result_id="abc123")

    async def main():
        request, params = service.parse({"prompt": "a metered kite", "seed": 5, "num_inference_steps": 3})
        await service.run(request, params)
        first = await stages.decode(latents, req)
        second = await stages.decode(latents, req)  # a retry: the same keys, nothing stored twice
        decoder.safety = ImageSafetyChecker.load(write_tiny_safety_checker(tmp_path / "all", "flag-all"))
        withheld = await stages.decode(latents, DecodeRequest("png", {}, inline=False, result_id="def456"))
        return first, second, withheld

    first, second, withheld = asyncio.run(main())
    keys = [im.key for im in first.value]
    assert keys == [im.key for im in second.value]
    assert keys == ["images/2023/11/14/abc123-0.png", "images/2023/11/14/abc123-1.png"]
    assert all(im.withheld and not im.key for im in withheld.value) and len(withheld.value) == 2
    assert len(list((storage / "images").rglob("*.png"))) == 3  # the request's image and abc123's two
    assert metrics.value("darkroom_images_total", stage="Decoder", status="withheld") == 2
    assert metrics.value("darkroom_policy_blocks_total", stage="Decoder", check="image") == 2
    assert len(metrics.samples("darkroom_batch_size", stage="Decoder")) == 4  # one VAE pass per call
    assert metrics.value("darkroom_denoise_steps_total", stage="Denoiser") >= 3
    assert metrics.value("darkroom_prompt_cache_total", stage="TextEncoder", result="miss") >= 1
    assert metrics.value("darkroom_denoise_steps_total", stage="Ingress") == 0  # nothing under the wrong stage
    # Every stage's own queue feeds its gauges (idle again now).
    for stage in ("TextEncoder", "Decoder"):
        assert metrics.value("darkroom_queue_length", stage=stage) == 0
        assert metrics.value("darkroom_inflight_requests", stage=stage) == 0
    set_series = {key for key in metrics._values if key[0] in ("darkroom_queue_length", "darkroom_inflight_requests")}
    assert {dict(labels)["stage"] for _, labels in set_series} >= {"TextEncoder", "Decoder", "Denoiser"}
    stages.close()


def test_colocated_stages_stream_partial_images_and_the_same_final_image(tiny_model, parts, tmp_path):
    """The colocated profile streams (partial images drawn in its step loop, the preview map fitted
    on its model thread), and the streamed image is the one a plain request gets."""
    from fastapi.testclient import TestClient

    from serve.api.http import create_app
    from tests.sse import parse_events

    store = open_store(str(tmp_path))
    stages = ColocatedStages.from_stages(*parts, store, ColocatedOptions())
    body = {"prompt": "a windmill", "seed": 5, "num_inference_steps": 6, "response_format": "b64_json"}
    try:
        with TestClient(create_app(_service(tiny_model, stages, store))) as client:
            plain = client.post("/v1/images/generations", json=body)
            assert plain.status_code == 200, plain.text
            with client.stream(
                "POST", "/v1/images/generations", json={**body, "stream": True, "partial_images": 2}
            ) as r:
                assert r.status_code == 200
                events = list(parse_events(r.iter_lines()))
    finally:
        stages.close()
    names = [name for name, _ in events]
    assert names == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    streamed = decode_image(base64.b64decode(events[-1][1]["b64_json"]))
    assert max_level_diff(streamed, decode_image(base64.b64decode(plain.json()["data"][0]["b64_json"]))) <= 3
