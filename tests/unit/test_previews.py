"""Partial images: the schedule, the x0 estimates, the latent -> RGB fit, the event channel, and
the continuous loop's streams (progress, previews, the result equal to a plain run, cancellation)."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch

from serve.families import family_of
from serve.families.preview import PreviewFit, fit_latent_rgb, fit_plan, latent_rgb
from serve.model import read_model_info
from serve.schedulers import make_scheduler, step_kwargs
from serve.stages import Decoder, DenoiseJob, DenoiseProgress, Denoiser, StageResult, TextEncoder
from serve.stages.continuous import ContinuousDenoiser
from serve.stages.progress import EventChannel, preview_iterations, scaled_step, should_emit
from tests.unit.test_continuous import job


@pytest.mark.parametrize(
    ("iterations", "k", "want"),
    [(20, 3, (5, 10, 15)), (20, 1, (10,)), (20, 0, ()), (4, 3, (1, 2, 3)), (2, 3, (1,)), (1, 3, ()), (9, 3, (2, 5, 7))],
)
def test_partial_images_are_evenly_spaced_and_never_the_final_step(iterations, k, want):
    assert preview_iterations(iterations, k) == want


def test_steps_scale_to_num_inference_steps():
    # Heun runs 2 * 10 - 1 iterations for 10 steps: the last iteration is step 10, half-way is 5.
    assert scaled_step(19, 19, 10) == 10 and scaled_step(10, 19, 10) == 5 and scaled_step(0, 19, 10) == 0
    assert scaled_step(7, 7, 7) == 7


def test_progress_throttle_is_a_policy_of_the_clock():
    assert should_emit(None, 5.0) and should_emit(1.0, 1.1, 0.1) and not should_emit(1.0, 1.05, 0.1)


def test_fit_recovers_a_linear_vae(tiny_model):
    """A 'VAE' that is exactly linear per latent pixel (then upsampled) is recovered to float error."""
    family = family_of(read_model_info(tiny_model))
    true = np.array([[0.2, -0.1, 0.05], [0.0, 0.3, -0.2], [-0.15, 0.1, 0.25], [0.1, 0.1, 0.1], [0.5, 0.45, 0.55]])
    f = family.info.vae_scale_factor

    def linear_vae(vae_latents: torch.Tensor) -> torch.Tensor:
        z = vae_latents * family.info.vae_scaling_factor  # undo vae_input: the map is on final latents
        rgb = torch.einsum("nchw,ck->nkhw", z, torch.tensor(true[:4], dtype=torch.float32)) + torch.tensor(
            true[4], dtype=torch.float32
        ).view(1, 3, 1, 1)
        return (rgb * 2 - 1).repeat_interleave(f, 2).repeat_interleave(f, 3)

    fitted = fit_latent_rgb(family, linear_vae)
    np.testing.assert_allclose(fitted, true, atol=1e-4)
    samples, side = fit_plan(family.info.native_size, f)
    assert samples * side * side >= 1024


def test_latent_rgb_rounds_and_clamps_like_the_decoder():
    m = np.zeros((2, 3), np.float32)
    m[0] = [1.0, 0.5, -1.0]
    latents = torch.tensor([[[[0.0, 0.5], [1.0, 2.0]]]])
    px = latent_rgb(latents, m)
    assert px.shape == (1, 2, 2, 3) and px.dtype == np.uint8
    assert px[0, 0, 1].tolist() == [128, 64, 0] and px[0, 1, 1].tolist() == [255, 255, 0]
    with pytest.raises(ValueError, match="preview map"):
        latent_rgb(latents, np.zeros((5, 3)))


def test_preview_fit_is_the_least_squares_of_its_rows():
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(3, 4, 5, 5))
    true = rng.normal(size=(5, 3))
    rgb = np.einsum("nchw,ck->nhwk", latents, true[:4]) + true[4]
    fit = PreviewFit(4)
    fit.add(latents[:1], rgb[:1])
    fit.add(latents[1:], rgb[1:])
    assert fit.rows == 75
    np.testing.assert_allclose(fit.solve(), true, atol=1e-4)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "lms"])
def test_x0_estimate_is_the_schedulers_own(tiny_model, name):
    """Schedulers that report pred_original_sample agree with Family.denoised, for DDPM-space
    (DDIM) and sigma-space (Euler, LMS) latents alike: the formula every other scheduler gets."""
    info = read_model_info(tiny_model)
    family = family_of(info)
    scheduler = make_scheduler(name, info.scheduler_config, info.scheduler_class, family.schedulers)
    scheduler.set_timesteps(10)
    gen = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps[:6]):
        x = scheduler.scale_model_input(latents, t)
        eps = torch.randn(latents.shape, generator=gen)
        ours = family.denoised(scheduler, x, eps, t)
        if scheduler.config.get("clip_sample"):  # DDIM clips its x0 (SD's config says so); previews need not
            ours = ours.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
        out = scheduler.step(eps, t, latents, **step_kwargs(scheduler, torch.Generator("cpu").manual_seed(i)))
        np.testing.assert_allclose(ours.numpy(), out.pred_original_sample.numpy(), rtol=1e-3, atol=1e-3)
        latents = out.prev_sample


def test_flux_x0_estimate_inverts_flow_matching(tiny_flux):
    info = read_model_info(tiny_flux)
    family = family_of(info)
    scheduler = family.new_scheduler(None)
    x0, noise = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    for t in (torch.tensor(900.0), torch.tensor(450.0), torch.tensor(30.0)):
        sigma = float(t) / scheduler.config.num_train_timesteps
        xt = (1 - sigma) * x0 + sigma * noise
        np.testing.assert_allclose(family.denoised(scheduler, xt, noise - x0, t).numpy(), x0.numpy(), atol=1e-5)


def test_channel_coalesces_progress_but_keeps_previews_and_ends_with_the_result():
    async def main():
        loop = asyncio.get_running_loop()
        channel = EventChannel(loop, interval=0.0)
        preview = np.zeros((1, 2, 2, 3), np.uint8)
        for step in (1, 2, 3):
            channel.push(DenoiseProgress(step, 10))
        channel.push(DenoiseProgress(4, 10, preview, 0))
        channel.push(DenoiseProgress(5, 10))
        channel.push(DenoiseProgress(6, 10))
        await asyncio.sleep(0)  # the pushes land (call_soon_threadsafe)
        channel.finish(StageResult("latents", 1.0))
        return [item async for item in channel]

    items = asyncio.run(main())
    assert [getattr(i, "step", None) for i in items] == [3, 4, 6, None]
    assert items[1].preview is not None and items[-1].value == "latents"


# --- the Denoiser and its continuous loop, streamed -------------------------------------------


@pytest.fixture(scope="module")
def parts(tiny_model):
    return (
        TextEncoder.load(tiny_model, device="cpu"),
        Denoiser.load(tiny_model, device="cpu"),
        Decoder.load(tiny_model, device="cpu"),
    )


def make_job(encoder, seed, steps=8, **kw) -> DenoiseJob:
    return job(encoder, seed, steps=steps, **kw)


def test_streamed_job_gets_progress_previews_and_the_plain_result(parts):
    encoder, denoiser, decoder = parts
    preview_map = decoder.preview_map()
    assert preview_map.shape == (5, 3)
    plain = make_job(encoder, 3, n=2)
    streamed = dataclasses.replace(plain, partial_images=3, preview_map=preview_map, progress=True)
    want = denoiser.denoise([plain])[0]
    loop = ContinuousDenoiser(denoiser, max_requests=8, step_delay_s=0.12)  # slow: every step is seen

    async def main():
        quiet = [item async for item in loop.stream(dataclasses.replace(streamed, progress=False))]
        return quiet, [item async for item in loop.stream(streamed)]

    quiet, items = asyncio.run(main())
    # Without progress the stream carries just the partial images and the result.
    assert [getattr(i, "partial_index", "result") for i in quiet] == [0, 1, 2, "result"]
    result = items[-1]
    assert isinstance(result, StageResult)
    np.testing.assert_allclose(result.value, want, rtol=1e-5, atol=1e-4)  # previews change nothing (float32 roundoff)
    progress = items[:-1]
    assert progress[0].step == 0 and progress[0].total_steps == 8  # admitted
    steps = [p.step for p in progress]
    assert steps == sorted(steps) and steps[-1] <= 8
    previews = [p for p in progress if p.preview is not None]
    assert [p.partial_index for p in previews] == [0, 1, 2]
    assert all(p.preview.shape == (2, 8, 8, 3) and p.preview.dtype == np.uint8 for p in previews)
    assert not np.array_equal(previews[0].preview, previews[-1].preview)  # it develops


def test_a_closed_stream_leaves_the_batch_within_one_step(parts):
    encoder, denoiser, _ = parts
    loop = ContinuousDenoiser(denoiser, max_requests=8, step_delay_s=0.05)

    async def main():
        stream = loop.stream(make_job(encoder, 4, steps=100, progress=True))
        async for item in stream:
            if item.step >= 2:
                break
        await stream.aclose()
        deadline = asyncio.get_running_loop().time() + 30
        while loop.in_flight:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        return await loop.submit(make_job(encoder, 5, steps=2))

    quick = asyncio.run(main())
    assert quick.value.shape == (1, 4, 8, 8)
    stats = loop.stats()
    assert stats["max_cancel_lag_steps"] <= 1 and stats["in_flight"] == 0
    assert stats["steps"] < 20  # the closed 100-step job stopped where it was


@pytest.mark.parametrize("fixture", ["tiny_sdxl", "tiny_flux"])
def test_every_family_draws_partial_images_and_keeps_its_final_latents(fixture, request):
    """SDXL's and Flux's previews through their own hooks (Flux unpacks its 2x2 patches first)."""
    from serve.params import GenerationParams
    from serve.pipeline import Pipeline

    pipe = Pipeline.load(request.getfixturevalue(fixture), device="cpu")
    family, decoder = pipe.family, pipe.decoder
    params = GenerationParams(
        prompt="a red boat",
        negative_prompt=None,
        width=64,
        height=48 if family.name == "sdxl" else 32,
        num_inference_steps=6,
        guidance_scale=family.default_guidance,
        seed=5,
        n=2,
        scheduler=None,
        output_format="png",
    )
    plan = family.plan(params)
    job = plan.denoise_job(pipe.text_encoder.encode_requests([plan.texts])[0].value)
    want = pipe.denoiser.denoise([job])[0]
    streamed = dataclasses.replace(job, partial_images=2, preview_map=decoder.preview_map(), progress=True)
    seen = []
    got = pipe.denoiser.denoise([streamed], on_step=lambda i, p: seen.append(p))[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # float32 roundoff
    previews = [p for p in seen if p.preview is not None]
    assert [p.partial_index for p in previews] == [0, 1]
    f = family.info.vae_scale_factor
    assert all(p.preview.shape == (2, params.height // f, params.width // f, 3) for p in previews)
    assert [p.step for p in seen][-1] == 6
