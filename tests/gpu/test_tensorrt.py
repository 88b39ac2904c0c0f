"""TensorRT engines for the tiny model: build, content keys, parity with torch and diffusers.

Needs CUDA and the ``tensorrt`` package (10.x); skipped with the reason elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
trt = pytest.importorskip(
    "tensorrt", reason="TensorRT is not installed (pip install tensorrt, 10.x, on a CUDA machine)"
)

from export import engine_key, export_model, read_manifest  # noqa: E402
from export.onnx_export import load_component, random_inputs, vocab_size  # noqa: E402
from serve.engines import load_engine, resolve_backend  # noqa: E402
from serve.engines.tensorrt_backend import TensorRTEngine, gpu_arch  # noqa: E402
from serve.errors import EngineError  # noqa: E402
from serve.params import GenerationParams  # noqa: E402
from serve.pipeline import Pipeline  # noqa: E402
from tests.conftest import max_level_diff  # noqa: E402

CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def repo(tiny_model, tmp_path_factory):
    """fp32 and fp16 engines in one repository (the ONNX is exported once and kept)."""
    out = tmp_path_factory.getbasetemp() / "tiny-trt"
    export_model(tiny_model, out, fmt="tensorrt", precision="fp32", device="cuda")
    export_model(tiny_model, out, fmt="tensorrt", precision="fp16", device="cuda")
    return out


def test_engines_are_keyed_by_content_and_verified(repo):
    manifest = read_manifest(repo)
    arch = gpu_arch(CUDA)
    for name, entry in manifest["components"].items():
        profile = {k: v for k, v in entry["spec"]["profile"].items()}
        for precision in ("fp32", "fp16"):
            key = engine_key(entry["onnx"]["sha256"], profile, precision, trt.__version__, arch)
            found = [e for e in entry["engines"] if e["key"] == key]
            assert len(found) == 1, (name, precision)
            assert (repo / found[0]["file"]).is_file()
            assert max(found[0]["verify"]["max_abs_error"].values()) < 3e-2


def test_rebuild_reuses_engines_by_key(repo, tiny_model):
    messages: list[str] = []
    export_model(tiny_model, repo, fmt="tensorrt", precision="fp16", device="cuda", progress=messages.append)
    assert sum("up to date" in m for m in messages) == 3


@pytest.mark.parametrize(
    ("component", "shapes"),
    [
        ("text_encoder", {"input_ids": (3, 77)}),
        ("unet", {"sample": (3, 4, 6, 8), "timestep": (3,), "encoder_hidden_states": (3, 77, 32)}),
        ("unet", {"sample": (2, 4, 9, 7), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}),
        ("vae_decoder", {"latent": (2, 4, 6, 8)}),
    ],
)
def test_fp32_engine_matches_torch(repo, tiny_model, component, shapes):
    engine = load_engine("tensorrt", repo, component, CUDA, torch.float32)
    assert isinstance(engine, TensorRTEngine)
    module = load_component(tiny_model, component, device=CUDA)
    inputs = random_inputs(engine.spec, shapes, seed=1, vocab=vocab_size(module), device=CUDA)
    with torch.no_grad():
        want = module(**inputs).float()
    got = engine.run(**inputs).float()
    assert got.shape == want.shape and got.device.type == "cuda"
    assert float((got - want).abs().max()) <= 1e-3 * max(1.0, float(want.abs().max()))


def test_shape_outside_profile_is_a_clear_error(repo):
    engine = load_engine("tensorrt", repo, "vae_decoder", CUDA, torch.float32)
    with pytest.raises(EngineError, match="outside the engine's profile"):
        engine.run(latent=torch.zeros(1, 4, 64, 64, device=CUDA))


def test_auto_picks_tensorrt_when_engines_exist(repo):
    assert resolve_backend("auto", repo, "unet", CUDA, torch.float16) == "tensorrt"
    assert resolve_backend("auto", repo, "unet", torch.device("cpu"), torch.float32) == "onnxruntime"


@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpmpp_2m"])
def test_tensorrt_pipeline_matches_diffusers(repo, reference, scheduler):
    pipe = Pipeline.load(repo, backend="tensorrt", device="cuda", dtype="float32")
    p = GenerationParams(
        prompt="a lighthouse at dusk",
        negative_prompt="blurry",
        width=64,
        height=48,
        num_inference_steps=6,
        guidance_scale=7.5,
        seed=1234,
        n=2,
        scheduler=scheduler,
        output_format="png",
    )
    got = np.stack(pipe.generate(p).pixels)
    assert max_level_diff(got, reference(p)) <= 3
