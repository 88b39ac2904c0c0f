"""``darkroom train-demo`` and ``darkroom eval``: the demo model's subcommands (registered by
``serve.cli.build_parser``; heavy imports inside each command, so ``darkroom --help`` stays instant)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve.cli import _progress_bar, _say
from serve.errors import InvalidRequestError


def _validated(model_cls, values: dict, flags: dict[str, str]):
    """A pydantic config from CLI values; the first invalid value becomes an error naming its flag."""
    from pydantic import ValidationError

    try:
        return model_cls(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        raise InvalidRequestError(flags.get(field, field), err.get("input"), err["msg"]) from None


def _phase_progress() -> Callable[[str, int, int, dict[str, float]], None]:
    """tqdm bars per phase on a terminal; otherwise a line every 5% (readable in a log file)."""
    bars: dict[str, object] = {}
    started: dict[str, float] = {}
    tty = sys.stderr.isatty()

    def update(phase: str, done: int, total: int, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{k} {v:.3g}" for k, v in metrics.items())
        if tty:
            from tqdm import tqdm

            bar = bars.get(phase)
            if bar is None:
                bar = bars[phase] = tqdm(total=total, initial=done - 1, desc=phase, file=sys.stderr, unit="step")
            bar.set_postfix_str(shown, refresh=False)
            bar.update(1)
            if done >= total:
                bar.close()
            return
        t = started.setdefault(phase, time.perf_counter())
        if done == total or done % max(1, total // 20) == 0:
            _say(f"{phase}: {done}/{total} ({time.perf_counter() - t:.0f} s) {shown}")

    return update


_TRAIN_FLAGS = {
    "seed": "--seed",
    "vae_steps": "--vae-steps",
    "unet_steps": "--unet-steps",
    "dataset_size": "--dataset-size",
    "batch_size": "--batch-size",
    "unet_foreground_weight": "--unet-foreground-weight",
    "unet_text_time_embedding": "--unet-text-time-embedding",
    "timestep_sampling": "--timestep-sampling",
    "unet_channels": "--unet-channels",
    "checkpoint_every": "--checkpoint-every",
}


def cmd_train_demo(args: argparse.Namespace) -> int:
    from serve.demo.train import TrainConfig, train_demo

    config = _validated(TrainConfig, {f: getattr(args, f) for f in _TRAIN_FLAGS}, _TRAIN_FLAGS)
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidRequestError("--threads", args.threads, "must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    path = train_demo(args.out, config, progress=_phase_progress())
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote demo model to {path} ({size / 1e6:.1f} MB)")
    print(f"this run: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU")
    return 0


_EVAL_FLAGS = {
    "split": "--split",
    "captions": "--captions",
    "steps": "--steps",
    "guidance": "--guidance",
    "scheduler": "--scheduler",
    "seed": "--seed",
    "batch": "--batch",
    "grid": "--grid",
}


def cmd_eval(args: argparse.Namespace) -> int:
    from serve.demo.evaluate import EvalConfig, evaluate, write_report
    from serve.model import resolve_source
    from serve.params import SCHEDULER_NAMES

    config = _validated(EvalConfig, {f: getattr(args, f) for f in _EVAL_FLAGS}, _EVAL_FLAGS)
    if config.scheduler is not None and config.scheduler not in SCHEDULER_NAMES:
        raise InvalidRequestError("--scheduler", config.scheduler, f"must be one of {', '.join(SCHEDULER_NAMES)}")
    source = resolve_source(args.model)
    _say(f"generating {config.captions} {config.split} captions, {config.steps} steps ...")
    report, images = evaluate(
        source,
        config,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        progress=_progress_bar(config.captions),
    )
    folder = write_report(args.out, report, images)
    rates = report["adherence"]
    seconds = report["seconds_per_image"]
    print(f"{report['model']}: {report['n']} {config.split} captions, {config.steps} steps, {seconds:.3f} s/image")
    for name, rate in rates.items():
        print(f"  {name:<10} {rate:6.1%}")
    print(f"report: {folder / 'report.json'}")
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``train-demo`` and ``eval`` on the ``darkroom`` subparsers."""
    train = sub.add_parser(
        "train-demo",
        help="train the demo model on synthetic scenes into OUT (resumes from OUT's checkpoints)",
        description="Train the demo model (SD 1.x architecture at 64x64) on captioned synthetic scenes. "
        "Rerun the same command to resume an interrupted run. The defaults take about an hour on 2 CPU cores.",
    )
    train.add_argument("out", type=Path, help="run folder: checkpoints, and the model in OUT/model")
    train.add_argument("--seed", type=int, default=None, help="seed of data, initial weights and noise (default 0)")
    train.add_argument("--vae-steps", type=int, default=None, help="VAE training steps (default 2000)")
    train.add_argument("--unet-steps", type=int, default=None, help="UNet + text encoder training steps (default 8000)")
    train.add_argument(
        "--dataset-size", type=int, default=None, help="scenes encoded once into latents for the UNet (default 16000)"
    )
    train.add_argument("--batch-size", type=int, default=None, help="latents per UNet step (default 32)")
    train.add_argument(
        "--unet-foreground-weight",
        type=float,
        default=None,
        help="extra UNet loss weight of latent cells under shapes (default 0: plain MSE)",
    )
    train.add_argument(
        "--unet-text-time-embedding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add a pooled caption embedding to the UNet's timestep embedding (default on)",
    )
    train.add_argument(
        "--unet-channels",
        type=lambda text: tuple(int(c) for c in text.split(",")),
        default=None,
        help="UNet channels at 16x16,8x8,4x4 latent pixels (default 48,64,64)",
    )
    train.add_argument(
        "--timestep-sampling", default=None, help="high (default: density rising with the noise level) or uniform"
    )
    train.add_argument(
        "--checkpoint-every", type=int, default=None, help="steps between checkpoints, in each phase (default 250)"
    )
    train.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is faster on a busy machine)"
    )
    train.set_defaults(func=cmd_train_demo)

    ev = sub.add_parser(
        "eval",
        help="measure prompt adherence (colour, shape, position, ...) on held-out captions",
        description="Generate held-out captions and read colours, shapes and positions back from the images.",
    )
    ev.add_argument("--model", default=None, help="model folder or name (default: the shipped demo model)")
    ev.add_argument(
        "--split",
        default=None,
        help="held-out (default: caption combinations never trained on) or seen (training combinations)",
    )
    ev.add_argument("--captions", type=int, default=None, help="held-out captions to generate (default 150)")
    ev.add_argument("--steps", type=int, default=None, help="denoising steps, 1..150 (default 20)")
    ev.add_argument("--guidance", type=float, default=None, help="guidance scale, 0..30 (default 3)")
    ev.add_argument("--scheduler", default=None, help="ddim, pndm, lms, euler, euler_a, heun, dpmpp_2m, unipc")
    ev.add_argument("--seed", type=int, default=None, help="caption order seed; image i uses seed + i (default 0)")
    ev.add_argument("--batch", type=int, default=None, help="requests per pipeline call (default 8)")
    ev.add_argument("--grid", type=int, default=None, help="images in the sample grid (default 24; 0: none)")
    ev.add_argument("--out", type=Path, default=Path("demo-eval"), help="report folder (default ./demo-eval)")
    ev.add_argument("--backend", default="auto", help="torch, onnxruntime, tensorrt or auto (default auto)")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    ev.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: fp16 on CUDA, fp32 on CPU)")
    ev.set_defaults(func=cmd_eval)
