"""The seed contract on the ONNX Runtime backend: images equal diffusers' within 3 levels.

Through ``Pipeline.load(repo, backend="onnxruntime")`` in-process and through ``darkroom
generate`` in a subprocess, on the tiny model exported with ``export_model`` (real ONNX Runtime).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from export import export_model
from serve.engines.onnxruntime_backend import OnnxRuntimeEngine
from serve.imageio import decode_image
from serve.pipeline import Pipeline
from tests.conftest import make_params as params
from tests.conftest import max_level_diff

TOLERANCE = 3
DARKROOM = shutil.which("darkroom") or ""


@pytest.fixture(scope="module")
def repo(tiny_model, tmp_path_factory):
    # Same folder as test_export_onnx's fixture: whichever runs second reuses the ONNX by content.
    return export_model(tiny_model, tmp_path_factory.getbasetemp() / "tiny-onnx")


@pytest.fixture(scope="module")
def pipe(repo) -> Pipeline:
    return Pipeline.load(repo, backend="onnxruntime", device="cpu")


CASES = {
    "default_scheduler_cfg": dict(),
    "euler_a_cfg_negative_n2_nonsquare": dict(scheduler="euler_a", negative_prompt="blurry", n=2, width=64, height=48),
    "dpmpp_2m_no_cfg": dict(scheduler="dpmpp_2m", guidance_scale=1.0, seed=7, width=48, height=64),
    "ddim_cfg_odd_latents": dict(scheduler="ddim", prompt="a red fox in the snow", width=56, height=72, seed=99),
    "unipc_n2_no_cfg": dict(scheduler="unipc", guidance_scale=1.0, n=2, seed=5),
}


def test_pipeline_runs_onnxruntime_engines(pipe):
    for engine in (*pipe.text_encoder.engines.values(), pipe.denoiser.engine, pipe.decoder.engine):
        assert isinstance(engine, OnnxRuntimeEngine)


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_pipeline_matches_diffusers(pipe, reference, case):
    p = params(**CASES[case])
    got = np.stack(pipe.generate(p).pixels)
    want = reference(p)
    assert got.shape == (p.n, p.height, p.width, 3)
    assert max_level_diff(got, want) <= TOLERANCE


def test_prompts_still_matter(pipe):
    """Guards the parity tests against an engine that ignores its text input."""
    a = np.stack(pipe.generate(params(prompt="a castle")).pixels)
    b = np.stack(pipe.generate(params(prompt="a dragon over the sea")).pixels)
    assert max_level_diff(a, b) > TOLERANCE


def test_generate_cli_with_onnxruntime_backend(repo, reference, tmp_path):
    out = tmp_path / "fox.png"
    args = [
        "generate",
        "a fox under the moon",
        "--model",
        str(repo),
        "--backend",
        "onnxruntime",
        "--seed",
        "42",
        "--steps",
        "5",
        "--scheduler",
        "euler",
        "--size",
        "64x48",
        "--output",
        str(out),
    ]
    cmd = [DARKROOM, *args] if DARKROOM else [sys.executable, "-m", "serve.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "seed: 42" in proc.stdout
    p = params(prompt="a fox under the moon", seed=42, num_inference_steps=5, scheduler="euler", height=48)
    got = decode_image(out.read_bytes())
    assert max_level_diff(np.asarray(got)[None], reference(p)) <= TOLERANCE
