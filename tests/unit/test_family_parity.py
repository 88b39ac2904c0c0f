"""The seed contract for SDXL and Flux: Darkroom's images equal diffusers' own pipeline classes
(``StableDiffusionXLPipeline``, ``FluxPipeline``) within 3 levels per channel, in-process, through
``darkroom generate`` and on ONNX Runtime after ``darkroom export``. (SD 1.x: test_parity.py.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from export import export_model
from serve.errors import InvalidRequestError
from serve.imageio import decode_image
from serve.pipeline import Pipeline
from serve.schedulers import UNET_SCHEDULERS
from tests.conftest import make_params as params
from tests.conftest import max_level_diff

TOLERANCE = 3
DARKROOM = shutil.which("darkroom") or ""


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl) -> Pipeline:
    return Pipeline.load(tiny_sdxl, device="cpu")


@pytest.fixture(scope="module")
def flux(tiny_flux) -> Pipeline:
    return Pipeline.load(tiny_flux, device="cpu")


@pytest.fixture(scope="module")
def flux_schnell(tiny_flux_schnell) -> Pipeline:
    return Pipeline.load(tiny_flux_schnell, device="cpu")


# -- SDXL ------------------------------------------------------------------------------------------
SDXL_CASES = {
    # force_zeros_for_empty_prompt: no negative prompt -> zero negative conditioning.
    "cfg_no_negative_zeros": dict(num_inference_steps=4),
    "cfg_negative_n2_nonsquare": dict(negative_prompt="blurry, low quality", n=2, width=64, height=48, seed=7),
    "no_cfg_nonsquare": dict(guidance_scale=1.0, width=48, height=72, seed=99),
    "empty_negative_is_encoded": dict(negative_prompt="", seed=3),
}


def test_sdxl_family_is_detected(sdxl):
    assert sdxl.info.family == "sdxl" and sdxl.family.components == (
        "text_encoder",
        "text_encoder_2",
        "unet",
        "vae_decoder",
    )


@pytest.mark.parametrize("case", list(SDXL_CASES))
def test_sdxl_matches_diffusers(sdxl, reference_sdxl, case):
    p = params(**SDXL_CASES[case])
    got = np.stack(sdxl.generate(p).pixels)
    assert got.shape == (p.n, p.height, p.width, 3)
    assert max_level_diff(got, reference_sdxl(p)) <= TOLERANCE


@pytest.mark.parametrize("scheduler", list(UNET_SCHEDULERS))
def test_sdxl_every_scheduler_matches_diffusers(sdxl, reference_sdxl, scheduler):
    p = params(scheduler=scheduler, negative_prompt="blurry", n=2, width=64, height=48, num_inference_steps=4)
    assert max_level_diff(np.stack(sdxl.generate(p).pixels), reference_sdxl(p)) <= TOLERANCE


def test_sdxl_zero_negative_differs_from_encoded_empty_prompt(sdxl):
    """The zeros rule is real: no negative prompt and an explicit "" give different images."""
    zeros = np.stack(sdxl.generate(params(seed=3)).pixels)
    empty = np.stack(sdxl.generate(params(seed=3, negative_prompt="")).pixels)
    assert max_level_diff(zeros, empty) > TOLERANCE


# -- Flux ------------------------------------------------------------------------------------------
FLUX_CASES = {
    "guidance_embed_n2_nonsquare": dict(guidance_scale=3.5, n=2, width=64, height=48),
    "guidance_embed_high": dict(guidance_scale=8.0, seed=7),
    "true_cfg_negative": dict(guidance_scale=3.5, negative_prompt="blurry", true_cfg_scale=4.0, seed=11),
    "own_scheduler_by_name": dict(scheduler="euler", width=48, height=64, seed=99),
}


def test_flux_family_is_detected(flux):
    assert flux.info.family == "flux" and flux.family.denoiser_component == "transformer"
    assert flux.family.guidance_embeds


def _flux_kwargs(p):
    return {"negative_prompt": p.negative_prompt, "true_cfg_scale": p.true_cfg_scale} if p.negative_prompt else {}


@pytest.mark.parametrize("case", list(FLUX_CASES))
def test_flux_matches_diffusers(flux, reference_flux, case):
    p = params(**FLUX_CASES[case])
    got = np.stack(flux.generate(p).pixels)
    assert got.shape == (p.n, p.height, p.width, 3)
    assert max_level_diff(got, reference_flux(p, **_flux_kwargs(p))) <= TOLERANCE


def test_flux_guidance_embedding_changes_the_image(flux):
    low = np.stack(flux.generate(params(guidance_scale=1.5)).pixels)
    high = np.stack(flux.generate(params(guidance_scale=9.0)).pixels)
    assert max_level_diff(low, high) > TOLERANCE


def test_flux_schnell_matches_diffusers(flux_schnell, reference_flux_schnell):
    assert not flux_schnell.family.guidance_embeds
    p = params(n=2, width=64, height=48, num_inference_steps=4)
    assert max_level_diff(np.stack(flux_schnell.generate(p).pixels), reference_flux_schnell(p)) <= TOLERANCE


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(width=56), "size"),  # 16 is Flux's multiple (8x VAE, 2x2 packing)
        (dict(scheduler="euler_a"), "scheduler"),
        (dict(scheduler="dpmpp_2m"), "scheduler"),
        (dict(negative_prompt="blurry"), "negative_prompt"),  # ignored by FluxPipeline without true CFG
        (dict(true_cfg_scale=3.0), "true_cfg_scale"),  # true CFG needs a negative prompt
        (dict(negative_prompt="x", true_cfg_scale=0.5), "true_cfg_scale"),
    ],
)
def test_flux_refuses_what_it_cannot_do_by_field(flux, kw, field):
    with pytest.raises(InvalidRequestError) as err:
        flux.family.plan(params(**kw))
    assert err.value.field == field
    if field == "scheduler":
        assert "euler" in err.value.reason


def test_unet_families_refuse_true_cfg(sdxl):
    with pytest.raises(InvalidRequestError) as err:
        sdxl.family.plan(params(true_cfg_scale=3.0))
    assert err.value.field == "true_cfg_scale"


# -- one denoiser call, many requests ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_one_denoiser_call_holds_mixed_requests(request, family):
    pipe = request.getfixturevalue(family)
    reference = request.getfixturevalue(f"reference_{family}")
    batch = []
    for i in range(6):
        kw = dict(prompt=f"request {i}: a castle on an island", seed=500 + i, num_inference_steps=2 + i, n=1 + i % 2)
        if family == "sdxl":
            kw.update(scheduler=list(UNET_SCHEDULERS)[i], guidance_scale=1.0 if i % 3 == 0 else 4.0 + i)
            kw.update(negative_prompt="blurry" if i % 2 else None, width=64 if i % 4 else 48)
        else:
            kw.update(guidance_scale=2.0 + i, width=64 if i % 4 else 48)
            if i == 3:
                kw.update(negative_prompt="blurry", true_cfg_scale=3.0)
        batch.append(params(**kw))
    results = pipe.generate_batch(batch)
    assert max(pipe.denoiser.last_batch_sizes) > 2  # requests shared denoiser calls
    for p, r in zip(batch, results, strict=True):
        kwargs = _flux_kwargs(p) if family == "flux" else {}
        assert max_level_diff(np.stack(r.pixels), reference(p, **kwargs)) <= TOLERANCE, p


def test_prompt_mix_ups_would_be_caught(sdxl, flux, reference_sdxl, reference_flux):
    for pipe, reference in ((sdxl, reference_sdxl), (flux, reference_flux)):
        got = np.stack(pipe.generate(params(guidance_scale=3.5)).pixels)
        assert max_level_diff(got, reference(params(guidance_scale=3.5, prompt="a dog"))) > TOLERANCE
        assert max_level_diff(got, reference(params(guidance_scale=3.5, seed=1235))) > TOLERANCE


# -- ONNX Runtime after export ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_repos(tiny_sdxl, tiny_flux, tmp_path_factory):
    base = tmp_path_factory.mktemp("family-onnx")
    return {
        "sdxl": export_model(tiny_sdxl, base / "sdxl", batch="1:1:2", size="32:64:96"),
        "flux": export_model(tiny_flux, base / "flux", batch="1:1:2", size="32:64:96"),
    }


@pytest.mark.parametrize(
    ("family", "kw"),
    [
        ("sdxl", dict(negative_prompt="blurry", n=2, width=64, height=48, num_inference_steps=4)),
        ("sdxl", dict(guidance_scale=1.0, scheduler="dpmpp_2m", num_inference_steps=4)),
        ("flux", dict(guidance_scale=3.5, n=2, width=64, height=48, num_inference_steps=4)),
        ("flux", dict(guidance_scale=3.5, negative_prompt="blurry", true_cfg_scale=3.0, num_inference_steps=4)),
    ],
)
def test_onnxruntime_matches_diffusers_after_export(request, onnx_repos, family, kw):
    reference = request.getfixturevalue(f"reference_{family}")
    pipe = Pipeline.load(onnx_repos[family], backend="onnxruntime", device="cpu")
    assert all(e.backend == "onnxruntime" for e in (*pipe.text_encoder.engines.values(), pipe.denoiser.engine))
    p = params(**kw)
    kwargs = _flux_kwargs(p) if family == "flux" else {}
    assert max_level_diff(np.stack(pipe.generate(p).pixels), reference(p, **kwargs)) <= TOLERANCE


# -- darkroom generate ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_generate_cli_matches_diffusers(request, family, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    reference = request.getfixturevalue(f"reference_{family}")
    out = tmp_path / "out.png"
    args = ["generate", "a castle on an island", "--model", model, "--seed", "42", "--steps", "4"]
    args += ["--size", "64x48", "--guidance", "4", "--output", str(out)]
    cmd = [DARKROOM, *args] if DARKROOM else [sys.executable, "-m", "serve.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"({family}," in proc.stderr and "seed: 42" in proc.stdout
    p = params(prompt="a castle on an island", seed=42, num_inference_steps=4, height=48, guidance_scale=4.0)
    assert max_level_diff(decode_image(out.read_bytes())[None], reference(p)) <= TOLERANCE
