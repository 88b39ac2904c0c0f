"""A long run, minute by minute: errors, latency percentiles and each replica's memory per minute,
and the soak verdict. Pure functions of the records and samples (unit-tested on made-up ones).

The verdict (issue 15's "done when" for the 10-minute soak at ~50% of saturation):

- no errors at all;
- the p99 latency of the last minute at most ``p99_ratio_max`` (1.2) times the first minute's;
- no replica's memory grows by more than ``memory_growth_max`` (10%) after warm-up: its largest
  RSS in the last minute against its largest in the first minute after ``warmup_s``.

Worked example: minute 0 p99 = 1000 ms, minute 9 p99 = 1150 ms -> ratio 1.15, fine; a Denoiser
at 610 MB in minute 1 and 700 MB in minute 9 grew 14.8%: the soak fails and names it.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from bench.memory import MemorySample
from bench.metrics import RequestRecord, distribution

MINUTE_S = 60.0


def per_minute(records: Sequence[RequestRecord], minute_s: float = MINUTE_S) -> list[dict[str, Any]]:
    """One row per minute of the run (by each request's scheduled send time): requests, errors by
    status, and latency percentiles (ms) of the successful ones. Minutes without requests appear."""
    if not records:
        return []
    start = min(r.scheduled for r in records)
    buckets: dict[int, list[RequestRecord]] = defaultdict(list)
    for r in records:
        buckets[int((r.scheduled - start) // minute_s)].append(r)
    rows = []
    for minute in range(max(buckets) + 1):
        rs = buckets.get(minute, [])
        lat = distribution(r.latency * 1000.0 for r in rs if r.ok)
        errors = Counter(str(r.status) for r in rs if not r.ok)
        rows.append(
            {
                "minute": minute,
                "requests": len(rs),
                "ok": sum(r.ok for r in rs),
                "errors": dict(sorted(errors.items())),
                "p50_ms": round(lat.p50, 1),
                "p90_ms": round(lat.p90, 1),
                "p99_ms": round(lat.p99, 1),
                "max_ms": round(lat.max, 1),
            }
        )
    return rows


def memory_per_minute(samples: Sequence[MemorySample], minute_s: float = MINUTE_S) -> dict[str, list[float | None]]:
    """Each process's largest RSS (MiB) per minute; None for a minute it was not sampled."""
    if not samples:
        return {}
    minutes = int(max(s.t for s in samples) // minute_s) + 1
    out: dict[str, list[float | None]] = {}
    for s in samples:
        row = out.setdefault(s.process, [None] * minutes)
        m = int(s.t // minute_s)
        mib = s.rss_bytes / 2**20
        row[m] = round(max(row[m] or 0.0, mib), 1)
    return dict(sorted(out.items()))


def verdict(
    minutes: Sequence[dict[str, Any]],
    memory: dict[str, list[float | None]],
    *,
    warmup_s: float = MINUTE_S,
    minute_s: float = MINUTE_S,
    p99_ratio_max: float = 1.2,
    memory_growth_max: float = 0.10,
) -> dict[str, Any]:
    """Whether the run passes the soak checks, with the numbers behind each one."""
    errors = sum(sum(row["errors"].values()) for row in minutes)
    checks: dict[str, Any] = {"errors": errors, "errors_ok": errors == 0}
    full = [row for row in minutes if row["ok"]]
    if len(full) >= 2 and full[0]["p99_ms"] > 0:
        ratio = full[-1]["p99_ms"] / full[0]["p99_ms"]
        checks.update(p99_first_ms=full[0]["p99_ms"], p99_last_ms=full[-1]["p99_ms"], p99_ratio=round(ratio, 3))
        checks["p99_ok"] = ratio <= p99_ratio_max
    else:
        checks["p99_ok"] = None  # fewer than two minutes: nothing to compare
    first = int(math.ceil(warmup_s / minute_s))
    growth: dict[str, float] = {}
    for process, row in memory.items():
        after = [v for v in row[first:] if v is not None]
        if len(after) >= 2 and after[0] > 0:
            growth[process] = round(after[-1] / after[0] - 1.0, 4)
    checks["memory_growth"] = growth
    checks["memory_ok"] = all(g <= memory_growth_max for g in growth.values()) if growth else None
    checks["passed"] = bool(checks["errors_ok"] and checks["p99_ok"] and checks["memory_ok"])
    checks["limits"] = {"p99_ratio_max": p99_ratio_max, "memory_growth_max": memory_growth_max, "warmup_s": warmup_s}
    return checks


def soak_report(
    records: Sequence[RequestRecord], samples: Sequence[MemorySample], *, warmup_s: float = MINUTE_S
) -> dict[str, Any]:
    minutes = per_minute(records)
    memory = memory_per_minute(samples)
    return {
        "per_minute": minutes,
        "memory_mib_per_minute": memory,
        "verdict": verdict(minutes, memory, warmup_s=warmup_s),
    }


def soak_markdown(name: str, label: str, report: dict[str, Any]) -> list[str]:
    """Summary lines for one target at one level."""
    v = report["verdict"]
    lines = [
        "",
        f"## Minute by minute: {name} at {label}",
        "",
        "| minute | sent | ok | errors | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["per_minute"]:
        errors = ", ".join(f"{k}: {n}" for k, n in row["errors"].items()) or "0"
        lines.append(
            f"| {row['minute']} | {row['requests']} | {row['ok']} | {errors} | {row['p50_ms']:.0f} "
            f"| {row['p90_ms']:.0f} | {row['p99_ms']:.0f} | {row['max_ms']:.0f} |"
        )
    memory = report["memory_mib_per_minute"]
    if memory:
        width = max(len(r) for r in memory.values())
        lines += [
            "",
            "Largest resident memory per minute (MiB):",
            "",
            "| process | " + " | ".join(str(m) for m in range(width)) + " | growth after warm-up |",
            "|---|" + "---|" * (width + 1),
        ]
        for process, row in memory.items():
            cells = ["—" if v is None else f"{v:.0f}" for v in row] + ["—"] * (width - len(row))
            g = v["memory_growth"].get(process)
            lines.append(f"| {process} | " + " | ".join(cells) + f" | {'—' if g is None else f'{g:+.1%}'} |")
    else:
        lines += ["", "No Serve replica processes were visible on this machine: memory was not sampled."]
    ok = {True: "pass", False: "FAIL", None: "n/a"}
    lines += [
        "",
        f"Soak checks: errors {v['errors']} ({ok[v['errors_ok']]}); p99 last/first minute "
        f"{v.get('p99_ratio', '—')} ({ok[v['p99_ok']]}, max {v['limits']['p99_ratio_max']}); replica memory "
        f"growth after warm-up ({ok[v['memory_ok']]}, max {v['limits']['memory_growth_max']:.0%}): "
        f"**{'passed' if v['passed'] else 'not passed'}**",
    ]
    return lines


__all__ = ["MINUTE_S", "memory_per_minute", "per_minute", "soak_markdown", "soak_report", "verdict"]
