"""Per-component latency, torch vs ONNX Runtime, side by side in one run (a benchmark, not a test).

    python -m bench.component_latency --model DIR [--model DIR2] --out bench/results/component_latency.json

For each model (a diffusers folder): export it to ONNX (``export_model``, into ``--work-dir``;
an unchanged export is reused by content), load each component with the ``torch`` and the
``onnxruntime`` backend on the CPU, and time ``engine.run`` -- what a stage pays, tensor
conversions included -- on the same random inputs: ``--warmup`` untimed calls, then ``--repeats``
timed ones; median and p90 in ms. Also records the max abs difference between the two outputs.

``--write-mid-model DIR`` writes a mid-size random-weight SD-style model (SD 1.x's architecture
at reduced width, 256 px native) and exits; benchmark it like any other folder.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    min_ms: float
    samples: int


@dataclass(frozen=True)
class CaseResult:
    model: str
    component: str
    batch: int
    size: str  # image WxH the shapes correspond to
    shapes: dict[str, list[int]]
    torch: Timing
    onnxruntime: Timing
    speedup: float  # torch median / onnxruntime median
    max_abs_diff: float


def summarize(samples_ms: list[float]) -> Timing:
    """Median and p90 (nearest-rank) of the timed calls, e.g. [1..10] ms -> median 5.5, p90 9."""
    ordered = sorted(samples_ms)
    rank = max(1, -(-9 * len(ordered) // 10))  # ceil(0.9 n)
    return Timing(round(statistics.median(ordered), 3), round(ordered[rank - 1], 3), round(ordered[0], 3), len(ordered))


def time_calls(fn: Any, warmup: int, repeats: int) -> Timing:
    """``warmup`` untimed calls, then ``repeats`` timed ones.

    Backends are timed in separate blocks, not interleaved call by call: both torch (OpenMP) and
    ONNX Runtime keep their worker threads spinning for a while after a call, and on a 2-core
    machine interleaving made each backend pay for the other's spinning (a 25 ms text encoder
    call measured 1.3 s interleaved).
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return summarize(samples)


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    import onnxruntime
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],  # other tenants' load skews timings
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "diffusers": metadata.version("diffusers"),
    }


def cases(info, batches: list[int], sizes: list[tuple[int, int]]) -> list[tuple[str, int, tuple[int, int]]]:
    """(component, batch, (width, height)) to time; the text encoder does not depend on size."""
    out = [("text_encoder", b, info.native_size) for b in batches]
    for w, h in sizes:
        out += [("unet", b, (w, h)) for b in batches]
        out += [("vae_decoder", b, (w, h)) for b in batches[:1]]
    return out


def input_shapes(info, spec, batch: int, size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """The component's input shapes at ``batch`` images of ``size`` (its spec's named axes resolved)."""
    f = info.vae_scale_factor
    dims = {"batch": batch, "latent_height": size[1] // f, "latent_width": size[0] // f}
    return {t.name: t.resolve(dims) for t in spec.inputs}


def bench_model(model: Path, work_dir: Path, args: argparse.Namespace) -> list[CaseResult]:
    import torch

    from export import export_model
    from serve.engines import load_engine
    from serve.engines.specs import random_inputs
    from serve.model import read_model_info

    info = read_model_info(model)
    native = info.native_size[0]
    sizes = [(int(s), int(s)) for s in args.sizes.split(",")] if args.sizes else [info.native_size]
    batches = [int(b) for b in args.batches.split(",")]
    lo, hi = min(min(s) for s in sizes), max(max(s) for s in sizes)
    repo = export_model(
        model,
        work_dir / f"{model.name}-onnx",
        batch=f"1:1:{max(batches)}",
        size=f"{min(lo, native)}:{native}:{max(hi, native)}",
        progress=lambda m: logger.info("%s", m),
    )
    cpu = torch.device("cpu")
    results = []
    engines: dict[tuple[str, str], Any] = {}
    repo_info = read_model_info(repo)
    for component, batch, size in cases(info, batches, sizes):
        for backend, source in (("torch", info), ("onnxruntime", repo_info)):
            if (backend, component) not in engines:
                engines[(backend, component)] = load_engine(backend, source, component, cpu, torch.float32)
        te, oe = engines[("torch", component)], engines[("onnxruntime", component)]
        shapes = input_shapes(info, oe.spec, batch, size)
        inputs = random_inputs(oe.spec, shapes, vocab=_vocab(model))
        timings = {
            name: time_calls(functools.partial(engine.run, **inputs), args.warmup, args.repeats)
            for name, engine in (("torch", te), ("onnxruntime", oe))
        }
        with torch.inference_mode():
            want, got = te.run(**inputs), oe.run(**inputs)
            diff = max(float((want[k].float() - got[k].float()).abs().max()) for k in want)
        result = CaseResult(
            model=model.name,
            component=component,
            batch=batch,
            size=f"{size[0]}x{size[1]}",
            shapes={k: list(v) for k, v in shapes.items()},
            torch=timings["torch"],
            onnxruntime=timings["onnxruntime"],
            speedup=round(timings["torch"].median_ms / timings["onnxruntime"].median_ms, 2),
            max_abs_diff=diff,
        )
        print(
            f"{model.name:>14} {component:>12} b={batch} {result.size:>8}: torch {result.torch.median_ms:9.2f} ms "
            f"(p90 {result.torch.p90_ms:9.2f})  onnxruntime {result.onnxruntime.median_ms:9.2f} ms "
            f"(p90 {result.onnxruntime.p90_ms:9.2f})  x{result.speedup:.2f}  diff {diff:.1e}",
            flush=True,
        )
        results.append(result)
    return results


def _vocab(model: Path) -> int:
    return int(json.loads((model / "text_encoder" / "config.json").read_text()).get("vocab_size", 1000))


def write_mid_model(out: Path) -> Path:
    """SD 1.x's UNet/VAE/CLIP architectures at reduced width, random weights, 256 px native.

    UNet (128, 256, 512, 512) x 2 layers (SD: 320..1280): ~1/6 of SD's UNet FLOPs per pixel;
    VAE (64, 128, 256, 256) (SD: 128..512); CLIP 6 layers x 512 (SD: 12 x 768). The tokenizer
    and scheduler are the tiny model's.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from serve.tiny import write_tiny_model

    out = write_tiny_model(out)
    vocab = _vocab(out)
    torch.manual_seed(0)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=512,
            intermediate_size=2048,
            num_attention_heads=8,
            num_hidden_layers=6,
            max_position_embeddings=77,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    ).save_pretrained(out / "text_encoder")
    UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=512,
        attention_head_dim=8,
    ).save_pretrained(out / "unet")
    AutoencoderKL(
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
    ).save_pretrained(out / "vae")
    (out / "darkroom_tiny.json").unlink(missing_ok=True)  # not the tiny model any more
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.component_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", type=Path, help="diffusers folder (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/component_latency.json"))
    parser.add_argument("--work-dir", type=Path, default=None, help="where exports go (default: a temp folder)")
    parser.add_argument("--batches", default="1,2", help="batch sizes, comma-separated (default 1,2)")
    parser.add_argument("--sizes", default=None, help="square image sides, comma-separated (default: native)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--write-mid-model", type=Path, default=None, help="write the mid-size model and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.write_mid_model:
        print(write_mid_model(args.write_mid_model))
        return 0
    if not args.model:
        parser.error("--model is required (or --write-mid-model)")
    t0 = time.perf_counter()
    machine_before = machine_info()
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        results = [r for model in args.model for r in bench_model(model.resolve(), work, args)]
    report = {
        "benchmark": "component_latency",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"model": [str(m) for m in args.model]},
        "machine": machine_before | {"loadavg_1_5_15_end": [round(x, 2) for x in os.getloadavg()]},
        "wall_s": round(time.perf_counter() - t0, 1),
        "results": [asdict(r) for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
