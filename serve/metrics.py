"""What Darkroom measures, once: the metric catalogue and the Ray-free interface stages record to.

Every series is named ``darkroom_*`` and carries a ``stage`` label (DESIGN.md's contract); the
Ray Serve adapter (``deployments/metrics.py``) turns each spec below into a
``ray.serve.metrics`` Counter, Gauge or Histogram, whose exporter adds Ray's namespace: on
Ray's metrics endpoint ``darkroom_requests_total`` is the series ``ray_darkroom_requests_total``
(and Serve adds the ``deployment``, ``replica`` and ``application`` labels itself).

Stages and the request layer hold a :class:`Metrics` (default :data:`NO_METRICS`, which does
nothing), so ``serve/`` records without importing Ray and unit tests read a
:class:`RecordingMetrics`. ``docs/operating.md`` says what each series means to an operator and
the dashboard (``deployments/dashboards/darkroom.json``) may use only names listed here (a test
checks it).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)

# Seconds: a tiny-model UNet step on CPU takes ~10 ms, an SDXL step on a GPU ~50 ms, a whole
# CPU request tens of seconds: buckets from 5 ms to 5 min cover all of them.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class MetricSpec:
    """One series: ``kind`` is counter, gauge or histogram; ``labels`` exclude ``stage`` (always there)."""

    name: str
    kind: str
    description: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def all_labels(self) -> tuple[str, ...]:
        return ("stage", *self.labels)


_SPECS = (
    # -- traffic -------------------------------------------------------------------------------
    MetricSpec(
        "darkroom_requests_total",
        "counter",
        "Requests a stage answered, by status: the HTTP status at the Ingress; ok, error or cancelled at a stage.",
        ("status",),
    ),
    MetricSpec(
        "darkroom_images_total",
        "counter",
        "Images a stage handled, by status: stored, withheld (safety check) or failed at the Decoder; "
        "returned or withheld at the Ingress.",
        ("status",),
    ),
    MetricSpec(
        "darkroom_rejected_total",
        "counter",
        "Requests refused with an error, by reason: unauthenticated, body_too_large, invalid, content_policy, "
        "moderation_blocked (every image withheld), rate_limited, inflight_limited, overloaded, timeout.",
        ("reason",),
    ),
    MetricSpec(
        "darkroom_request_latency_seconds",
        "histogram",
        "Whole generation requests at the Ingress, from the body read to the answer, by outcome (ok or error).",
        ("outcome",),
        SECONDS_BUCKETS,
    ),
    MetricSpec(
        "darkroom_stage_latency_seconds",
        "histogram",
        "One stage call as the Ingress sees it (queueing, retries and compute), by the stage called.",
        (),
        SECONDS_BUCKETS,
    ),
    MetricSpec(
        "darkroom_stage_retries_total",
        "counter",
        "Stage calls the Ingress sent again because the replica died mid-call, by the stage called.",
    ),
    # -- load inside a stage --------------------------------------------------------------------
    MetricSpec(
        "darkroom_queue_length",
        "gauge",
        "Requests waiting in a replica for a batch slot (the Ingress: requests being served).",
    ),
    MetricSpec("darkroom_inflight_requests", "gauge", "Requests a replica is computing now (in the running batch)."),
    MetricSpec(
        "darkroom_batch_size",
        "histogram",
        "Requests per batched model call (the Denoiser: per denoising step).",
        (),
        BATCH_BUCKETS,
    ),
    MetricSpec(
        "darkroom_step_seconds",
        "histogram",
        "Seconds per batched model call (the Denoiser: per denoising step of the whole batch).",
        (),
        SECONDS_BUCKETS,
    ),
    MetricSpec(
        "darkroom_denoise_steps_total",
        "counter",
        "Denoising steps done, one per request per step (rate() = denoising steps per second).",
    ),
    MetricSpec(
        "darkroom_prompt_cache_total",
        "counter",
        "TextEncoder prompt-embedding lookups, by result (hit or miss).",
        ("result",),
    ),
    # -- storage, jobs, policy ------------------------------------------------------------------
    MetricSpec(
        "darkroom_store_seconds",
        "histogram",
        "Result-store operations, by op (image, job, claim).",
        ("op",),
        SECONDS_BUCKETS,
    ),
    MetricSpec("darkroom_store_errors_total", "counter", "Result-store operations that failed, by op.", ("op",)),
    MetricSpec(
        "darkroom_jobs_total",
        "counter",
        "Async job transitions, by event: submitted, succeeded, failed, resumed (taken over after a lease expired).",
        ("event",),
    ),
    MetricSpec(
        "darkroom_policy_blocks_total",
        "counter",
        "Content refused by the policy, by check: prompt (at the Ingress) or image (the safety check at the Decoder).",
        ("check",),
    ),
)

CATALOGUE: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}


class Metrics(Protocol):
    """Where stages and the request layer record. ``stage`` defaults to the recorder's own stage."""

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None: ...

    def set(self, name: str, value: float, **labels: str) -> None: ...

    def observe(self, name: str, value: float, **labels: str) -> None: ...


class _NoMetrics:
    """Records nothing: the default, so code without a metrics backend needs no checks."""

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        return None

    def set(self, name: str, value: float, **labels: str) -> None:
        return None

    def observe(self, name: str, value: float, **labels: str) -> None:
        return None


NO_METRICS: Metrics = _NoMetrics()


class _StageMetrics:
    """Records to ``base`` under another ``stage`` label: the colocated profile's stages share their
    replica's recorder, yet each keeps its own stage name (as in the split profile)."""

    def __init__(self, base: Metrics, stage: str) -> None:
        self.base = base
        self.stage = stage

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self.base.inc(name, value, **{"stage": self.stage, **labels})

    def set(self, name: str, value: float, **labels: str) -> None:
        self.base.set(name, value, **{"stage": self.stage, **labels})

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.base.observe(name, value, **{"stage": self.stage, **labels})


def for_stage(base: Metrics, stage: str) -> Metrics:
    """``base`` recording under ``stage`` (NO_METRICS stays NO_METRICS)."""
    return base if base is NO_METRICS else _StageMetrics(base, stage)


def check(name: str, kind: str, labels: dict[str, str]) -> MetricSpec:
    """The spec of ``name`` if it is a ``kind`` with exactly the spec's labels (``stage`` optional)."""
    spec = CATALOGUE.get(name)
    if spec is None:
        raise KeyError(f"unknown metric {name!r}; known: {sorted(CATALOGUE)}")
    if spec.kind != kind:
        raise TypeError(f"{name} is a {spec.kind}, not a {kind}")
    extra = set(labels) - set(spec.all_labels)
    missing = set(spec.labels) - set(labels)
    if extra or missing:
        raise ValueError(f"{name} takes labels {spec.all_labels}; got {sorted(labels)}")
    return spec


class RecordingMetrics:
    """Keeps every value in memory, checked against the catalogue: for tests and local runs.

    ``value(name, **labels)`` is a counter's total or a gauge's last value; ``samples(...)`` are a
    histogram's observations. ``stage`` is filled in from the recorder's own stage.
    """

    def __init__(self, stage: str = "local") -> None:
        self.stage = stage
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._samples: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = defaultdict(list)

    def _key(self, name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
        return name, tuple(sorted({"stage": self.stage, **labels}.items()))

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        check(name, "counter", labels)
        with self._lock:
            self._values[self._key(name, labels)] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        check(name, "gauge", labels)
        with self._lock:
            self._values[self._key(name, labels)] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        check(name, "histogram", labels)
        with self._lock:
            self._samples[self._key(name, labels)].append(value)

    def _matching(self, store: dict, name: str, labels: dict[str, str]):
        want = {"stage": self.stage, **labels} if "stage" not in labels else labels
        for (n, key), v in store.items():
            if n == name and all(dict(key).get(k) == str(x) for k, x in want.items()):
                yield v

    def value(self, name: str, **labels: str) -> float:
        """Sum over the series of ``name`` that match ``labels`` (counters; a gauge's last value)."""
        with self._lock:
            return sum(self._matching(self._values, name, labels))

    def samples(self, name: str, **labels: str) -> list[float]:
        with self._lock:
            return [x for v in self._matching(self._samples, name, labels) for x in v]


__all__ = [
    "BATCH_BUCKETS",
    "CATALOGUE",
    "NO_METRICS",
    "SECONDS_BUCKETS",
    "MetricSpec",
    "Metrics",
    "RecordingMetrics",
    "check",
    "for_stage",
]
