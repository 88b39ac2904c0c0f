"""One benchmark run: rounds of phases, each phase every level of the sweep against its targets.

Order: the served targets (``--url``, ``--compare``) and the in-process baseline never run at the
same time, nor with the other alive on the machine when the bench controls it. A round is a
served phase then an in-process phase (A/B); ``--rounds N`` repeats it (A/B/A/B...), and every
ratio is computed within a round (the two phases ran back to back) and reported as the median
and range over the rounds. With ``--serve CONFIG`` the bench starts the served app for each
served phase and stops it (its Ray cluster included) before the in-process phase; without it,
the in-process phase refuses to run while any serving cluster is alive on this machine (see
``bench/cluster.py``). Within a phase, at each level every target runs its warm-up and the level's
whole measured schedule before the next target starts; all targets see the identical schedule:
the same bodies (prompts, seeds) at the same arrival offsets.

With ``--freeze`` the app is started once and frozen, not stopped, for each in-process run, the
two alternating at every level (``bench/frozen.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.goals import bench_goals
from bench.machine import load1, machine_metadata, now_iso
from bench.memory import MemorySampler
from bench.metrics import Metrics, RequestRecord, Spread, compute_metrics, measurement_window, ratio_spreads
from bench.runner import HttpTarget, Level, Progress, Target, closed_loop, open_loop, warm_up
from bench.schedule import Workload, arrival_offsets

logger = logging.getLogger(__name__)

ORDER = (
    "phases per round: the served targets (each level: every target's warm-up and measured schedule in "
    "turn), then the in-process baseline alone (no serving cluster alive on the machine); ratios within "
    "a round, median and range over the rounds (same bodies, seeds and arrival offsets for all)"
)


@dataclass(frozen=True)
class TargetSpec:
    """A URL to drive over HTTP (optionally streaming), or (``url=None``) the in-process pipeline on ``model``."""

    name: str
    url: str | None = None
    model: str | None = None
    #: Send each request with one adapter drawn from the workload's ``loras``.
    loras: bool = False
    stream: bool = False  # HTTP targets: every request streams (stream: true) ...
    partial_images: int = 0  # ... with this many partial images
    torch_threads: int | None = None  # in-process: this target's torch threads (None: BenchConfig's)


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
    torch_threads: int | None = None  # in-process torch threads of targets without their own (None: torch's)
    #: The served app's torch backend options and step cache (``AppConfig.torch``/``step_cache`` as
    #: dicts), so the in-process baseline runs the same engines (None: the defaults).
    torch_options: dict[str, Any] | None = None
    step_cache: dict[str, Any] | None = None
    progress: bool = True
    # Duration runs (soaks): sample each local Serve replica's memory this often (0: never).
    memory_interval_s: float = 10.0
    rounds: int = 1  # served phase + in-process phase, repeated (A/B/A/B)
    serve_config: str | None = None  # a Serve config the bench starts for each served phase and stops after
    serve_port: int | None = None  # its HTTP port (None: the config's)
    serve_model: str | None = None  # darkroom serve --model: every app of the config serves this model
    gil_switch_interval_ms: float | None = None  # the app's (AppConfig); the in-process phase runs with it too
    serve_log: str | None = None  # where the started server's output goes
    #: Start the served app once and freeze it (SIGSTOP) for each in-process run instead of
    #: stopping it; served and in-process then alternate at every level of every round.
    freeze_served: bool = False
    #: Ray sessions alive before the bench that the alone-check ignores (tests running beside their
    #: own session-wide cluster use it; the CLI never sets it).
    ignore_sessions: tuple[str, ...] = ()
    #: Adapters the "+loras" targets' requests draw from (one each, seeded: ``Workload.loras``).
    loras: tuple[str, ...] = ()
    #: A served target every other served one is checked against (img/s >= it closed, p50 <= it
    #: open); None: the first served target against each of the others.
    reference: str | None = None

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
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.serve_config is not None and not any(t.url for t in self.targets):
            raise ValueError("serve_config needs a served target (a URL on the server it starts)")
        if self.freeze_served and (self.serve_config is None or not self.in_process):
            raise ValueError("freezing the served app needs a server the bench starts and an in-process baseline")
        if self.reference is not None and self.reference not in {t.name for t in self.served}:
            raise ValueError(f"reference {self.reference!r} is not a served target: {[t.name for t in self.served]}")

    @property
    def served(self) -> tuple[TargetSpec, ...]:
        return tuple(t for t in self.targets if t.url is not None)

    @property
    def in_process(self) -> tuple[TargetSpec, ...]:
        return tuple(t for t in self.targets if t.url is None)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["levels"] = [{"mode": lv.mode, "value": lv.value, "label": lv.label} for lv in self.levels]
        out["workload"]["prompts"] = list(self.workload.prompts)
        out["order"] = self.order
        return out

    @property
    def order(self) -> str:
        if self.freeze_served:
            from bench.frozen import ORDER_FROZEN

            return ORDER_FROZEN
        return ORDER


def phase_plan(rounds: int, served: bool, in_process: bool) -> list[tuple[int, str]]:
    """``(round, kind)`` in order: ``phase_plan(2, True, True)`` -> served, in-process, served,
    in-process (A/B/A/B), rounds numbered from 1."""
    kinds = (["served"] if served else []) + (["in-process"] if in_process else [])
    return [(r, kind) for r in range(1, rounds + 1) for kind in kinds]


@dataclass
class TargetRun:
    """One target at one level in one round."""

    target: str
    level: Level
    started_at: str
    metrics: Metrics
    records: list[RequestRecord]
    host_load: float | None = None  # 1-minute load average when the run started (others' work too)
    round: int = 1
    #: CPU-ms per image by process (the target's processes and the bench client), when measured.
    cpu_ms_per_image: dict[str, float] | None = None
    soak: dict[str, Any] | None = None  # duration runs: per minute, replica memory, verdict (bench/soak.py)


@dataclass
class LevelResult:
    level: Level
    runs: dict[str, list[TargetRun]]  # target -> its run in each round
    ratios: dict[str, dict[str, Spread]]  # other target -> {throughput, goodput, p50, p99}: other / first

    def run(self, target: str, round_no: int = 1) -> TargetRun:
        return self.runs[target][round_no - 1]


@dataclass
class BenchResult:
    config: BenchConfig
    metadata: dict[str, Any]
    targets: dict[str, dict[str, Any]]
    levels: list[LevelResult]
    phases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def baseline(self) -> str:
        return self.config.targets[0].name

    def goals(self) -> list[dict[str, Any]]:
        """Issue 14's (and 12's) checks over this run's rounds (``bench.goals``)."""
        return bench_goals(self.config, self.levels)

    def to_json(self, include_records: bool = True) -> dict[str, Any]:
        levels = []
        for lr in self.levels:
            results = {}
            for name, runs in lr.runs.items():
                entries = []
                for run in runs:
                    entry: dict[str, Any] = {
                        "round": run.round,
                        "started_at": run.started_at,
                        "host_load_1min": run.host_load,
                        "metrics": run.metrics.to_json(),
                        "cpu_ms_per_image": run.cpu_ms_per_image,
                    }
                    if run.soak is not None:
                        entry["soak"] = run.soak
                    if include_records:
                        entry["records"] = [r.to_json() for r in run.records]
                    entries.append(entry)
                results[name] = {"rounds": entries}
            levels.append(
                {
                    "level": {"mode": lr.level.mode, "value": lr.level.value, "label": lr.level.label},
                    "results": results,
                    "ratios_vs_" + self.baseline: {
                        k: {key: asdict(v) for key, v in spreads.items()} for k, spreads in lr.ratios.items()
                    },
                }
            )
        return {
            "config": self.config.to_json(),
            "metadata": self.metadata,
            "targets": self.targets,
            "phases": self.phases,
            "goals": self.goals(),
            "levels": levels,
        }


def make_target(spec: TargetSpec, config: BenchConfig) -> Target:
    if spec.url is not None:
        return HttpTarget(
            spec.url,
            name=spec.name,
            timeout_s=config.timeout_s,
            ready_timeout_s=config.ready_timeout_s,
            stream=spec.stream,
            partial_images=spec.partial_images,
        )
    from bench.inprocess import InProcessTarget

    return InProcessTarget(
        spec.model,
        max_batch=config.max_batch,
        torch_threads=spec.torch_threads or config.torch_threads,
        name=spec.name,
        torch_options=config.torch_options,
        step_cache=config.step_cache,
        gil_switch_interval_ms=config.gil_switch_interval_ms,
    )


async def run_level(
    target: Target,
    level: Level,
    config: BenchConfig,
    round_no: int = 1,
    watch: Callable[[], list[int]] | None = None,
    *,
    loras: bool = False,
) -> TargetRun:
    """Warm up, then drive the level's measured schedule, then compute its metrics.

    ``watch`` lists the target's processes (besides this one) whose CPU time the run records
    (``bench/cpu.py``); None: CPU time is not recorded (a server the bench did not start).
    ``loras``: every request (warm-up too) carries one adapter drawn from ``config.loras``.
    """
    from bench import cpu

    wl = replace(config.workload, loras=config.loras if loras else ())
    target.configure(level)
    await warm_up(target, wl, config.warmup, level.concurrency or 1)
    started, load = now_iso(), load1()
    sampler = None
    if config.duration_s is not None and config.memory_interval_s > 0 and isinstance(target, HttpTarget):
        sampler = MemorySampler(config.memory_interval_s)
        sampling = asyncio.create_task(sampler.run())
    pids = [os.getpid(), *watch()] if watch is not None else []
    cpu_before = cpu.snapshot(pids)
    label = f"{target.name} {level.label}" + (f" round {round_no}" if config.rounds > 1 else "")
    if level.mode == "closed":
        progress = Progress(label, config.requests, enabled=config.progress)
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
        progress = Progress(label, len(offsets), enabled=config.progress)
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
    cpu_ms = cpu.per_image(cpu_before, cpu.snapshot(pids), metrics.images) if watch is not None else None
    m = metrics
    logger.info(
        "%s: %d/%d ok, %.3f img/s, p50 %.0f ms, p99 %.0f ms",
        label,
        m.ok,
        m.requests,
        m.throughput_ips,
        m.latency_ms.p50,
        m.latency_ms.p99,
    )
    return TargetRun(target.name, level, started, metrics, records, load, round_no, cpu_ms, soak)


def _launched_server(config: BenchConfig) -> Any:
    if config.serve_config is None:
        return None
    from bench.cluster import LaunchedServer

    return LaunchedServer(
        Path(config.serve_config),
        [t.url for t in config.served if t.url],
        port=config.serve_port,
        model=config.serve_model,
        ready_timeout_s=config.ready_timeout_s,
        log_path=Path(config.serve_log) if config.serve_log else None,
    )


async def arun_benchmark(config: BenchConfig) -> BenchResult:
    from bench.cluster import require_alone

    meta = {**machine_metadata(), "started_at": now_iso(), "order": config.order}
    if config.in_process:
        # Before anything runs: a cluster alive now would still be alive at the in-process phase.
        await asyncio.to_thread(require_alone, config.ignore_sessions)
    server = _launched_server(config)
    inproc = [make_target(spec, config) for spec in config.in_process]
    started: set[str] = set()
    with_loras = {spec.name: spec.loras for spec in config.targets}
    infos: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, list[TargetRun]]] = [{t.name: [] for t in config.targets} for _ in config.levels]
    phases: list[dict[str, Any]] = []
    try:
        if config.freeze_served:
            from bench.frozen import interleave_frozen

            served = [make_target(spec, config) for spec in config.served]
            await interleave_frozen(config, server, served, inproc, runs, infos, phases)
        plan = [] if config.freeze_served else phase_plan(config.rounds, bool(config.served), bool(inproc))
        for round_no, kind in plan:
            phase: dict[str, Any] = {"round": round_no, "kind": kind, "started_at": now_iso()}
            phases.append(phase)
            if kind == "served":
                if server is not None:
                    phase["server"] = {
                        "config": config.serve_config,
                        "model": config.serve_model,
                        "start_s": round(await asyncio.to_thread(server.start), 1),
                    }
                targets = [make_target(spec, config) for spec in config.served]
                try:
                    for target in targets:
                        info = await target.start()
                        infos.setdefault(target.name, info)
                    watch = server.processes if server is not None else None
                    for i, level in enumerate(config.levels):
                        for target in targets:
                            run = await run_level(target, level, config, round_no, watch, loras=with_loras[target.name])
                            runs[i][target.name].append(run)
                finally:
                    for target in targets:
                        await target.close()
                    if server is not None:
                        await asyncio.to_thread(server.stop)
                        phase["server"]["stopped"] = True
            else:
                await asyncio.to_thread(require_alone, config.ignore_sessions)
                phase["alone"] = "no serving cluster alive on this machine (checked before the phase)"
                for target in inproc:
                    if target.name not in started:
                        infos[target.name] = await target.start()
                        started.add(target.name)
                for i, level in enumerate(config.levels):
                    for target in inproc:
                        runs[i][target.name].append(await run_level(target, level, config, round_no, list))
            phase["finished_at"] = now_iso()
    finally:
        for target in inproc:
            await target.close()
        if server is not None:
            await asyncio.to_thread(server.stop)
    meta["finished_at"] = now_iso()
    base = config.targets[0].name
    levels = []
    for level, by_target in zip(config.levels, runs, strict=True):
        base_metrics = [run.metrics for run in by_target[base]]
        ratios = {
            name: ratio_spreads(base_metrics, [run.metrics for run in target_runs])
            for name, target_runs in by_target.items()
            if name != base
        }
        levels.append(LevelResult(level, by_target, ratios))
    return BenchResult(config, meta, infos, levels, phases)


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Run every round (blocking); write it out with ``bench.report.write_report``."""
    return asyncio.run(arun_benchmark(config))
