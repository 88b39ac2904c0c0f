"""One benchmark run: every level of the sweep against every target, one after the other.

Order (``--compare`` and ``--in-process`` included): for each level, each target in turn runs
its warm-up and then the level's whole measured schedule; the next target starts when the
previous one is done. Targets never share the machine at the same moment (on one box,
interleaving would make each compete with the other for the same cores), and both see the
identical schedule: the same bodies (prompts, seeds) at the same arrival offsets.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from bench.memory import MemorySampler
from bench.metrics import Metrics, Ratios, RequestRecord, compare, compute_metrics, measurement_window
from bench.runner import HttpTarget, Level, Progress, Target, closed_loop, open_loop, warm_up
from bench.schedule import Workload, arrival_offsets

logger = logging.getLogger(__name__)

ORDER = (
    "sequential per level: at each level every target runs its warm-up and the full measured "
    "schedule before the next target starts (same bodies, seeds and arrival offsets for all)"
)


@dataclass(frozen=True)
class TargetSpec:
    """A URL to drive over HTTP, or (``url=None``) the in-process pipeline on ``model``."""

    name: str
    url: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class BenchConfig:
    targets: tuple[TargetSpec, ...]
    levels: tuple[Level, ...]
    workload: Workload = field(default_factory=Workload)
    requests: int | None = 20  # measured requests per level and target ...
    duration_s: float | None = None  # ... or seconds of sending per level and target
    warmup: int = 2
    slo_ms: float | None = None
    arrival: str = "poisson"
    burstiness: float = 1.0
    timeout_s: float = 600.0
    ready_timeout_s: float = 300.0
    max_batch: int = 8  # in-process open-loop batch limit
    torch_threads: int | None = None  # in-process torch threads (None: torch's default)
    progress: bool = True
    # Duration runs (soaks): sample each local Serve replica's memory this often (0: never).
    memory_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("no targets")
        if len({t.name for t in self.targets}) != len(self.targets):
            raise ValueError(f"target names must differ: {[t.name for t in self.targets]}")
        if not self.levels:
            raise ValueError("no load levels")
        if (self.requests is None) == (self.duration_s is None):
            raise ValueError("give exactly one of requests and duration_s")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["levels"] = [{"mode": lv.mode, "value": lv.value, "label": lv.label} for lv in self.levels]
        out["workload"]["prompts"] = list(self.workload.prompts)
        out["order"] = ORDER
        return out


@dataclass
class TargetRun:
    """One target at one level."""

    target: str
    level: Level
    started_at: str
    metrics: Metrics
    records: list[RequestRecord]
    host_load: float | None = None  # 1-minute load average when the run started (others' work too)
    soak: dict[str, Any] | None = None  # duration runs: per minute, replica memory, verdict (bench/soak.py)


@dataclass
class LevelResult:
    level: Level
    runs: dict[str, TargetRun]
    ratios: dict[str, Ratios]  # other target -> its metrics over the first target's


@dataclass
class BenchResult:
    config: BenchConfig
    metadata: dict[str, Any]
    targets: dict[str, dict[str, Any]]
    levels: list[LevelResult]

    @property
    def baseline(self) -> str:
        return self.config.targets[0].name

    def to_json(self, include_records: bool = True) -> dict[str, Any]:
        levels = []
        for lr in self.levels:
            results = {}
            for name, run in lr.runs.items():
                entry: dict[str, Any] = {
                    "started_at": run.started_at,
                    "host_load_1min": run.host_load,
                    "metrics": run.metrics.to_json(),
                }
                if run.soak is not None:
                    entry["soak"] = run.soak
                if include_records:
                    entry["records"] = [r.to_json() for r in run.records]
                results[name] = entry
            levels.append(
                {
                    "level": {"mode": lr.level.mode, "value": lr.level.value, "label": lr.level.label},
                    "results": results,
                    "ratios_vs_" + self.baseline: {k: asdict(v) for k, v in lr.ratios.items()},
                }
            )
        return {
            "config": self.config.to_json(),
            "metadata": self.metadata,
            "targets": self.targets,
            "levels": levels,
        }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_metadata() -> dict[str, Any]:
    """Where and with what the run happened (nothing here imports torch or ray)."""
    status = _git("status", "--porcelain")
    return {
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "python": sys.version.split()[0],
        },
        "versions": {
            d: _version(d) for d in ("darkroom", "torch", "diffusers", "transformers", "ray", "httpx", "fastapi")
        },
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None},
        "argv": sys.argv,
    }


def make_target(spec: TargetSpec, config: BenchConfig) -> Target:
    if spec.url is not None:
        return HttpTarget(spec.url, name=spec.name, timeout_s=config.timeout_s, ready_timeout_s=config.ready_timeout_s)
    from bench.inprocess import InProcessTarget

    return InProcessTarget(spec.model, max_batch=config.max_batch, torch_threads=config.torch_threads, name=spec.name)


async def run_level(target: Target, level: Level, config: BenchConfig) -> TargetRun:
    """Warm up, then drive the level's measured schedule, then compute its metrics."""
    wl = config.workload
    target.configure(level)
    await warm_up(target, wl, config.warmup, level.concurrency or 1)
    started, load = _now(), _load1()
    sampler = None
    if config.duration_s is not None and config.memory_interval_s > 0 and isinstance(target, HttpTarget):
        sampler = MemorySampler(config.memory_interval_s)
        sampling = asyncio.create_task(sampler.run())
    if level.mode == "closed":
        total = config.requests
        progress = Progress(f"{target.name} {level.label}", total, enabled=config.progress)
        records = await closed_loop(
            target,
            wl.body,
            level.concurrency,
            count=config.requests,
            duration_s=config.duration_s,
            on_record=progress.update,
        )
    else:
        offsets = arrival_offsets(
            level.value,
            seed=wl.seed,
            count=config.requests,
            duration_s=config.duration_s,
            arrival=config.arrival,
            burstiness=config.burstiness,
        )
        progress = Progress(f"{target.name} {level.label}", len(offsets), enabled=config.progress)
        bodies = [wl.body(i) for i in range(len(offsets))]
        records = await open_loop(target, bodies, offsets, on_record=progress.update)
    progress.close()
    soak = None
    if sampler is not None:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
        from bench.soak import soak_report

        soak = soak_report(records, sampler.samples)
    metrics = compute_metrics(records, measurement_window(records), config.slo_ms)
    return TargetRun(target.name, level, started, metrics, records, load, soak)


async def arun_benchmark(config: BenchConfig) -> BenchResult:
    meta = {**machine_metadata(), "started_at": _now(), "order": ORDER}
    targets = [make_target(spec, config) for spec in config.targets]
    infos: dict[str, dict[str, Any]] = {}
    try:
        for target in targets:
            infos[target.name] = await target.start()
        levels: list[LevelResult] = []
        for level in config.levels:
            runs: dict[str, TargetRun] = {}
            for target in targets:
                run = await run_level(target, level, config)
                runs[target.name] = run
                m = run.metrics
                logger.info(
                    "%s %s: %d/%d ok, %.3f img/s, p50 %.0f ms, p99 %.0f ms",
                    target.name,
                    level.label,
                    m.ok,
                    m.requests,
                    m.throughput_ips,
                    m.latency_ms.p50,
                    m.latency_ms.p99,
                )
            base = runs[targets[0].name].metrics
            ratios = {t.name: compare(base, runs[t.name].metrics) for t in targets[1:]}
            levels.append(LevelResult(level, runs, ratios))
    finally:
        for target in targets:
            await target.close()
    meta["finished_at"] = _now()
    return BenchResult(config, meta, infos, levels)


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Run the whole sweep (blocking); write it out with ``bench.report.write_report``."""
    return asyncio.run(arun_benchmark(config))
