"""The torch backend's GPU path logic and the opt-in step cache, on CPU.

Bucket choice, padding, graph keys and the graph cache (the CUDA capture itself needs a GPU:
tests/gpu); DeepCache's and TeaCache's schedules; each cache's partial pass is exactly the model's
own computation when fed the current step's cached values; caching requests share batches with
uncached ones without touching their images; off by default.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.engines.step_cache import (
    CacheGroup,
    RequestCache,
    TeaCacheState,
    deepcache_full_step,
    polynomial,
    run_deepcache,
    run_teacache,
)
from serve.engines.torch_options import GraphCache, TorchOptions, bucket_for, graph_key, pad_rows
from serve.errors import InvalidRequestError
from serve.stages import DenoiseJob, Denoiser, StepCache, TextEncoder
from tests.unit.test_continuous import job

# -- buckets, padding, graph keys, the graph cache --------------------------------------------------


def test_bucket_for():
    buckets = (1, 2, 4, 8, 16)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 16, 17, 40)] == [1, 2, 4, 8, 8, 16, 16, 17, 40]
    with pytest.raises(ValueError):
        bucket_for(0, buckets)
    with pytest.raises(ValueError):
        TorchOptions(batch_buckets=(4, 2))
    assert TorchOptions(compile=True).buckets_batches and not TorchOptions().buckets_batches


def test_pad_rows_repeats_the_last_row_and_leaves_unbatched_inputs():
    x = torch.arange(6.0).reshape(3, 2)
    ids = torch.zeros(5, 3)  # Flux's img_ids: no batch axis
    out = pad_rows({"sample": x, "img_ids": ids}, 3, 4)
    assert out["sample"].shape == (4, 2) and torch.equal(out["sample"][3], x[2]) and out["img_ids"] is ids
    assert pad_rows({"sample": x}, 3, 3)["sample"] is x


def test_graph_key_and_cache_reuse_and_eviction():
    captured: list[tuple] = []

    def capture(inputs):
        captured.append(graph_key(inputs))
        return lambda new: new["sample"] * 2

    cache = GraphCache(capture, max_graphs=2)
    a = {"sample": torch.ones(2, 4, 8, 8), "timestep": torch.ones(2)}
    b = {"sample": torch.ones(4, 4, 8, 8), "timestep": torch.ones(4)}
    c = {"sample": torch.ones(2, 4, 16, 16), "timestep": torch.ones(2)}
    assert graph_key(a) == (
        ("sample", (2, 4, 8, 8), "torch.float32", "cpu"),
        ("timestep", (2,), "torch.float32", "cpu"),
    )
    assert graph_key(a) != graph_key({**a, "sample": a["sample"].half()})  # dtype is part of the key
    assert torch.equal(cache.run(a), a["sample"] * 2)
    cache.run({k: v + 1 for k, v in a.items()})  # same shapes: replayed, not captured again
    assert cache.captures == 1 and cache.replays == 2
    cache.run(b)
    cache.run(a)  # a is now the most recently used
    cache.run(c)  # a third shape: the least recently used (b) goes
    assert cache.captures == 3 and len(cache) == 2 and graph_key(b) not in cache.keys()


def test_cuda_only_options_are_inert_on_cpu(tiny_model):
    """cuda_graphs on a CPU engine: a warning, eager runs, same noise; compile wraps the module."""
    from serve.engines.loader import load_engine
    from serve.model import read_model_info

    info = read_model_info(tiny_model)
    cpu = torch.device("cpu")
    plain = load_engine("torch", info, "unet", cpu, torch.float32)
    graphs = load_engine("torch", info, "unet", cpu, torch.float32, TorchOptions(cuda_graphs=True))
    assert graphs.graphs is None and plain.step_cache_kind == "deepcache"
    inputs = {
        "sample": torch.randn(3, 4, 8, 8),
        "timestep": torch.full((3,), 500.0),
        "encoder_hidden_states": torch.randn(3, 77, 32),
    }
    # Bucketed: 3 rows run padded to 4; the 3 rows that come back are the unpadded call's.
    torch.testing.assert_close(
        graphs.run(**inputs)["noise_pred"], plain.run(**inputs)["noise_pred"], rtol=1e-4, atol=1e-5
    )


# -- schedules --------------------------------------------------------------------------------------


def test_deepcache_schedule():
    assert [s for s in range(8) if deepcache_full_step(s, 3, 8)] == [0, 3, 6]
    assert all(deepcache_full_step(s, 1, 8) for s in range(8))
    with pytest.raises(ValueError):
        deepcache_full_step(0, 0, 8)


def test_teacache_schedule_worked_example():
    assert polynomial((2, 0, 1), 3) == 19
    tea = TeaCacheState(threshold=0.3, coefficients=(1.0, 0.0))  # rescale = identity
    tea.residual = torch.zeros(1)
    decisions = [tea.decide(None, 0, 6), tea.decide(0.1, 1, 6), tea.decide(0.15, 2, 6), tea.decide(0.1, 3, 6)]
    assert decisions == [True, False, False, True] and tea.accumulated == 0.0
    assert tea.decide(0.01, 5, 6)  # the last step always computes
    assert TeaCacheState(threshold=10.0).decide(0.01, 1, 6)  # no residual yet: compute


def test_step_cache_message_validates():
    with pytest.raises(ValueError):
        StepCache("fastcache")
    with pytest.raises(ValueError):
        StepCache("deepcache", interval=0)


# -- the partial passes are the model's own computation ---------------------------------------------


@pytest.fixture(scope="module")
def parts(tiny_model):
    return TextEncoder.load(tiny_model, device="cpu"), Denoiser.load(tiny_model, device="cpu")


def test_deepcache_shallow_pass_equals_the_full_unet_on_the_same_step(parts):
    _, denoiser = parts
    wrapper = denoiser.engine.eager
    torch.manual_seed(0)
    inputs = {
        "sample": torch.randn(4, 4, 8, 8),
        "timestep": torch.full((4,), 300.0),
        "encoder_hidden_states": torch.randn(4, 77, 32),
    }
    caches = [RequestCache(StepCache("deepcache", interval=2)), RequestCache(StepCache("deepcache", interval=2))]
    with torch.inference_mode():
        full = run_deepcache(
            wrapper, inputs, [CacheGroup(slice(0, 2), caches[0], 0, 4), CacheGroup(slice(2, 4), caches[1], 0, 4)]
        )
        assert [c.full_steps for c in caches] == [1, 1] and caches[0].feature.shape[0] == 2
        # Step 1 (cached) on the same inputs: the shallow branch over the kept features gives the full output.
        shallow = run_deepcache(
            wrapper, inputs, [CacheGroup(slice(0, 2), caches[0], 1, 4), CacheGroup(slice(2, 4), caches[1], 1, 4)]
        )
        reference = wrapper(**inputs)[0]
    assert [c.cached_steps for c in caches] == [1, 1]
    torch.testing.assert_close(full, reference)
    torch.testing.assert_close(shallow, reference, rtol=1e-5, atol=1e-5)


def test_teacache_skip_equals_the_blocks_on_the_same_step(tiny_flux):
    denoiser = Denoiser.load(tiny_flux, device="cpu")
    assert denoiser.engine.step_cache_kind == "teacache"
    wrapper = denoiser.engine.eager
    cfg = denoiser.family
    torch.manual_seed(0)
    h = w = 4  # 64 px at factor 8 -> 8x8 latents -> 4x4 patches
    batch, seq = 2, h * w
    inputs = {
        "hidden_states": torch.randn(batch, seq, cfg.packed_channels),
        "timestep": torch.full((batch,), 0.5),
        "encoder_hidden_states": torch.randn(batch, 512, cfg.t5_width),
        "pooled_projections": torch.randn(batch, cfg.pooled_width),
        "img_ids": torch.zeros(seq, 3),
        "txt_ids": torch.zeros(512, 3),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    cache = RequestCache(StepCache("teacache", threshold=1e9))  # skip whenever allowed
    with torch.inference_mode():
        first = run_teacache(wrapper, inputs, [CacheGroup(slice(0, 2), cache, 0, 4)])
        skipped = run_teacache(wrapper, inputs, [CacheGroup(slice(0, 2), cache, 1, 4)])
        reference = wrapper(**inputs)[0]
    assert (cache.full_steps, cache.cached_steps) == (1, 1)
    torch.testing.assert_close(first, reference)
    torch.testing.assert_close(skipped, reference, rtol=1e-4, atol=1e-5)  # same step: the same residual


# -- in the Denoiser: per request, mixed with uncached requests ------------------------------------


def _job(encoder, seed, steps=8, **kw) -> DenoiseJob:
    return job(encoder, seed, steps=steps, **{"scheduler": "ddim", **kw})


def test_cached_and_uncached_requests_share_a_batch(parts):
    encoder, denoiser = parts
    plain, cached = _job(encoder, 1), _job(encoder, 2, step_cache=StepCache("deepcache", interval=3))
    solo_plain = denoiser.denoise([plain])[0]
    solo_cached = denoiser.denoise([cached])[0]
    assert denoiser.last_cache_stats == [{"full_steps": 3, "cached_steps": 5}]  # full at 0, 3, 6 of 8
    uncached_ref = denoiser.denoise([_job(encoder, 2)])[0]
    both = denoiser.denoise([plain, cached])
    assert denoiser.last_cache_stats[0] is None and denoiser.last_cache_stats[1]["cached_steps"] == 5
    np.testing.assert_allclose(both[0], solo_plain, atol=1e-4)  # the uncached request is untouched
    np.testing.assert_allclose(both[1], solo_cached, atol=1e-4)  # the cached one is its own, batched or not
    assert np.abs(solo_cached - uncached_ref).max() > 1e-3  # and the cache did change it (a real cost)
    # interval 1 = a full pass every step: exactly the uncached result.
    every = denoiser.denoise([_job(encoder, 2, step_cache=StepCache("deepcache", interval=1))])[0]
    np.testing.assert_allclose(every, uncached_ref, atol=1e-5)


def test_step_cache_is_off_by_default_and_refused_where_the_engine_lacks_it(parts):
    encoder, denoiser = parts
    assert denoiser.step_cache is None
    denoiser.denoise([_job(encoder, 3, steps=2)])
    assert denoiser.last_cache_stats == [None]
    with pytest.raises(InvalidRequestError) as err:
        denoiser.validate(_job(encoder, 3, step_cache=StepCache("teacache")))
    assert err.value.field == "step_cache"
    default = Denoiser(denoiser.info, denoiser.engine, step_cache=StepCache("deepcache", interval=2))
    default.denoise([_job(encoder, 4, steps=4)])
    assert default.last_cache_stats == [{"full_steps": 2, "cached_steps": 2}]


def test_app_config_carries_torch_options_and_the_step_cache():
    from deployments.config import AppConfig

    cfg = AppConfig.model_validate(
        {"torch": {"cuda_graphs": True, "batch_buckets": [1, 2, 4]}, "step_cache": {"kind": "deepcache", "interval": 2}}
    )
    assert cfg.load_kwargs()["torch_options"] == TorchOptions(cuda_graphs=True, batch_buckets=(1, 2, 4))
    assert cfg.step_cache_message() == StepCache("deepcache", 2)
    assert AppConfig().step_cache_message() is None and AppConfig().load_kwargs()["torch_options"] == TorchOptions()
    for bad in (
        {"torch": {"cuda_graph": True}},
        {"step_cache": {"kind": "fastcache"}},
        {"torch": {"batch_buckets": [4, 2]}},
    ):
        with pytest.raises(ValueError):
            AppConfig.model_validate(bad).load_kwargs()
