"""bench/gpu.py's CPU smoke test: the tiny models stand in for SD 1.5, SDXL and Flux (the GPU run
takes SD 1.5 and SDXL: both code paths run here), every row of the report is filled from a
measurement, Darkroom's images equal diffusers', and each step cache reports its speed-up next to
its distance to the uncached image. (The full-size run needs a GPU.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_tiny(tmp_path: Path, *flags: str) -> dict:
    """``python -m bench.gpu --tiny --device cpu --runs 1 FLAGS``: its JSON report."""
    out = tmp_path / "gpu.json"
    args = [
        sys.executable, "-m", "bench.gpu", "--tiny", "--device", "cpu", "--runs", "1", *flags,
        "--model-dir", str(tmp_path / "models"), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_gpu_benchmark_smoke_on_cpu(tmp_path):
    report = run_tiny(tmp_path, "--models", "sd15,sdxl,flux", "--batches", "1", "--steps", "4")
    assert report["gpu"]["device"] == "cpu" and report["versions"]["torch"] and report["versions"]["diffusers"]
    assert report["args"]["steps"] == 4 and not report["skipped"]
    rows = {(r["model"], r["engine"]): r for r in report["results"]}
    assert set(rows) == {(m, e) for m in ("sd15", "sdxl", "flux") for e in ("diffusers", "darkroom")}
    for (_model, engine), r in rows.items():
        assert r["img_s"] > 0 and r["step_ms"] > 0 and r["s_per_batch"] > 0 and r["side"] == 64, r
        assert r["weights_dtype"] == "float32"  # CPU's default
        assert r["peak_gib"] is None  # no GPU: no GPU memory to report, rather than a made-up number
        if engine == "darkroom":
            assert r["encoder_calls"] >= 1  # its prompts encoded in the timed run, not cached
            assert r["vs_diffusers"] > 0
            assert r["parity_to_diffusers"]["max_abs_levels"] <= 3  # the seed contract, fp32 on CPU
    # The same work on both sides: one denoiser call per scheduler timestep, the batch and both CFG
    # halves in it (PNDM: 5 timesteps for 4 steps; SDXL's Euler and Flux's flow match: 4).
    for model, calls in (("sd15", 5), ("sdxl", 4), ("flux", 4)):
        assert rows[(model, "diffusers")]["denoiser_calls"] == rows[(model, "darkroom")]["denoiser_calls"] == calls
    caches = {r["model"]: r for r in report["step_cache"]}
    assert caches["sd15"]["cache"]["kind"] == caches["sdxl"]["cache"]["kind"] == "deepcache"
    assert caches["flux"]["cache"]["kind"] == "teacache"
    for r in caches.values():
        assert r["speedup"] > 0 and r["uncached_img_s"] > 0
        assert r["encoder_calls"] >= 1  # the same prompts as the uncached run: encoded again, as there
        d = r["distance_to_uncached"]
        assert d["finite"] and d["mean_abs_levels"] >= 0 and d["max_abs_levels"] >= 0
    # DeepCache every 3rd step of PNDM's 5 timesteps (4 steps): full at 0 and 3, cached at 1, 2, 4;
    # skipping deep features changes the image (a measured, nonzero cost).
    assert (caches["sd15"]["full_steps"], caches["sd15"]["cached_steps"]) == (2, 3)
    assert caches["sd15"]["distance_to_uncached"]["max_abs_levels"] > 0
    # SDXL's Euler: 4 timesteps for 4 steps, full at 0 and 3.
    assert (caches["sdxl"]["full_steps"], caches["sdxl"]["cached_steps"]) == (2, 2)
    assert caches["sdxl"]["distance_to_uncached"]["max_abs_levels"] > 0
    assert caches["flux"]["full_steps"] + caches["flux"]["cached_steps"] == 4


def test_no_prompt_repeats_within_a_batch_or_from_the_warm_up():
    """Darkroom's TextEncoder caches embeddings across requests; diffusers encodes every row. A
    prompt seen in the warm-up run (or twice in a batch) would cost Darkroom no encoder call."""
    from bench.gpu import Case, _params

    case = Case("sd15", "sd", 64, 8, 4)
    warm, timed = _params(case, 1000), _params(case, 1)
    assert len({p.prompt for p in timed}) == len(timed) == 8
    assert not {p.prompt for p in warm} & {p.prompt for p in timed}
    assert [p.seed for p in timed] == list(range(1, 9))


def test_gpu_benchmark_half_precision_batches_on_cpu(tmp_path):
    """The GPU run's own dtype (float16, its default on CUDA) and batches above one (it takes 1, 4
    and 8), which the fp32 smoke test above does not: the half-precision code paths of both
    engines, Darkroom's batched rows, and their parity with diffusers at that dtype."""
    report = run_tiny(
        tmp_path, "--dtype", "float16", "--models", "sd15,sdxl", "--batches", "2", "--steps", "2", "--step-cache", ""
    )
    assert report["dtype"] == "float16" and not report["skipped"] and report["step_cache"] == []
    rows = {(r["model"], r["engine"]): r for r in report["results"]}
    assert set(rows) == {(m, e) for m in ("sd15", "sdxl") for e in ("diffusers", "darkroom")}
    for (model, engine), r in rows.items():
        assert r["batch"] == 2 and r["img_s"] > 0 and r["weights_dtype"] == "float16", r
        assert r["denoiser_calls"] == (3 if model == "sd15" else 2), r  # the batch and CFG: one call a timestep
        if engine == "darkroom":
            parity = r["parity_to_diffusers"]
            assert parity["finite"] and parity["max_abs_levels"] <= 3, r  # the seed contract, in fp16
