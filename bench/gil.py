"""Eager vs traced denoiser beside a busy Python thread: what the GIL costs a replica's model
thread (a benchmark, not a test; CPU, no Ray).

    python -m bench.gil --out bench/results/<date>-jit-gil/report.json [--model tiny] [--pairs 6] \
        [--burst-ms 1] [--switch-interval-ms 5,0.5]

A colocated replica runs the model in one thread and serves HTTP (and Ray's request path) in
others of the same process. An eager PyTorch forward of a small model is mostly Python between
short kernels, so it needs the GIL almost all the time and takes turns with those threads; a
TorchScript trace (``TorchOptions(jit=True)``) runs its forward in C++ without the GIL. This
times ``Pipeline.generate_batch`` (``--batch`` requests, ``--steps`` steps, CFG) with the eager
and the traced pipeline, alternating batch by batch (``--pairs`` pairs, so a slow spell of the
machine hits both alike), first alone, then beside a thread that does Python work half the time
(JSON round trips for ``--burst-ms``, then as long asleep: a stand-in for a replica's event
loop), once per ``--switch-interval-ms`` (``sys.setswitchinterval``: how long a thread that wants
the GIL waits before it asks the holder to drop it; Python's default is 5 ms). Reports img/s per
pipeline and condition, the traced/eager speed-up per pair (median and range) and how much work
the background thread got done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

ALONE = "alone"


def conditions(burst_ms: float, intervals_ms: list[float]) -> list[tuple[str, float | None]]:
    """``(name, switch interval ms)`` per condition: alone (Python's default interval), then beside
    the half-busy thread once per interval."""
    return [(ALONE, None)] + [
        (f"beside a Python thread busy {burst_ms:g} ms of every {2 * burst_ms:g}, switch interval {si:g} ms", si)
        for si in intervals_ms
    ]


class HalfBusyThread:
    """Python work for ``burst_s``, then as long asleep, until stopped; counts its units of work."""

    def __init__(self, burst_s: float = 0.001) -> None:
        self.burst_s = burst_s
        self.units = 0
        self._stop = threading.Event()
        self._doc = {f"k{i}": list(range(20)) for i in range(50)}
        self._thread = threading.Thread(target=self._run, name="half-busy", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < self.burst_s:
                json.loads(json.dumps(self._doc))
                self.units += 1
            time.sleep(self.burst_s)

    def __enter__(self) -> HalfBusyThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def run(
    model: str | None,
    *,
    batch: int,
    steps: int,
    pairs: int,
    threads: int,
    burst_ms: float = 1.0,
    intervals_ms: list[float] | None = None,
) -> dict[str, Any]:
    import sys

    import torch

    from bench.machine import machine_metadata
    from serve.api.schemas import parse_generation_request
    from serve.engines.torch_options import TorchOptions
    from serve.gil import set_gil_switch_interval
    from serve.model import read_model_info, resolve_source
    from serve.pipeline import Pipeline

    torch.set_num_threads(threads)
    source = resolve_source(model)
    size = read_model_info(source).native_size
    pipes = {"eager": Pipeline.load(source), "jit": Pipeline.load(source, torch_options=TorchOptions(jit=True))}
    params = [
        parse_generation_request({"prompt": f"a red square {i}", "seed": i, "num_inference_steps": steps}).to_params(
            default_size=size
        )
        for i in range(batch)
    ]
    for pipe in pipes.values():  # traces made, profiling runs done, caches warm
        for _ in range(2):
            pipe.generate_batch(params)
    results: dict[str, Any] = {}
    default_interval = sys.getswitchinterval()
    for condition, interval_ms in conditions(burst_ms, intervals_ms or [default_interval * 1000]):
        background = HalfBusyThread(burst_ms / 1000) if condition != ALONE else None
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in pipes}
        set_gil_switch_interval(interval_ms)
        with background or contextlib.nullcontext():
            for _ in range(pairs):
                for name, pipe in pipes.items():
                    units = background.units if background else 0
                    t0 = time.perf_counter()
                    pipe.generate_batch(params)
                    seconds = time.perf_counter() - t0
                    done = (background.units - units) if background else 0
                    runs[name].append({"s": seconds, "background_units_per_s": done / seconds})
        speedups = [e["s"] / j["s"] for e, j in zip(runs["eager"], runs["jit"], strict=True)]
        results[condition] = {
            name: {
                "median_s_per_batch": round(statistics.median(r["s"] for r in rs), 4),
                "img_per_s": round(batch / statistics.median(r["s"] for r in rs), 2),
                "runs_s": [round(r["s"], 4) for r in rs],
                "background_units_per_s": round(statistics.median(r["background_units_per_s"] for r in rs)),
            }
            for name, rs in runs.items()
        }
        sys.setswitchinterval(default_interval)
        results[condition]["switch_interval_ms"] = interval_ms if interval_ms is not None else default_interval * 1000
        results[condition]["jit_speedup"] = {
            "median": round(statistics.median(speedups), 3),
            "min": round(min(speedups), 3),
            "max": round(max(speedups), 3),
        }
    return {
        "benchmark": "bench.gil",
        "machine": machine_metadata(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "workload": {"model": model or "darkroom-demo", "size": list(size), "batch": batch, "steps": steps},
        "background_burst_ms": burst_ms,
        "pairs": pairs,
        "order": "eager and traced pipelines alternate batch by batch; alone first, then beside the thread",
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gil", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model (default: tiny, the model issue 14's goals name)")
    p.add_argument("--batch", type=int, default=8, help="requests per batch (default 8)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--pairs", type=int, default=6, help="eager/traced pairs per condition (default 6)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, a colocated replica's)")
    p.add_argument(
        "--burst-ms", type=float, default=1.0, help="the background thread's work (and sleep) slice (default 1)"
    )
    p.add_argument(
        "--switch-interval-ms",
        default=None,
        help="GIL switch intervals to run the busy condition with, comma-separated (default: Python's, 5)",
    )
    p.add_argument("--out", type=Path, required=True, help="the JSON report to write")
    args = p.parse_args(argv)
    for flag in ("batch", "steps", "pairs", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if not args.burst_ms > 0:
        p.error("--burst-ms must be > 0")
    intervals = None
    if args.switch_interval_ms:
        try:
            intervals = [float(v) for v in args.switch_interval_ms.split(",") if v.strip()]
        except ValueError:
            p.error(f"--switch-interval-ms: not a comma-separated list of numbers: {args.switch_interval_ms!r}")
        if not intervals or any(v <= 0 for v in intervals):
            p.error("--switch-interval-ms: every interval must be > 0")
    report = run(
        args.model,
        batch=args.batch,
        steps=args.steps,
        pairs=args.pairs,
        threads=args.threads,
        burst_ms=args.burst_ms,
        intervals_ms=intervals,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for condition, r in report["results"].items():
        s = r["jit_speedup"]
        print(
            f"{condition}: eager {r['eager']['img_per_s']} img/s, traced {r['jit']['img_per_s']} img/s; "
            f"traced / eager {s['median']}x ({s['min']}-{s['max']})"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
