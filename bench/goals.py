"""The bench report's goals (issues 12 and 14): ratios of one run's targets, each with its
spread over the rounds. Pure: from a ``BenchConfig`` and its ``LevelResult``s to rows of the
report's goals table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from bench.metrics import spread

if TYPE_CHECKING:
    from bench.core import BenchConfig, LevelResult

#: Issue 14's goals for the served app against its in-process limit, and against a compared app.
GOALS = {
    "p50_at_one_client": 1.10,  # served p50 / in-process p50 at c=1: at most
    "throughput_at_saturation": 0.90,  # served peak img/s / in-process peak img/s (closed loop): at least
    "throughput_vs_compared": 1.0,  # the first target's img/s / the compared target's, every closed level: at least
    # Open loop: both targets complete the offered rate until one saturates, so their img/s are equal
    # within noise (a 0.99 would "fail" a tie); the first target's p50 / the compared target's: at most.
    "latency_vs_compared": 1.0,
    # Issue 12: with every request streaming its partial images, img/s / the same app's without: at least.
    "streaming_vs_plain": 0.90,
}


def bench_goals(config: BenchConfig, levels: list[LevelResult]) -> list[dict[str, Any]]:
    """Issue 14's checks, each with its spread over the rounds: served vs in-process (p50 at one
    client, peak throughput) and the first target vs each compared one at every level (img/s in a closed
    loop, p50 in an open one)."""
    served = [t.name for t in config.served if not t.loras]  # "+loras" runs: the report's LoRA section
    inproc = [t.name for t in config.in_process]
    rounds = range(1, config.rounds + 1)
    out: list[dict[str, Any]] = []

    def check(name: str, values: list[float | None], limit: float, at_most: bool) -> None:
        s = spread(values)
        known = [v for v in values if v is not None]
        ok = (lambda v: v <= limit) if at_most else (lambda v: v >= limit)
        out.append(
            {
                "check": name,
                "goal": f"{'<=' if at_most else '>='} {limit:g}",
                "spread": asdict(s),
                "median_met": s.median is not None and ok(s.median),
                "every_round_met": bool(known) and len(known) == len(values) and all(ok(v) for v in known),
            }
        )

    if served and inproc:
        # Against the best in-process target of the round (one per thread count: bench/cli.py).
        base, ip = served[0], inproc[0] if len(inproc) == 1 else "in-process (best)"
        one = [lr for lr in levels if lr.level.mode == "closed" and lr.level.value == 1]
        if one:
            lr = one[0]
            values = []
            for r in rounds:
                a = lr.run(base, r).metrics.latency_ms.p50
                measured = [lr.run(t, r).metrics.latency_ms.p50 for t in inproc]
                b = min((p for p in measured if p > 0), default=0.0)  # a target with no answers has p50 0
                values.append(a / b if b > 0 and a > 0 else None)
            check(f"p50 {base} / {ip} at c=1", values, GOALS["p50_at_one_client"], at_most=True)
        closed = [lr for lr in levels if lr.level.mode == "closed"]
        if closed:
            values = []
            for r in rounds:
                a = max(lr.run(base, r).metrics.throughput_ips for lr in closed)
                b = max(lr.run(t, r).metrics.throughput_ips for lr in closed for t in inproc)
                values.append(a / b if b > 0 else None)
            check(f"peak img/s {base} / {ip} (closed loop)", values, GOALS["throughput_at_saturation"], False)
    streams = {t.name for t in config.served if t.stream}
    for first, other in _pairs(config, served):
        if other in streams and first not in streams:
            _streaming_goal(config, levels, first, other, check)
            continue
        for lr in levels:
            values = []
            for r in rounds:
                ma, mb = lr.run(first, r).metrics, lr.run(other, r).metrics
                if lr.level.mode == "closed":
                    a, b = ma.throughput_ips, mb.throughput_ips
                else:
                    a, b = ma.latency_ms.p50, mb.latency_ms.p50
                values.append(a / b if b > 0 and a > 0 else None)
            if lr.level.mode == "closed":
                name, limit, at_most = f"img/s {first} / {other}", GOALS["throughput_vs_compared"], False
            else:
                name, limit, at_most = f"p50 {first} / {other}", GOALS["latency_vs_compared"], True
            check(f"{name} at {lr.level.label}", values, limit, at_most)
    return out


def _pairs(config: BenchConfig, served: list[str]) -> list[tuple[str, str]]:
    """(checked, reference) pairs of served targets: each against ``reference`` when set, else
    the first against each of the others."""
    ref = config.reference
    if ref is None:
        return [(served[0], other) for other in served[1:]]
    return [(name, ref) for name in served if name != ref]


def _streaming_goal(
    config: BenchConfig, levels: list[LevelResult], plain: str, streamed: str, check: Callable[..., None]
) -> None:
    """Issue 12's check for ``--compare-stream``: the streamed run's img/s / the plain run's,
    at every closed level."""
    for lr in levels:
        if lr.level.mode != "closed":
            continue
        values = []
        for r in range(1, config.rounds + 1):
            a, b = lr.run(streamed, r).metrics.throughput_ips, lr.run(plain, r).metrics.throughput_ips
            values.append(a / b if b > 0 else None)
        check(f"img/s {streamed} / {plain} at {lr.level.label}", values, GOALS["streaming_vs_plain"], False)


__all__ = ["GOALS", "bench_goals"]
