"""LoRA beside the GPU-path features (issue 14) and the colocated profile, on CPU.

- step cache: requests with adapters run uncached beside cached requests in the same batch (the
  cache calls the model on row subsets the per-row adapter assignment cannot follow);
- CUDA graphs / torch.compile / batch padding: dropped (eager) when the Denoiser has adapters;
- colocated profile: adapters served with the split stages' images, and an adapter load (held on
  purpose) never holds up another request, whose every stage runs in the one model thread.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from serve.api.local_stages import LocalStages
from serve.api.service import ImageService, ServiceConfig
from serve.engines.torch_options import TorchOptions
from serve.families import family_of
from serve.imageio import decode_image
from serve.lora import LoraCatalog, LoraRepository
from serve.lora import runtime as lora_runtime
from serve.model import read_model_info
from serve.pipeline import Pipeline
from serve.stages import Conditioning, DenoiseJob, Denoiser, StepCache, TextEncoder
from serve.stages.colocated import ColocatedOptions, ColocatedStages
from serve.storage import open_store
from tests.conftest import max_level_diff
from tests.lora_helpers import write_adapters

NAMES = ("ink", "oil", "wordy")


@pytest.fixture(scope="module")
def folder(tiny_model, tmp_path_factory):
    return write_adapters(tiny_model, tmp_path_factory.mktemp("perf-loras"), names=NAMES)


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return TextEncoder.load(tiny_model, device="cpu")


def _job(encoder, seed, loras=(), steps=8, cfg=True, **kw) -> DenoiseJob:
    pos, neg = encoder.encode([f"prompt {seed}", ""])
    return DenoiseJob(
        conditioning=Conditioning(pos, neg if cfg else None),
        cfg_scale=7.5 if cfg else None,
        seed=seed,
        num_inference_steps=steps,
        guidance_scale=7.5 if cfg else 1.0,
        width=64,
        height=64,
        scheduler="ddim",
        loras=tuple(loras),
        **kw,
    )


# -- step cache ------------------------------------------------------------------------------------


def test_lora_requests_run_uncached_beside_cached_ones(tiny_model, folder, encoder):
    plain = Denoiser.load(tiny_model, device="cpu", loras=str(folder))
    cached = Denoiser.load(tiny_model, device="cpu", loras=str(folder), step_cache=StepCache("deepcache", interval=3))
    styled, other = _job(encoder, 5, (("ink", 1.0), ("oil", 0.6))), _job(encoder, 6)
    want_styled = plain.denoise([styled])[0]  # no step cache anywhere
    want_other = cached.denoise([other])[0]  # cached, alone
    assert cached.last_cache_stats == [{"full_steps": 3, "cached_steps": 5}]
    assert np.abs(want_other - plain.denoise([other])[0]).max() > 1e-3  # the cache changes it

    got = cached.denoise([styled, other])
    assert cached.last_cache_stats[0] is None  # the LoRA request ran no cache...
    assert cached.last_cache_stats[1] == {"full_steps": 3, "cached_steps": 5}  # ...its batch-mate did
    np.testing.assert_allclose(got[0], want_styled, atol=1e-4)
    np.testing.assert_allclose(got[1], want_other, atol=1e-4)
    # A job naming the cache itself runs uncached too when it has adapters.
    named = _job(encoder, 5, (("ink", 1.0), ("oil", 0.6)), step_cache=StepCache("deepcache", interval=3))
    np.testing.assert_allclose(cached.denoise([named, other])[0], want_styled, atol=1e-4)


# -- CUDA graphs / torch.compile -------------------------------------------------------------------


def test_denoiser_with_adapters_runs_eagerly(tiny_model, folder, encoder):
    """cuda_graphs pads batches to buckets (on CPU too, without graphs): 3 rows would run as 4,
    which the adapters' row assignment does not cover. With adapters the engine runs as it comes."""
    eager = Denoiser.load(tiny_model, device="cpu", loras=str(folder))
    padded = Denoiser.load(tiny_model, device="cpu", loras=str(folder), torch_options=TorchOptions(cuda_graphs=True))
    compiled = Denoiser.load(tiny_model, device="cpu", loras=str(folder), torch_options=TorchOptions(compile=True))
    without = Denoiser.load(tiny_model, device="cpu", torch_options=TorchOptions(compile=True))
    assert not padded.engine.options.buckets_batches and not compiled.engine.options.compile
    assert compiled.engine.module is compiled.engine.eager
    traced = Denoiser.load(tiny_model, device="cpu", loras=str(folder), torch_options=TorchOptions(jit=True))
    assert traced.engine.graphs is None and not traced.engine.options.jit  # a trace would freeze the hooks' rows
    assert without.engine.options.compile and without.engine.module is not without.engine.eager  # no adapters: kept
    jobs = [_job(encoder, 7, (("ink", 1.0),)), _job(encoder, 8, cfg=False, steps=3)]  # 2 + 1 rows per call
    got = padded.denoise(jobs)
    assert 3 in padded.last_batch_sizes
    for g, w in zip(got, eager.denoise(jobs), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


# -- the colocated profile -------------------------------------------------------------------------


def _colocated(tiny_model, folder, store, options=None):
    info = read_model_info(tiny_model)
    pipe = Pipeline.load(tiny_model, device="cpu", loras=LoraRepository(str(folder)))
    catalog = LoraCatalog(LoraRepository(str(folder)), family_of(info))
    stages = ColocatedStages.from_stages(pipe.text_encoder, pipe.denoiser, pipe.decoder, store, options)
    service = ImageService(ServiceConfig(model_name="tiny"), info, stages, store, loras=catalog)
    return service, stages, pipe


BODIES = [
    {"prompt": "a small boat", "seed": 4, "num_inference_steps": 5, "loras": [{"name": "ink", "scale": 0.8}]},
    {"prompt": "a red fox", "seed": 9, "num_inference_steps": 6, "loras": [{"name": "wordy", "scale": -1.0}]},
    {"prompt": "a castle", "seed": 1, "num_inference_steps": 4},
    {"prompt": "a lighthouse", "seed": 2, "num_inference_steps": 5, "loras": [{"name": "oil", "scale": 0.5}]},
]


def _images(out) -> np.ndarray:
    return np.stack([decode_image(im.data) for im in out])


async def _run_all(service, bodies):
    outs = []
    for body in bodies:
        request, params = service.parse({**body, "response_format": "b64_json"})
        outs.append(service.run(request, params))
    return await asyncio.wait_for(asyncio.gather(*outs), 120)


def test_colocated_serves_adapters_as_the_split_stages(tiny_model, folder, tmp_path):
    store = open_store(str(tmp_path))
    # 20 ms per step (test hook): the requests certainly overlap in the Denoiser.
    service, stages, pipe = _colocated(tiny_model, folder, store, ColocatedOptions(step_delay_s=0.02))
    split = ImageService(service.config, service.info, LocalStages(pipe, store), store, loras=service.loras)
    got = asyncio.run(_run_all(service, BODIES))
    want = asyncio.run(_run_all(split, BODIES))
    assert stages.denoise_loop.peak_requests >= 2  # requests with different adapters shared steps
    for (images, _), (ref, _) in zip(got, want, strict=True):
        assert max_level_diff(_images(images), _images(ref)) <= 3
    # The adapters changed the images (the same seed without them differs).
    bare = asyncio.run(_run_all(service, [{k: v for k, v in BODIES[0].items() if k != "loras"}]))
    assert max_level_diff(_images(bare[0][0]), _images(got[0][0])) > 3
    stages.close()


def test_colocated_adapter_load_never_holds_up_other_requests(tiny_model, folder, tmp_path, monkeypatch):
    """While a request's adapter load is held (until the other request is done), a request without
    adapters runs its encode, every denoiser step and its decode in the model thread."""
    store = open_store(str(tmp_path))
    service, stages, _ = _colocated(tiny_model, folder, store, ColocatedOptions(step_delay_s=0.02))
    loading, release = threading.Event(), threading.Event()
    real_load = lora_runtime.load_adapter

    def held_load(*args, **kwargs):
        loading.set()
        release.wait(timeout=60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(lora_runtime, "load_adapter", held_load)

    async def main():
        styled = asyncio.ensure_future(_run_all(service, [BODIES[0]]))
        assert await asyncio.to_thread(loading.wait, 30), "the adapter load never started"
        try:
            # A model thread waiting for the load would wait for this very await, and time out.
            plain = await asyncio.wait_for(_run_all(service, [BODIES[2]]), 60)
            assert not release.is_set()
        finally:
            release.set()
        return plain, await asyncio.wait_for(styled, 60)

    (plain,), (styled,) = asyncio.run(main())
    assert len(plain[0]) == 1 and len(styled[0]) == 1
    stages.close()
