"""Per-request records and the one pure function that turns them into metrics.

Everything here is plain Python (no numpy): the load generator imports nothing heavy, and the
metrics are unit-tested on hand-built records. Times are seconds on the benchmark's clock
(``start``/``end`` relative to the run's start); latencies in the output are milliseconds.

Worked example, mean vs median (vLLM's benchmark once reported them swapped): latencies
100, 100, 100, 100, 1100 ms have p50 = 100 ms and mean = 300 ms. A report that shows 300 as
"median" hides that most requests were fast and one was very slow.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Server timing keys (ms) the stage breakdown reads; ``*_batch`` keys are batch sizes.
STAGE_KEYS: tuple[str, ...] = (
    "encode",
    "denoise",
    "decode",
    "storage",
    "encode_queue",
    "denoise_queue",
    "decode_queue",
    "total",
    "first_partial",  # streamed requests: client-side time to the first partial image
)
BATCH_KEYS: tuple[str, ...] = ("encode_batch", "denoise_batch", "decode_batch")


@dataclass
class RequestRecord:
    """One request as the client saw it.

    ``scheduled`` is when it was meant to be sent (open loop: its arrival time; closed loop:
    when its client became free); ``start``/``end`` bracket the HTTP call. ``status`` is the
    HTTP status, or 0 when no response came back (connection error, client timeout).
    """

    index: int
    scheduled: float
    start: float
    end: float
    status: int
    images: int = 0
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "scheduled": round(self.scheduled, 6),
            "start": round(self.start, 6),
            "end": round(self.end, 6),
            "latency_ms": round(self.latency * 1000, 3),
            "status": self.status,
            "images": self.images,
            "error": self.error,
            "timings": self.timings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        return cls(
            index=data["index"],
            scheduled=data["scheduled"],
            start=data["start"],
            end=data["end"],
            status=data["status"],
            images=data.get("images", 0),
            error=data.get("error"),
            timings=dict(data.get("timings") or {}),
        )


@dataclass(frozen=True)
class Distribution:
    """Summary of a sample (same unit as the sample); all zeros for an empty one."""

    count: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    min: float = 0.0
    max: float = 0.0


@dataclass(frozen=True)
class Metrics:
    """What one run (one target at one load level) achieved."""

    duration_s: float
    requests: int
    ok: int
    failed: int
    errors_by_status: dict[str, int]  # "503": 2, "0": 1 (no response)
    images: int
    throughput_rps: float  # successful requests per second
    throughput_ips: float  # images of successful requests per second
    goodput_rps: float  # successful requests within the SLO per second
    slo_ms: float | None
    slo_attainment: float  # fraction of all requests that succeeded within the SLO
    latency_ms: Distribution  # successful requests only
    send_lag_ms: Distribution  # start - scheduled: the client's own lateness
    stages_ms: dict[str, Distribution]  # server timings (ms) of successful requests
    batch_sizes: dict[str, Distribution]
    client_overhead_ms: Distribution  # latency - server "total": HTTP, proxy, (de)serialisation
    #: The Denoiser's adapter cache over successful requests with adapters: hits / (hits + misses),
    #: and the loads (misses); None when no request used adapters.
    lora_cache_hit_rate: float | None = None
    lora_loads: int = 0

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation, as numpy's default method.

    ``percentile([1, 2, 3, 4], 50) == 2.5``; an empty sample gives 0.0.
    """
    if not sorted_values:
        return 0.0
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0..100, got {q}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def distribution(values: Iterable[float]) -> Distribution:
    data = sorted(float(v) for v in values)
    if not data:
        return Distribution()
    return Distribution(
        count=len(data),
        mean=sum(data) / len(data),  # the mean: sum / count, never the middle value
        p50=percentile(data, 50),
        p90=percentile(data, 90),
        p99=percentile(data, 99),
        min=data[0],
        max=data[-1],
    )


def compute_metrics(records: Sequence[RequestRecord], duration_s: float, slo_ms: float | None) -> Metrics:
    """Metrics of one run: ``records`` of its measured requests (warm-up excluded).

    ``duration_s`` is the measurement window (first send to last completion); rates are per
    second of it. Goodput counts successful requests with latency <= ``slo_ms`` (every
    successful request when no SLO is set).
    """
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    within = [r for r in ok if slo_ms is None or r.latency * 1000.0 <= slo_ms]
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    errors = Counter(str(r.status) for r in failed)
    images = sum(r.images for r in ok)
    stages = {k: distribution(r.timings[k] for r in ok if k in r.timings) for k in STAGE_KEYS}
    batches = {k: distribution(r.timings[k] for r in ok if k in r.timings) for k in BATCH_KEYS}
    overhead = distribution(r.latency * 1000.0 - r.timings["total"] for r in ok if "total" in r.timings)
    hits = sum(r.timings.get("lora_hits", 0.0) for r in ok)
    misses = sum(r.timings.get("lora_misses", 0.0) for r in ok)
    return Metrics(
        duration_s=duration_s,
        requests=len(records),
        ok=len(ok),
        failed=len(failed),
        errors_by_status=dict(sorted(errors.items())),
        images=images,
        throughput_rps=per_s(len(ok)),
        throughput_ips=per_s(images),
        goodput_rps=per_s(len(within)),
        slo_ms=slo_ms,
        slo_attainment=len(within) / len(records) if records else 0.0,
        latency_ms=distribution(r.latency * 1000.0 for r in ok),
        send_lag_ms=distribution(max(0.0, r.start - r.scheduled) * 1000.0 for r in records),
        stages_ms={k: v for k, v in stages.items() if v.count},
        batch_sizes={k: v for k, v in batches.items() if v.count},
        client_overhead_ms=overhead,
        lora_cache_hit_rate=hits / (hits + misses) if hits + misses else None,
        lora_loads=int(misses),
    )


def measurement_window(records: Sequence[RequestRecord]) -> float:
    """First send to last completion, in seconds (0 for no records)."""
    if not records:
        return 0.0
    return max(r.end for r in records) - min(min(r.start, r.scheduled) for r in records)


@dataclass(frozen=True)
class Ratios:
    """Target B relative to target A at one load level (B / A; > 1 means B is higher)."""

    throughput: float | None
    goodput: float | None
    p50: float | None
    p99: float | None


def _ratio(b: float, a: float) -> float | None:
    return b / a if a > 0 else None


def compare(a: Metrics, b: Metrics) -> Ratios:
    return Ratios(
        throughput=_ratio(b.throughput_ips, a.throughput_ips),
        goodput=_ratio(b.goodput_rps, a.goodput_rps),
        p50=_ratio(b.latency_ms.p50, a.latency_ms.p50),
        p99=_ratio(b.latency_ms.p99, a.latency_ms.p99),
    )


@dataclass(frozen=True)
class Spread:
    """One quantity measured once per round (A/B/A/B): its median and its range over the rounds.

    ``values`` keeps every round's value (None where it could not be computed, e.g. a ratio over
    a target that served nothing); median, min and max are over the others (None when none).
    """

    median: float | None
    min: float | None
    max: float | None
    values: tuple[float | None, ...]

    def __str__(self) -> str:
        if self.median is None:
            return "—"
        if len([v for v in self.values if v is not None]) < 2:
            return f"{self.median:.2f}x"
        return f"{self.median:.2f}x ({self.min:.2f}–{self.max:.2f})"


def spread(values: Sequence[float | None]) -> Spread:
    """``spread([1.0, 1.2, None, 0.9])`` -> median 1.0, min 0.9, max 1.2 (the None is kept, not counted)."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return Spread(None, None, None, tuple(values))
    return Spread(percentile(known, 50), known[0], known[-1], tuple(values))


RATIO_KEYS: tuple[str, ...] = ("throughput", "goodput", "p50", "p99")


def ratio_spreads(base: Sequence[Metrics], other: Sequence[Metrics]) -> dict[str, Spread]:
    """Each ratio of ``other`` over ``base`` (``compare``), computed within each round (the two ran
    back to back there), then summarised over the rounds: ``{"throughput": Spread, ...}``."""
    if len(base) != len(other):
        raise ValueError(f"{len(base)} baseline rounds for {len(other)} rounds of the other target")
    per_round = [compare(a, b) for a, b in zip(base, other, strict=True)]
    return {key: spread([getattr(r, key) for r in per_round]) for key in RATIO_KEYS}
