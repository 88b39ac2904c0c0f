"""Stage behaviour beyond parity: caching, validation, scheduler registry, image encoding."""

from __future__ import annotations

import numpy as np
import pytest

from serve.errors import InvalidRequestError
from serve.imageio import decode_image, encode_image
from serve.params import SCHEDULER_NAMES
from serve.schedulers import FLOW_SCHEDULERS, UNET_SCHEDULERS, make_scheduler, scheduler_class, scheduler_name
from serve.stages import Conditioning, DenoiseJob, Denoiser, TextEncoder


def test_scheduler_registry_matches_contract():
    # DESIGN.md's names, in its order; Flux's flow-matching "euler" adds no new name.
    assert SCHEDULER_NAMES == ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "unipc")
    assert tuple(UNET_SCHEDULERS) == SCHEDULER_NAMES and set(FLOW_SCHEDULERS) <= set(SCHEDULER_NAMES)
    for name in SCHEDULER_NAMES:
        assert scheduler_class(name, "PNDMScheduler").__name__ == UNET_SCHEDULERS[name]
        assert scheduler_name(UNET_SCHEDULERS[name]) == name
    assert scheduler_class("euler", "X", FLOW_SCHEDULERS).__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(InvalidRequestError) as err:
        scheduler_class("euler_a", "X", FLOW_SCHEDULERS)
    assert err.value.field == "scheduler"
    with pytest.raises(InvalidRequestError) as err:
        scheduler_class("euler_b", "PNDMScheduler")
    assert err.value.field == "scheduler"


def test_each_request_gets_its_own_scheduler(tiny_model):
    from serve.model import read_model_info

    info = read_model_info(tiny_model)
    a = make_scheduler("dpmpp_2m", info.scheduler_config, info.scheduler_class)
    b = make_scheduler("dpmpp_2m", info.scheduler_config, info.scheduler_class)
    assert a is not b


@pytest.fixture(scope="module")
def encoder(tiny_model) -> TextEncoder:
    return TextEncoder.load(tiny_model, device="cpu")


def _hidden(rows):
    return np.stack([r["encoder_hidden_states"] for r in rows])


def test_text_encoder_batches_and_caches(encoder):
    calls = encoder.calls
    out = _hidden(encoder.encode(["a cat", "a dog", "a cat", ""]))
    assert out.shape == (4, 77, 32)
    assert encoder.calls == calls + 1  # one model call for the whole batch
    np.testing.assert_array_equal(out[0], out[2])
    assert not np.allclose(out[0], out[1])
    again = _hidden(encoder.encode(["a dog", ""]))
    assert encoder.calls == calls + 1  # all cached
    np.testing.assert_array_equal(again[0], out[1])
    encoder.clear_cache()
    cold = _hidden(encoder.encode(["a dog", ""]))
    assert encoder.calls == calls + 2  # cleared: encoded again, to the same rows
    np.testing.assert_array_equal(cold, again)


def test_batched_encoding_equals_single(encoder):
    encoder._cache.clear()
    single = _hidden(encoder.encode(["a tower"]))[0]
    encoder._cache.clear()
    batched = _hidden(encoder.encode(["x", "a tower", "y"]))[1]
    np.testing.assert_allclose(single, batched, atol=1e-5)


@pytest.fixture(scope="module")
def denoiser(tiny_model) -> Denoiser:
    return Denoiser.load(tiny_model, device="cpu")


def _job(encoder, **kw) -> DenoiseJob:
    pos, neg = encoder.encode(["a cat", ""])
    positive = kw.pop("prompt_embeds", pos["encoder_hidden_states"])
    negative = kw.pop("negative_embeds", neg["encoder_hidden_states"])
    base = dict(seed=1, num_inference_steps=2, guidance_scale=7.5, width=64, height=64, n=1)
    base.update(kw)
    cfg = base["guidance_scale"] if base["guidance_scale"] > 1 else None
    conditioning = Conditioning(
        {"encoder_hidden_states": positive}, None if negative is None else {"encoder_hidden_states": negative}
    )
    return DenoiseJob(conditioning=conditioning, cfg_scale=cfg, **base)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(width=60), "width"),
        (dict(height=0), "height"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(n=0), "n"),
        (dict(scheduler="nope"), "scheduler"),
        (dict(negative_embeds=None), "conditioning.negative"),
        (dict(prompt_embeds=np.zeros((10, 32), np.float32)), "conditioning.positive.encoder_hidden_states"),
    ],
)
def test_denoiser_rejects_bad_jobs_by_field(encoder, denoiser, kw, field):
    with pytest.raises(InvalidRequestError) as err:
        denoiser.validate(_job(encoder, **kw))
    assert err.value.field == field


def test_no_negative_needed_without_cfg(encoder, denoiser):
    denoiser.validate(_job(encoder, negative_embeds=None, guidance_scale=1.0))
    (lat,) = denoiser.denoise([_job(encoder, negative_embeds=None, guidance_scale=1.0, width=48)])
    assert lat.shape == (1, 4, 8, 6)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_image_encoding_round_trip(fmt):
    rng = np.random.default_rng(0)
    pixels = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    data = encode_image(pixels, fmt)
    back = decode_image(data)
    assert back.shape == pixels.shape
    if fmt == "png":
        np.testing.assert_array_equal(back, pixels)
    magic = {"png": b"\x89PNG", "jpeg": b"\xff\xd8", "webp": b"RIFF"}[fmt]
    assert data.startswith(magic)
    with pytest.raises(InvalidRequestError):
        encode_image(pixels, "gif")


def test_cancelled_job_leaves_the_batch(encoder, denoiser):
    jobs = [_job(encoder, seed=1, num_inference_steps=8), _job(encoder, seed=2, num_inference_steps=8)]
    c0 = denoiser.model_calls
    alone = denoiser.denoise([jobs[0]])[0]
    c1 = denoiser.model_calls
    out = denoiser.denoise(jobs, cancelled=lambda i: i == 1)
    assert out[1] is None and out[0].shape == (1, 4, 8, 8)
    assert max(denoiser.last_batch_sizes) == 2  # only job 0 (x2 for CFG) ever ran
    assert denoiser.model_calls - c1 == c1 - c0
    np.testing.assert_allclose(out[0], alone, atol=1e-5)
