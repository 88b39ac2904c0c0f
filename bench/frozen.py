"""``darkroom bench --freeze``: the served app started once and frozen, not stopped, for the baseline.

At every level of every round the served targets run, then every process of the app is sent
SIGSTOP and read back as stopped (``LaunchedServer.frozen`` in ``bench/cluster.py``), the
in-process baseline runs alone (no other serving cluster alive, checked), and the app is sent
SIGCONT. A stopped process gets no CPU; each in-process phase records the frozen processes' CPU
seconds over its run to show it (0). The ratios then pair runs seconds apart, not minutes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench import cpu
from bench.cluster import require_alone
from bench.core import BenchConfig, TargetRun, run_level
from bench.machine import now_iso
from bench.runner import Target

ORDER_FROZEN = (
    "per round and level: the served targets (every target's warm-up and measured schedule in turn), then "
    "the in-process baseline with the served app frozen (SIGSTOP, every process of it: no CPU) and no other "
    "serving cluster alive; ratios within a round, median and range over the rounds (same bodies, seeds "
    "and arrival offsets for all)"
)


async def interleave_frozen(
    config: BenchConfig,
    server: Any,
    targets: list[Target],
    inproc: list[Target],
    runs: list[dict[str, list[TargetRun]]],
    infos: dict[str, dict[str, Any]],
    phases: list[dict[str, Any]],
) -> None:
    """``freeze_served``: start the app once; at every level of every round run the served targets,
    then freeze the app (every process stopped, checked) and run the in-process baseline alone
    (no other serving cluster alive, checked), then thaw it. Each in-process phase records the
    frozen processes' CPU seconds over its run (0 when the freeze held). ``targets`` are the served
    targets, one per ``config.served`` spec, built by the caller and closed here; the caller stops
    the app."""
    start_s = round(await asyncio.to_thread(server.start), 1)
    server_info = {"config": config.serve_config, "model": config.serve_model, "start_s": start_s}
    started: set[str] = set()
    try:
        for target in targets:
            infos.setdefault(target.name, await target.start())
        for round_no in range(1, config.rounds + 1):
            for i, level in enumerate(config.levels):
                phase: dict[str, Any] = {"round": round_no, "kind": "served", "level": level.label}
                phase["started_at"] = now_iso()
                if not phases:
                    phase["server"] = server_info
                phases.append(phase)
                for spec, target in zip(config.served, targets, strict=True):
                    run = await run_level(target, level, config, round_no, server.processes, loras=spec.loras)
                    runs[i][target.name].append(run)
                phase["finished_at"] = now_iso()
                phase = {"round": round_no, "kind": "in-process", "level": level.label, "started_at": now_iso()}
                phases.append(phase)
                with server.frozen() as pids:
                    await asyncio.to_thread(require_alone, config.ignore_sessions, pids)
                    before = cpu.snapshot(pids)
                    for target in inproc:
                        if target.name not in started:
                            infos[target.name] = await target.start()
                            started.add(target.name)
                        runs[i][target.name].append(await run_level(target, level, config, round_no, list))
                    after = cpu.snapshot(pids)
                used = sum(after[p] - before[p] for p in after if p in before)
                phase["alone"] = "served app frozen and no other serving cluster alive (checked before the run)"
                phase["frozen"] = {"processes": len(pids), "cpu_s": round(used, 3)}
                phase["finished_at"] = now_iso()
    finally:
        for target in targets:
            await target.close()


__all__ = ["ORDER_FROZEN", "interleave_frozen"]
