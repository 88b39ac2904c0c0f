"""The seed contract with LoRA adapters: each image equals diffusers' pipeline after
``load_lora_weights(file, adapter_name=name)`` + ``set_adapters(names, adapter_weights=scales)``
(within 3 levels), for SD 1.x and SDXL, adapters in diffusers/peft and in kohya key layout: one
adapter, two with different scales, a text-encoder adapter, one touching both components, none.

Through the in-process ``Pipeline`` (every case in ONE batch: requests with different adapters
share each denoiser call) and ``darkroom generate``. The served app: tests/integration/test_lora_app.py.
The random adapters move images by tens of levels, and tests below show a mix-up of adapters or
scales would fail the 3-level check.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from serve.imageio import decode_image
from serve.pipeline import Pipeline
from tests.conftest import make_params, max_level_diff
from tests.lora_helpers import CASES, lora_reference, write_adapters

TOLERANCE = 3
DARKROOM = shutil.which("darkroom") or ""
#: The tiny SDXL amplifies cross-attention (so prompts show): gentler adapters keep it out of the
#: chaotic regime where batch-size rounding (TE rows encoded together, not one by one as diffusers
#: does) grows past 3 levels; they still move its images by ~20 levels on average.
STRENGTH = {"sd": 1.0, "sdxl": 0.4}
FAMILIES = ("sd", "sdxl")
LAYOUTS = ("diffusers", "kohya")


def _case_params(i: int, loras) -> object:
    # Alternate negative prompt / none (SDXL: zeros), and seeds per case.
    return make_params(loras=loras, seed=300 + i, negative_prompt="blurry" if i % 2 else None)


@pytest.fixture(scope="module")
def models(tiny_model, tiny_sdxl):
    return {"sd": tiny_model, "sdxl": tiny_sdxl}


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    """(family, layout) -> a folder of the test adapters, every one in that layout."""
    root = tmp_path_factory.mktemp("loras")
    return {
        (fam, layout): write_adapters(models[fam], root / f"{fam}-{layout}", strength=STRENGTH[fam], layout=layout)
        for fam in FAMILIES
        for layout in LAYOUTS
    }


@pytest.fixture(scope="module")
def references(models, adapters):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    def make(fam, layout):
        if fam == "sd":
            pipe = StableDiffusionPipeline.from_pretrained(models[fam], safety_checker=None)
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(models[fam])
        return lora_reference(pipe, adapters[(fam, layout)])

    cache = {}

    def get(fam, layout):
        if (fam, layout) not in cache:
            cache[(fam, layout)] = make(fam, layout)
        return cache[(fam, layout)]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fam", FAMILIES)
def test_every_case_in_one_batch_matches_diffusers(models, adapters, references, fam, layout):
    pipe = Pipeline.load(models[fam], device="cpu", loras=str(adapters[(fam, layout)]))
    batch = [_case_params(i, loras) for i, loras in enumerate(CASES.values())]
    results = pipe.generate_batch(batch)
    # One denoiser call per step held every request (rows: CFG doubles each).
    assert set(pipe.denoiser.last_batch_sizes) == {2 * len(batch)}
    ref = references(fam, layout)
    diffs = {}
    for name, p, r in zip(CASES, batch, results, strict=True):
        diffs[name] = max_level_diff(np.stack(r.pixels), ref(p))
    assert max(diffs.values()) <= TOLERANCE, diffs
    # The text-encoder adapter was applied by the TextEncoder stage, not the Denoiser.
    assert "wordy" in pipe.text_encoder.lora.held() and "wordy" in pipe.denoiser.lora.held()
    wordy = dict(pipe.text_encoder.lora.cache.snapshot())["wordy"]
    assert wordy.components and not dict(pipe.denoiser.lora.cache.snapshot())["wordy"].components


@pytest.mark.parametrize("fam", FAMILIES)
def test_a_mix_up_of_adapters_or_scales_would_fail(references, fam):
    """The check can fail: swapped scales, a different adapter and no adapter are all > 3 levels off."""
    ref = references(fam, "kohya")
    p = _case_params(1, CASES["two_scales"])
    want = ref(p)
    (a, sa), (b, sb) = p.loras
    assert max_level_diff(want, ref(make_params(**{**p.__dict__, "loras": ((a, sb), (b, sa))}))) > TOLERANCE
    assert max_level_diff(want, ref(make_params(**{**p.__dict__, "loras": ((a, sa),)}))) > TOLERANCE
    assert max_level_diff(want, ref(make_params(**{**p.__dict__, "loras": ()}))) > TOLERANCE
    text = _case_params(2, CASES["text_encoder"])
    assert max_level_diff(ref(text), ref(make_params(**{**text.__dict__, "loras": ()}))) > TOLERANCE


def test_four_adapter_sets_share_one_denoiser_call(models, adapters, references):
    """Four requests, four different adapter sets (and one without): one UNet call per step holds
    them all, and each equals its own reference."""
    sets = [(("ink", 1.0),), (("oil", 0.7),), (("chalk", -1.0),), (("ink", 0.4), ("both", 1.1)), ()]
    pipe = Pipeline.load(models["sd"], device="cpu", loras=str(adapters[("sd", "diffusers")]))
    batch = [make_params(loras=s, seed=40 + i, prompt=f"a tower number {i}") for i, s in enumerate(sets)]
    results = pipe.generate_batch(batch)
    assert set(pipe.denoiser.last_batch_sizes) == {2 * len(sets)}  # every step: one call, all rows
    ref = references("sd", "diffusers")
    for p, r in zip(batch, results, strict=True):
        assert max_level_diff(np.stack(r.pixels), ref(p)) <= TOLERANCE, p.loras


def test_darkroom_generate_with_loras_matches_diffusers(models, adapters, references, tmp_path):
    out = tmp_path / "lora.png"
    folder = adapters[("sdxl", "kohya")]
    args = ["generate", "a castle on an island", "--model", models["sdxl"], "--lora-dir", str(folder)]
    args += ["--lora", "oil:1.0", "--lora", "wordy:-0.8", "--seed", "42", "--steps", "5", "--size", "64x48"]
    args += ["--output", str(out), "--device", "cpu"]
    cmd = [DARKROOM, *args] if DARKROOM else [sys.executable, "-m", "serve.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    p = make_params(
        prompt="a castle on an island",
        seed=42,
        num_inference_steps=5,
        height=48,
        guidance_scale=5.0,
        loras=(("oil", 1.0), ("wordy", -0.8)),
    )
    assert max_level_diff(decode_image(out.read_bytes())[None], references("sdxl", "kohya")(p)) <= TOLERANCE


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora", "ink:9"], "--lora (loras[0].scale): must be at most 4"),
        (["--lora", "nosuch"], "--lora (loras[0].name): no adapter of that name"),
        (["--lora", "ink:x"], "--lora: must be NAME or NAME:SCALE"),
    ],
)
def test_darkroom_generate_lora_errors_name_the_flag(models, adapters, tmp_path, flags, message):
    args = ["generate", "x", "--model", models["sd"], "--lora-dir", str(adapters[("sd", "diffusers")]), *flags]
    args += ["--output", str(tmp_path / "x.png"), "--steps", "1"]
    cmd = [DARKROOM, *args] if DARKROOM else [sys.executable, "-m", "serve.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_flux_adapters_in_one_batch_match_diffusers(tiny_flux, tmp_path):
    """Flux (dev-style): transformer and CLIP text-encoder adapters, diffusers/peft layout (the
    mechanism is the same module-path hooks; kohya/BFL Flux layouts are not tested here)."""
    from diffusers import FluxPipeline

    from serve.lora.random import write_random_lora

    write_random_lora(tmp_path / "fa.safetensors", tiny_flux, components=("transformer",), seed=1, strength=0.5)
    comps = ("transformer", "text_encoder")
    write_random_lora(tmp_path / "fb.safetensors", tiny_flux, components=comps, seed=2, strength=0.5)
    ref = lora_reference(FluxPipeline.from_pretrained(tiny_flux), tmp_path, flow=True)
    pipe = Pipeline.load(tiny_flux, device="cpu", loras=str(tmp_path))
    cases = [(("fa", 0.8),), (("fa", 1.0), ("fb", -0.6)), (("fb", 1.0),), ()]
    batch = [make_params(loras=c, seed=10 + i, guidance_scale=3.5, num_inference_steps=4) for i, c in enumerate(cases)]
    results = pipe.generate_batch(batch)
    assert set(pipe.denoiser.last_batch_sizes) == {len(batch)}  # no CFG batch doubling for Flux dev
    for p, r in zip(batch, results, strict=True):
        want = ref(p)
        assert max_level_diff(np.stack(r.pixels), want) <= TOLERANCE, p.loras
        if p.loras:
            assert max_level_diff(want, ref(make_params(**{**p.__dict__, "loras": ()}))) > TOLERANCE


@pytest.mark.parametrize("mode", ["segmented", "stacked"])
def test_both_kernels_equal_peft_row_by_row(models, adapters, monkeypatch, mode):
    """A UNet call mixing adapter sets (and none, and a set split over two runs), computed the
    segmented and the stacked way, equals peft's UNet run on each request's rows alone."""
    import torch
    from diffusers import UNet2DConditionModel

    from serve.lora import apply
    from serve.lora.repository import LoraRepository
    from serve.lora.runtime import LoraRuntime

    folder = adapters[("sd", "kohya")]  # kohya: conv layers and per-layer alphas too
    launch = 0.0 if mode == "segmented" else 1e15  # free launches: always segmented; dear: stacked
    monkeypatch.setitem(apply.LAUNCH_FLOPS, "cpu", launch)
    calls = {"stacked": 0}
    original = apply.Active._stacked

    def counted(self, *args):
        calls["stacked"] += 1
        return original(self, *args)

    monkeypatch.setattr(apply.Active, "_stacked", counted)
    from diffusers import StableDiffusionPipeline

    base = UNet2DConditionModel.from_pretrained(models["sd"], subfolder="unet").eval()
    pipe = StableDiffusionPipeline.from_pretrained(models["sd"], safety_checker=None)
    for name in ("ink", "oil", "chalk"):
        pipe.load_lora_weights(str(folder / f"{name}.safetensors"), adapter_name=name)
    ref = pipe.unet
    runtime = LoraRuntime(
        LoraRepository(str(folder)),
        {"unet": base},
        pipeline_class="StableDiffusionPipeline",
        unet_config=None,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    sets = [(("ink", 1.0),), (("oil", 0.6), ("chalk", -1.2)), (), (("ink", -0.5),)]
    runs = [(2, s) for s in sets]
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 77, 32, generator=g)
    t = torch.tensor([900.0, 900.0, 500.0, 500.0, 100.0, 100.0, 20.0, 20.0])
    with torch.inference_mode(), runtime.use([c for s in sets for c in s if c[0] != "ink"] + [("ink", 1.0)]):
        with runtime.rows(runs):
            got = base(x, t, encoder_hidden_states=e).sample
        for i, s in enumerate(sets):
            rows = slice(2 * i, 2 * i + 2)
            if s:
                pipe.enable_lora()
                pipe.set_adapters([n for n, _ in s], adapter_weights=[w for _, w in s])
            else:
                pipe.disable_lora()
            want = ref(x[rows], t[rows], encoder_hidden_states=e[rows]).sample
            assert torch.allclose(got[rows], want, atol=1e-4, rtol=1e-4), (mode, s, (got[rows] - want).abs().max())
    assert (calls["stacked"] > 0) == (mode == "stacked")
