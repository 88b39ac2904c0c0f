"""In-process GPU benchmark: Darkroom's stages against diffusers' eager pipeline on the same GPU.

Self-contained: torch, diffusers, transformers and this project, no Ray, no download. It builds
SD 1.5-size and SDXL-size models with random weights (``bench/gpu_models.py``), then for each
model at its native size (512² and 1024²), 20 steps, batches of 1/4/8 images (one request per
image, each with its own seed and a prompt of its own, new in every run, so no cached embedding
helps Darkroom; CFG 7.5) times:

- ``diffusers``: ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` in fp16, eager, as
  their documentation runs them (one call for the batch, a generator per image);
- ``darkroom``: the TextEncoder, Denoiser and Decoder stages in one process (no PNG encoding, as
  diffusers' ``output_type="np"``), fp16 with the torch backend's defaults (channels_last);
- ``darkroom+graphs``: the same with CUDA graphs per batch bucket (``TorchOptions``);
- ``darkroom+compile`` (``--compile``): with ``torch.compile`` instead;

and, for the step cache (``--step-cache``, DeepCache for these UNets), its speed-up over the same
engine uncached and its quality cost: the distance of each image to the uncached image of the
same seed (mean and max absolute difference in 8-bit levels, PSNR).

Every row gives img/s, ms per denoising step (the denoise stage's time / steps), seconds per batch,
peak GPU memory, the dtype of the denoiser's weights as loaded and the denoiser's calls in the
timed run (both engines make the same: PNDM, SD 1.5's scheduler, calls the UNet steps + 1
times; a call holds the whole batch and both CFG halves); the JSON holds the GPU's name,
the versions and the arguments. On a CPU it runs the tiny models (``--tiny``, the CI smoke tests,
in fp32 and fp16); it never estimates a number it did not measure.

    python -m bench.gpu --out gpu.json                                   # on a GPU machine
    python -m bench.gpu --tiny --device cpu --batches 1,2 --steps 2 --out smoke.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROMPTS = ("a lighthouse on a cliff at dusk, oil painting", "a red fox in fresh snow", "an isometric paper city")


@dataclass
class Case:
    model: str
    family: str
    side: int
    batch: int
    steps: int


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: Any) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _params(case: Case, seed0: int) -> list[Any]:
    from serve.params import GenerationParams

    # Every image its own prompt, new in every run: Darkroom's TextEncoder caches embeddings across
    # requests (an LRU), and a prompt repeated from the warm-up run or within the batch would
    # cost it no encoder call while diffusers encodes every row. The empty negative prompt is
    # shared, as in serving: Darkroom encodes it once per batch, diffusers once per image.
    return [
        GenerationParams(
            prompt=f"{PROMPTS[i % len(PROMPTS)]}, no. {seed0 + i}",
            negative_prompt=None,
            width=case.side,
            height=case.side,
            num_inference_steps=case.steps,
            guidance_scale=7.5,
            seed=seed0 + i,
            n=1,
            scheduler=None,
            output_format="png",
        )
        for i in range(case.batch)
    ]


class DarkroomRunner:
    """Darkroom's three stages in this process, timed stage by stage (synchronised on the GPU)."""

    def __init__(self, folder: Path, device: str, dtype: str, torch_options: Any) -> None:
        from serve.pipeline import Pipeline

        self.pipe = Pipeline.load(folder, device=device, dtype=dtype, torch_options=torch_options)
        self.device = self.pipe.denoiser.engine.device
        self.weights_dtype = str(self.pipe.denoiser.engine.dtype).removeprefix("torch.")

    def run(self, params: list[Any], step_cache: Any = None) -> tuple[Any, dict[str, float]]:
        import numpy as np

        from serve.pipeline import make_jobs

        pipe = self.pipe
        pipe.text_encoder.clear_cache()  # no embedding from an earlier run (diffusers has none)
        calls, model_calls = pipe.text_encoder.calls, pipe.denoiser.model_calls
        plans = [pipe.family.plan(p) for p in params]
        _sync(self.device)
        t0 = time.perf_counter()
        jobs = make_jobs(pipe.text_encoder, plans)
        if step_cache is not None:
            from dataclasses import replace

            jobs = [replace(j, step_cache=step_cache) for j in jobs]
        _sync(self.device)
        t1 = time.perf_counter()
        latents = pipe.denoiser.denoise(jobs)
        _sync(self.device)
        t2 = time.perf_counter()
        pixels = pipe.decoder.decode(latents)
        _sync(self.device)
        t3 = time.perf_counter()
        stats = [s for s in pipe.denoiser.last_cache_stats if s]
        extra = {
            "encoder_calls": pipe.text_encoder.calls - calls,
            "denoiser_calls": pipe.denoiser.model_calls - model_calls,
        }
        if stats:
            extra.update({k: sum(s[k] for s in stats) / len(stats) for k in ("full_steps", "cached_steps")})
        return np.concatenate(pixels), {"encode": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2, **extra}


class DiffusersRunner:
    """The family's diffusers pipeline, eager, one call for the batch; encode/decode timed by wrapping."""

    def __init__(self, folder: Path, family: str, device: str, dtype: str) -> None:
        import diffusers
        import torch

        cls = {
            "sd": diffusers.StableDiffusionPipeline,
            "sdxl": diffusers.StableDiffusionXLPipeline,
            "flux": diffusers.FluxPipeline,
        }[family]
        extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
        torch_dtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.pipe = cls.from_pretrained(folder, torch_dtype=torch_dtype, **extra).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device = torch.device(device)
        denoiser = getattr(self.pipe, "unet", None) or self.pipe.transformer
        self.weights_dtype = str(denoiser.dtype).removeprefix("torch.")
        self.denoiser_calls = 0

        def count(*_: Any) -> None:
            self.denoiser_calls += 1

        denoiser.register_forward_pre_hook(count)
        self.timers = {"encode": 0.0, "decode": 0.0}
        for attr, key, owner in (("encode_prompt", "encode", self.pipe), ("decode", "decode", self.pipe.vae)):
            original = getattr(owner, attr)

            def timed(*a: Any, _f: Any = original, _k: str = key, **k: Any) -> Any:
                _sync(self.device)
                t = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    _sync(self.device)
                    self.timers[_k] += time.perf_counter() - t

            setattr(owner, attr, timed)

    def run(self, params: list[Any]) -> tuple[Any, dict[str, float]]:
        import torch

        self.timers = {"encode": 0.0, "decode": 0.0}
        calls = self.denoiser_calls
        p = params[0]
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.pipe(
            prompt=[q.prompt for q in params],
            height=p.height,
            width=p.width,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(q.seed) for q in params],
            output_type="np",
        )
        _sync(self.device)
        total = time.perf_counter() - t0
        images = (out.images * 255).round().clip(0, 255).astype("uint8")
        denoise = total - self.timers["encode"] - self.timers["decode"]
        return images, {**self.timers, "denoise": denoise, "denoiser_calls": self.denoiser_calls - calls}


def distance(a: Any, b: Any) -> dict[str, Any]:
    """How far images ``a`` are from ``b`` (uint8 NHWC): mean and max absolute levels, PSNR (dB)."""
    import numpy as np

    finite = bool(np.isfinite(a.astype(np.float64)).all() and np.isfinite(b.astype(np.float64)).all())
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = float((diff**2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return {
        "mean_abs_levels": round(float(diff.mean()), 3),
        "max_abs_levels": int(diff.max()),
        "psnr_db": None if math.isinf(psnr) else round(psnr, 2),
        "finite": finite,
    }


def measure(runner: Any, case: Case, runs: int, **kw: Any) -> tuple[dict[str, Any], Any]:
    """One warm-up (graph capture, cuDNN autotune), then ``runs`` timed runs: the median run's numbers."""
    runner.run(_params(case, 1000), **kw)
    _peak_reset(runner.device)
    results = []
    for _ in range(runs):
        images, t = runner.run(_params(case, 1), **kw)
        results.append((sum(v for k, v in t.items() if k in ("encode", "denoise", "decode")), t, images))
    results.sort(key=lambda x: x[0])
    total, timings, images = results[(len(results) - 1) // 2]
    row = {
        "img_s": round(case.batch / total, 4),
        "s_per_batch": round(total, 4),
        "step_ms": round(timings["denoise"] * 1000 / case.steps, 3),
        "encode_ms": round(timings["encode"] * 1000, 3),
        "decode_ms": round(timings["decode"] * 1000, 3),
        "peak_gib": _peak_gib(runner.device),
        "weights_dtype": runner.weights_dtype,  # the loaded denoiser's, not the flag's
        "runs_s": [round(x[0], 4) for x in sorted(results, key=lambda x: x[0])],
    }
    for key in ("full_steps", "cached_steps", "encoder_calls", "denoiser_calls"):
        if key in timings:
            row[key] = timings[key]
    return row, images


def gpu_info(device: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def versions() -> dict[str, Any]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "diffusers", "transformers", "darkroom"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["python"] = sys.version.split()[0]
    return out


def parse_step_cache(text: str | None, family: str) -> Any:
    """``deepcache:3`` (interval), ``teacache:0.2`` (threshold), ``auto`` (DeepCache every 3rd
    step for UNet families, TeaCache at 0.2 for Flux); None or "" -> none."""
    from serve.stages.messages import StepCache

    if not text:
        return None
    if text == "auto":
        text = "teacache:0.2" if family == "flux" else "deepcache:3"
    kind, _, value = text.partition(":")
    if kind == "deepcache":
        return StepCache("deepcache", interval=int(value or 3))
    if kind == "teacache":
        return StepCache("teacache", threshold=float(value or 0.2))
    raise ValueError(f"--step-cache: deepcache:N or teacache:T, got {text!r}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.gpu_models import MODELS, build
    from serve.engines.torch_options import TorchOptions

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    t_start = time.monotonic()
    report: dict[str, Any] = {
        "gpu": gpu_info(device),
        "versions": versions(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "dtype": dtype,
        "results": [],
        "step_cache": [],
        "skipped": [],
    }
    engines = {"darkroom": TorchOptions(), "darkroom+graphs": TorchOptions(cuda_graphs=True)}
    if device.type != "cuda":
        engines.pop("darkroom+graphs")  # CUDA graphs need CUDA (the engine would run eagerly: not a new row)
    if args.compile:
        engines["darkroom+compile"] = TorchOptions(compile=True)
    for name in args.models.split(","):
        family, side = MODELS[name]
        cache = parse_step_cache(args.step_cache, family)
        side = 64 if args.tiny else side
        folder = build(name, Path(args.model_dir), tiny=args.tiny, device=str(device))
        diffusers_runner = DiffusersRunner(folder, family, str(device), dtype)
        runners: dict[str, Any] = {"diffusers": diffusers_runner}
        for label, options in engines.items():
            runners[label] = DarkroomRunner(folder, str(device), dtype, options)
        for batch in [int(b) for b in args.batches.split(",")]:
            case = Case(name, family, side, batch, args.steps)
            reference = None
            base_ips = None
            for label, runner in runners.items():
                if time.monotonic() - t_start > args.time_budget_s:
                    report["skipped"].append({"model": name, "batch": batch, "engine": label, "why": "time budget"})
                    continue
                row, images = measure(runner, case, args.runs)
                if label == "diffusers":
                    reference, base_ips = images, row["img_s"]
                elif reference is not None:
                    row["vs_diffusers"] = round(row["img_s"] / base_ips, 3)
                    row["parity_to_diffusers"] = distance(images, reference)
                report["results"].append(
                    {"model": name, "side": side, "batch": batch, "steps": args.steps, "engine": label, **row}
                )
                logger.info("%s %dpx batch %d %s: %.3f img/s", name, side, batch, label, row["img_s"])
                if cache is not None and label == args.cache_engine and time.monotonic() - t_start < args.time_budget_s:
                    cached_row, cached_images = measure(runner, case, args.runs, step_cache=cache)
                    report["step_cache"].append(
                        {
                            "model": name,
                            "side": side,
                            "batch": batch,
                            "steps": args.steps,
                            "engine": label,
                            "cache": {"kind": cache.kind, "interval": cache.interval, "threshold": cache.threshold},
                            **cached_row,
                            "uncached_img_s": row["img_s"],
                            "speedup": round(cached_row["img_s"] / row["img_s"], 3),
                            "distance_to_uncached": distance(cached_images, images),
                        }
                    )
        del runners, diffusers_runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where the JSON report goes")
    p.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl (and flux with --tiny)")
    p.add_argument("--batches", default="1,4,8", help="images per batch, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--runs", type=int, default=2, help="timed runs per row after one warm-up (the median is kept)")
    p.add_argument("--tiny", action="store_true", help="the tiny models at 64 px (CPU smoke test)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="also time darkroom with torch.compile (compiles per bucket)")
    p.add_argument(
        "--step-cache",
        default="auto",
        help="the step cache to measure: deepcache:N, teacache:T, auto (deepcache:3 for UNets, teacache:0.2 "
        "for Flux) or '' for none",
    )
    p.add_argument(
        "--cache-engine",
        default="darkroom",
        help="the engine row the step cache is measured against (default darkroom)",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="where models are built, once (default: gpu-bench-models/ in Darkroom's cache, DARKROOM_CACHE_DIR)",
    )
    p.add_argument(
        "--time-budget-s", type=float, default=420.0, help="rows not started within this many seconds are skipped"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model_dir is None:
        from serve.settings import Settings

        args.model_dir = Settings.from_env().cache_dir / "gpu-bench-models"
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(message)s")
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} ({len(report['results'])} rows, {len(report['step_cache'])} step-cache rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
