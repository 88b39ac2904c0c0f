"""The ``darkroom`` command line: ``generate``, ``tiny-model``, ``serve``, ``export``, ``bench``,
``train-demo``, ``eval``.

Each subcommand's heavy imports happen inside it, so ``darkroom --help`` is instant. Errors a
user can fix (a bad flag value, a missing model) print one line naming the flag and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from serve.console import configure_logging, missing_package_message, route_library_logs
from serve.errors import DarkroomError, InvalidRequestError

logger = logging.getLogger("darkroom")

# Flag <- request field, so an error about a field names the flag the user typed.
_FLAG_FOR_FIELD = {
    "prompt": "PROMPT",
    "negative_prompt": "--negative-prompt",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "scheduler": "--scheduler",
    "seed": "--seed",
    "size": "--size",
    "n": "--n",
    "output_format": "--output",
    "backend": "--backend",
    "batch": "--batch",
    "precision": "--precision",
    "format": "--format",
    "out": "--out",
    "model": "--model",
    "family": "--family",
    "true_cfg_scale": "--true-cfg",
    "variant": "--variant",
    "loras": "--lora",
}
_FORMAT_FOR_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _say(message: str) -> None:
    """Progress and results go to stderr/stdout of the CLI only; library code logs instead."""
    print(message, file=sys.stderr, flush=True)


def output_paths(output: Path, n: int) -> list[Path]:
    """PATH for one image; PATH's stem + ``-{i}`` + suffix for each of n > 1."""
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]


def cmd_generate(args: argparse.Namespace) -> int:
    from serve.api import Limits, parse_generation_request

    suffix = args.output.suffix.lower()
    if suffix not in _FORMAT_FOR_SUFFIX:
        raise InvalidRequestError("--output", str(args.output), "suffix must be .png, .jpg, .jpeg or .webp")
    body = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
        "seed": args.seed,
        "size": args.size,
        "n": args.n,
        "output_format": _FORMAT_FOR_SUFFIX[suffix],
        "true_cfg_scale": args.true_cfg,
        "loras": parse_lora_flags(args.lora) or None,
    }
    if body["loras"] and args.lora_dir is None:
        raise InvalidRequestError("--lora", args.lora[0], "needs --lora-dir DIR (the folder of NAME.safetensors)")
    request = parse_generation_request({k: v for k, v in body.items() if v is not None}, Limits())

    from serve.families import family_of
    from serve.model import read_model_info, resolve_source
    from serve.pipeline import Pipeline
    from serve.settings import Settings

    route_library_logs()
    source = resolve_source(args.model)
    info = read_model_info(source, args.family)
    family = family_of(info)
    params = request.to_params(default_size=info.native_size, limits=Limits(), defaults=family.request_defaults())
    family.check(params)
    settings = Settings.from_env()
    t0 = time.perf_counter()
    _say(f"loading {info.name} ({info.family}, {args.backend}) ...")
    pipe = Pipeline.load(
        source,
        backend=args.backend,
        device=args.device or settings.device,
        dtype=args.dtype or settings.dtype,
        family=args.family,
        loras=args.lora_dir,
    )
    if params.loras:
        from serve.lora import LoraCatalog

        LoraCatalog(pipe.denoiser.lora_repository, family).check(params.loras)  # names and fit, by flag
    load_s = time.perf_counter() - t0
    adapters = "".join(f", lora {n} {s:g}" for n, s in params.loras)
    _say(
        f"generating {params.n} image(s) {params.width}x{params.height}, {params.num_inference_steps} steps, "
        f"scheduler {family.scheduler_label(params.scheduler)}, seed {params.seed}{adapters} ..."
    )
    result = pipe.generate(params, progress=_progress_bar(params.num_inference_steps))
    paths = output_paths(args.output, params.n)
    for path, data in zip(paths, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(path)
    timings = {"load": load_s, **result.timings}
    print(f"seed: {params.seed}")
    if params.loras:
        print("loras: " + ", ".join(f"{n} {s:g}" for n, s in params.loras))
    print("timings: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
    return 0


def parse_lora_flags(values: Sequence[str] | None) -> list[dict[str, object]]:
    """``--lora watercolor:0.8 --lora ink`` -> ``[{"name": "watercolor", "scale": 0.8}, {"name": "ink"}]``."""
    out: list[dict[str, object]] = []
    for value in values or ():
        name, sep, scale = value.rpartition(":") if ":" in value else (value, "", "")
        item: dict[str, object] = {"name": name}
        if sep:
            try:
                item["scale"] = float(scale)
            except ValueError:
                raise InvalidRequestError("--lora", value, "must be NAME or NAME:SCALE, e.g. watercolor:0.8") from None
        out.append(item)
    return out


def _progress_bar(total: int) -> Callable[[int, int], None] | None:
    """A step progress bar on stderr when it is a terminal (silent in logs and CI)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="denoise", unit="step", file=sys.stderr, leave=False)

    def update(done: int, steps: int) -> None:
        bar.total = steps
        bar.n = done
        bar.refresh()
        if done >= steps:
            bar.close()

    return update


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from serve.tiny import write_tiny_model

    route_library_logs()
    t0 = time.perf_counter()
    path = write_tiny_model(args.dir, family=args.family, variant=args.variant, seed=args.seed)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    kind = args.family + (f" ({args.variant})" if args.variant else "")
    print(f"wrote tiny {kind} model to {path} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_tiny_loras(args: argparse.Namespace) -> int:
    from serve.lora.random import write_random_lora
    from serve.model import resolve_source

    route_library_logs()
    if args.count < 1 or args.count > 64:
        raise InvalidRequestError("--count", args.count, "must be 1..64")
    model = resolve_source(args.model)
    from serve.families import family_of
    from serve.model import read_model_info

    family = family_of(read_model_info(model))
    components = [family.denoiser_component] + (["text_encoder"] if args.text_encoder else [])
    args.dir.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        path = args.dir / f"{args.prefix}{i}.safetensors"
        write_random_lora(
            path,
            model,
            components=components,
            layout=args.layout,
            rank=args.rank,
            seed=args.seed + i,
            attention_only=args.targets == "attention",
        )
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, {args.layout}, {', '.join(components)})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import importlib.util

    # ONNX export and its check against torch need these: say so before minutes of work.
    for package in ("onnx", "onnxruntime", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(f"No module named '{package}'", name=package)
    from export import OPSET, export_model, read_manifest
    from serve.model import resolve_source

    route_library_logs()
    t0 = time.perf_counter()
    out = export_model(
        resolve_source(args.model),
        args.out,
        fmt=args.format,
        precision=args.precision,
        batch=args.batch,
        size=args.size,
        opset=args.opset or OPSET,
        optimize=not args.no_optimize,
        device=args.device,
        progress=_say,
        family=args.family,
    )
    manifest = read_manifest(out)
    for name, entry in manifest["components"].items():
        errors = entry.get("verify", {}).get("onnxruntime", {}).get("max_abs_error", {})
        line = f"{name}: onnx max abs error {max(errors.values()):.3g}" if errors else f"{name}: onnx"
        for engine in entry.get("engines", []):
            trt_errors = engine.get("verify", {}).get("max_abs_error", {})
            if trt_errors:
                line += f", tensorrt {engine['precision']} {engine['gpu_arch']} {max(trt_errors.values()):.3g}"
        print(line)
    print(f"exported to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from serve.tiny import FAMILIES as TINY_FAMILIES  # stdlib-only at import: --help stays instant

    parser = argparse.ArgumentParser(prog="darkroom", description="Serve text-to-image diffusion models.")
    parser.add_argument(
        "--log-level",
        default=None,
        help="logging level of the libraries' messages: debug, info, warning, error (default: "
        "DARKROOM_LOG_LEVEL or warning; the command's own progress lines always show)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images in-process (no serving stack)")
    gen.add_argument("prompt", help='what to draw, e.g. "a red fox in the snow"')
    gen.add_argument(
        "--model",
        default=None,
        help="diffusers folder, hub id, exported repository, or tiny (the random tiny model) "
        "(default: the shipped demo model)",
    )
    gen.add_argument("--negative-prompt", default=None, help="what not to draw (used with guidance > 1)")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps, 1..150 (default 50)")
    gen.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale, 0..30; <= 1 disables CFG (default: the model's own, 3 for the demo model, 7.5 for SD)",
    )
    gen.add_argument(
        "--scheduler",
        default=None,
        help="ddim, pndm, lms, euler, euler_a, heun, dpmpp_2m, unipc (default: the model's own)",
    )
    gen.add_argument("--seed", type=int, default=None, help="0..2**32-1 (default: random, printed)")
    gen.add_argument("--size", default=None, help="WxH, multiples of 8 (default: the model's native size)")
    gen.add_argument("--n", type=int, default=None, help="images to generate, 1..10 (default 1)")
    gen.add_argument(
        "--output",
        type=Path,
        default=Path("image.png"),
        help="output path; .png .jpg .webp (n > 1 writes STEM-0.png, STEM-1.png, ...)",
    )
    gen.add_argument(
        "--backend",
        default="auto",
        help="torch, onnxruntime, tensorrt or auto (default: auto = torch for a diffusers folder; "
        "for an exported repository tensorrt when engines for this GPU exist, else onnxruntime)",
    )
    gen.add_argument(
        "--family", default=None, help="sd, sdxl or flux (default: the one the model's model_index.json names)"
    )
    gen.add_argument(
        "--true-cfg",
        type=float,
        default=None,
        help="Flux only: guidance with --negative-prompt, as FluxPipeline's true_cfg_scale (> 1 turns it on)",
    )
    gen.add_argument(
        "--lora-dir",
        default=None,
        help="folder (or s3://bucket/prefix) of LoRA adapters, NAME.safetensors in diffusers or kohya layout",
    )
    gen.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="NAME[:SCALE]",
        help="apply adapter NAME from --lora-dir at SCALE (-4..4, default 1); repeat for up to 4",
    )
    gen.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N (default: DARKROOM_DEVICE, else CUDA when present)"
    )
    gen.add_argument(
        "--dtype",
        default=None,
        help="float32, float16, bfloat16 (default: DARKROOM_DTYPE, else fp16 on CUDA, fp32 on CPU)",
    )
    gen.set_defaults(func=cmd_generate)

    tiny = sub.add_parser(
        "tiny-model", help="write a tiny random-weight SD, SDXL or Flux model (diffusers layout, for tests)"
    )
    tiny.add_argument("dir", type=Path, help="folder to write (replaced if it exists)")
    tiny.add_argument(
        "--family",
        default="sd",
        choices=TINY_FAMILIES,
        help="model family: sd (StableDiffusionPipeline), sdxl (StableDiffusionXLPipeline), flux (FluxPipeline) "
        "(default sd)",
    )
    tiny.add_argument(
        "--variant",
        default=None,
        help="flux only: dev (guidance embedding) or schnell (no guidance) (default dev)",
    )
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    tiny.set_defaults(func=cmd_tiny_model)

    tl = sub.add_parser(
        "tiny-loras", help="write random-weight LoRA adapters for a model (an adapter repository for tests, bench)"
    )
    tl.add_argument("dir", type=Path, help="folder to write NAME.safetensors files into")
    tl.add_argument("--model", default=None, help="the model they are for (default: the shipped demo model)")
    tl.add_argument("--count", type=int, default=4, help="how many adapters (default 4)")
    tl.add_argument("--prefix", default="style", help="names are PREFIX0, PREFIX1, ... (default style)")
    tl.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    tl.add_argument(
        "--layout", default="diffusers", choices=("diffusers", "kohya"), help="key layout (default diffusers)"
    )
    tl.add_argument("--text-encoder", action="store_true", help="also adapt the (first) text encoder")
    tl.add_argument(
        "--targets",
        default="attention",
        choices=("attention", "all"),
        help="denoiser layers: attention projections (to_q/k/v/out, as diffusers' LoRA training scripts) or "
        "all of attention, feed-forward and projections (default attention)",
    )
    tl.add_argument("--seed", type=int, default=0, help="seed of the first adapter's weights (default 0)")
    tl.set_defaults(func=cmd_tiny_loras)

    exp = sub.add_parser("export", help="export a model to ONNX (and TensorRT) engines with a manifest")
    exp.add_argument(
        "--model", default=None, help="diffusers folder, hub id, or tiny (default: the shipped demo model)"
    )
    exp.add_argument("--out", type=Path, required=True, help="model repository folder to write")
    exp.add_argument("--format", default="onnx", help="onnx, or tensorrt (ONNX + TensorRT engines; needs a GPU)")
    exp.add_argument(
        "--precision",
        default="fp32",
        help="fp32 or fp16 (fp16 ONNX needs CUDA; tensorrt fp16 builds from fp32 ONNX) (default fp32)",
    )
    exp.add_argument(
        "--batch", default="1:1:4", help="images per engine call MIN:OPT:MAX; CFG doubles it (default 1:1:4)"
    )
    exp.add_argument(
        "--size",
        default=None,
        help="image side pixels MIN:OPT:MAX, each S or WxH, e.g. 256:512:768 or 512x384:512x512:768x768 "
        "(default: native/2 : native : 2 x native)",
    )
    exp.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    exp.add_argument("--no-optimize", action="store_true", help="skip graph optimisation (onnxslim)")
    exp.add_argument("--device", default=None, help="cpu or cuda for the export (default: CUDA when present)")
    exp.add_argument(
        "--family", default=None, help="sd, sdxl or flux (default: the one the model's model_index.json names)"
    )
    exp.set_defaults(func=cmd_export)

    from serve.demo.cli import add_parsers as add_demo_parsers

    add_demo_parsers(sub)

    # Subcommands that need Ray or heavier packages register themselves from their packages.
    from bench.cli import add_parser as add_bench_parser
    from deployments.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from serve.settings import Settings

    configure_logging(args.log_level or Settings.from_env().log_level)
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("serve", "export", "deployments", "bench"):
            raise  # our own module: a bug, not an install problem
        print(f"darkroom: error: {missing_package_message(exc)}", file=sys.stderr)
        return 2
    except InvalidRequestError as exc:
        flag = _FLAG_FOR_FIELD.get(exc.field, exc.field)
        if exc.field.startswith("loras["):  # e.g. loras[1].scale: the second --lora
            flag = f"--lora ({exc.field})"
        print(f"darkroom: error: {flag}: {exc.reason} (got {exc.value!r})", file=sys.stderr)
        return 2
    except DarkroomError as exc:
        print(f"darkroom: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
