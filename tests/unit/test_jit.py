"""The torch backend's opt-in TorchScript traces (``TorchOptions.jit``): the same images as eager
PyTorch for every family (the seed contract holds), one trace per input shapes, reused, and off
where per-request hooks need the eager module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.api.schemas import parse_generation_request
from serve.engines.torch_options import TorchOptions
from serve.pipeline import Pipeline


def _params(pipe: Pipeline, seeds, **body):
    size = pipe.info.native_size
    return [
        parse_generation_request(
            {"prompt": f"a red square {s}", "seed": s, "num_inference_steps": 4, **body}
        ).to_params(default_size=size)
        for s in seeds
    ]


@pytest.mark.parametrize("model", ["tiny_model", "tiny_sdxl", "tiny_flux"])
def test_traced_denoiser_draws_the_eager_images(model, request):
    source = request.getfixturevalue(model)
    eager = Pipeline.load(source)
    traced = Pipeline.load(source, torch_options=TorchOptions(jit=True))
    engine = traced.denoiser.engine
    assert engine.graphs is not None and engine.graphs.captures == 0
    # Two batch sizes and, for the UNets, a second image size: one trace per input shapes.
    batches = [_params(eager, [1, 2]), _params(eager, [3]), _params(eager, [4, 5])]
    if model != "tiny_flux":
        batches.append(_params(eager, [6], size="48x64"))
    for batch in batches:
        want = eager.generate_batch(batch)
        got = traced.generate_batch(batch)
        for a, b in zip(want, got, strict=True):
            for x, y in zip(a.pixels, b.pixels, strict=True):
                assert np.abs(x.astype(int) - y.astype(int)).max() <= 1  # 8-bit pixels: at most one level
    shapes = 3 if model != "tiny_flux" else 2  # (rows 2 or 4 with CFG / 1 or 2 without) x sizes
    assert engine.graphs.captures == shapes and engine.graphs.replays > engine.graphs.captures


def test_traced_forward_equals_eager_exactly_on_new_values(tiny_model):
    from serve.engines.loader import load_engine
    from serve.model import read_model_info

    info = read_model_info(tiny_model)
    cpu = torch.device("cpu")
    plain = load_engine("torch", info, "unet", cpu, torch.float32)
    traced = load_engine("torch", info, "unet", cpu, torch.float32, TorchOptions(jit=True))
    torch.manual_seed(0)
    for t in (999.0, 500.0, 1.0):  # traced once, replayed with new timesteps and inputs
        inputs = {
            "sample": torch.randn(4, 4, 8, 8),
            "timestep": torch.full((4,), t),
            "encoder_hidden_states": torch.randn(4, 77, 32),
        }
        torch.testing.assert_close(traced.run(**inputs)["noise_pred"], plain.run(**inputs)["noise_pred"])
    assert traced.graphs.captures == 1 and traced.graphs.replays == 3


def test_jit_options():
    with pytest.raises(ValueError, match="jit and compile"):
        TorchOptions(jit=True, compile=True)
    assert not TorchOptions(jit=True).buckets_batches  # traces take batches as they come
    from deployments.config import AppConfig

    assert AppConfig.model_validate({"torch": {"jit": True}}).torch.options().jit


def test_run_eagerly_drops_the_traces(tiny_model):
    from serve.engines.loader import load_engine
    from serve.model import read_model_info

    engine = load_engine(
        "torch", read_model_info(tiny_model), "unet", torch.device("cpu"), torch.float32, TorchOptions(jit=True)
    )
    engine.run_eagerly("per-request LoRA adapters")
    assert engine.graphs is None and not engine.options.jit


@pytest.mark.parametrize("model", ["tiny_model", "tiny_flux"])
def test_warm_up_traces_the_common_batches_at_load(model, request):
    """``Denoiser.warm_up(k)``: one trace per batch of 1..k single-image requests at the native
    size (CFG doubles the rows; Flux runs none), so a later batch of that shape traces nothing and
    still draws the eager images; the warm-up's calls are not counted as requests'."""
    source = request.getfixturevalue(model)
    eager = Pipeline.load(source)
    traced = Pipeline.load(source, torch_options=TorchOptions(jit=True))
    rows = traced.denoiser.warm_up(3)
    per_request = 2 if model == "tiny_model" else 1
    assert rows == [per_request * k for k in (1, 2, 3)]
    graphs = traced.denoiser.engine.graphs
    assert graphs.captures == 3 and traced.denoiser.model_calls == 0
    batch = _params(eager, [7, 8])
    for a, b in zip(eager.generate_batch(batch), traced.generate_batch(batch), strict=True):
        for x, y in zip(a.pixels, b.pixels, strict=True):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    assert graphs.captures == 3 and graphs.replays > 3  # the batch of two found its trace
    assert traced.denoiser.model_calls > 0


def test_warm_up_runs_only_where_shapes_are_prepared(tiny_model):
    """Eager engines have nothing to warm (no step runs); ``warm_up: false`` turns it off."""
    eager = Pipeline.load(tiny_model)
    assert eager.denoiser.warm_up(4) == [] and eager.denoiser.last_batch_sizes == []
    off = Pipeline.load(tiny_model, torch_options=TorchOptions(jit=True, warm_up=False))
    assert off.denoiser.warm_up(4) == [] and off.denoiser.engine.graphs.captures == 0
    from deployments.config import AppConfig

    assert AppConfig.model_validate({"torch": {"jit": True}}).torch.options().warm_up
    assert not AppConfig.model_validate({"torch": {"jit": True, "warm_up": False}}).torch.options().warm_up


def test_colocated_replica_and_baseline_warm_up_at_load(tiny_model):
    """Both places a traced denoiser serves from outside Ray warm it for the Denoiser's
    ``max_batch_size``: the colocated replica's loader and the bench's in-process baseline."""
    import asyncio

    from bench.inprocess import InProcessTarget
    from deployments.colocated import stage_loader
    from deployments.config import AppConfig

    cfg = AppConfig.model_validate(
        {
            "model": tiny_model,
            "torch": {"jit": True},
            "denoiser": {"max_batch_size": 2},
            "ingress": {"torch_threads": 1},
        }
    )
    _, denoiser, _ = stage_loader(cfg, cfg.model_info())()
    assert denoiser.engine.graphs.captures == 2
    target = InProcessTarget(tiny_model, torch_options={"jit": True}, max_batch=3)

    async def start() -> None:
        await target.start()
        await target.close()

    asyncio.run(start())
    assert target._pipe.denoiser.engine.graphs.captures == 3


def test_gil_benchmark_smoke(tmp_path):
    """``python -m bench.gil`` on the tiny model, one pair of one-step batches: the report's
    structure (its numbers are the machine's, so no speed is asserted)."""
    import json
    import sys

    from bench.gil import ALONE, conditions, main

    out = tmp_path / "gil.json"
    before = sys.getswitchinterval()
    argv = ["--model", "tiny", "--batch", "2", "--steps", "1", "--pairs", "1", "--switch-interval-ms", "5,0.5"]
    assert main([*argv, "--out", str(out)]) == 0
    assert sys.getswitchinterval() == before  # restored
    report = json.loads(out.read_text())
    assert report["workload"] == {"model": "tiny", "size": [64, 64], "batch": 2, "steps": 1}
    names = [name for name, _ in conditions(1.0, [5.0, 0.5])]
    assert list(report["results"]) == names and names[0] == ALONE and len(names) == 3
    assert [r["switch_interval_ms"] for r in report["results"].values()] == [before * 1000, 5.0, 0.5]
    for r in report["results"].values():
        assert r["eager"]["img_per_s"] > 0 and r["jit"]["img_per_s"] > 0 and len(r["jit"]["runs_s"]) == 1
        assert r["jit_speedup"]["min"] <= r["jit_speedup"]["median"] <= r["jit_speedup"]["max"]
    assert report["results"][names[1]]["eager"]["background_units_per_s"] > 0  # the thread ran


@pytest.mark.parametrize(
    "argv", [["--burst-ms", "0"], ["--switch-interval-ms", "x"], ["--switch-interval-ms", "0"], ["--pairs", "0"]]
)
def test_gil_benchmark_flag_errors(argv, tmp_path, capsys):
    from bench.gil import main

    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err
