"""What a replica tells its operator: metrics on Ray Serve's metrics API, log lines with request ids.

Metrics: ``serve.metrics.Metrics`` on ``ray.serve.metrics`` (Prometheus series).

One :class:`RayMetrics` per replica, made in the deployment's constructor (Serve adds the
``deployment``, ``replica`` and ``application`` labels from the replica's context); every series
of ``serve.metrics.CATALOGUE`` gets a ``stage`` label whose default is the replica's stage. Ray
exports them under its namespace: ``darkroom_requests_total`` is ``ray_darkroom_requests_total``
on the metrics endpoint (``darkroom serve --metrics-port P``: ``http://127.0.0.1:P/metrics``).

Recording never fails a request: a bad name or label (a bug) is logged once and dropped.

Logs: :func:`configure_replica_logging` gives Darkroom's loggers (``serve.*``, ``deployments.*``)
one handler in the replica whose lines carry the stage and the request id
(``serve.request_context.LOG_FORMAT``); they land in the replica's worker log under Ray's log folder.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ray.serve import metrics as serve_metrics

from serve.gil import set_gil_switch_interval
from serve.metrics import CATALOGUE, check
from serve.request_context import LOG_FORMAT, RequestIdFilter

logger = logging.getLogger(__name__)

#: Ray exports every application metric as ``<namespace>_<name>``.
PROMETHEUS_PREFIX = "ray_"


class RayMetrics:
    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._series: dict[str, Any] = {}
        self._warned: set[str] = set()
        # Hot path (every request records a dozen points on the event loop, beside the model
        # thread): a (name, labels) pair is checked against the catalogue once, and a gauge set
        # to the value it already has is not sent to Ray again (queue gauges are set per batch).
        self._checked: set[tuple[str, tuple[str, tuple[tuple[str, Any], ...]]]] = set()
        self._last: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = {}
        for spec in CATALOGUE.values():
            tags = spec.all_labels
            if spec.kind == "counter":
                series = serve_metrics.Counter(spec.name, description=spec.description, tag_keys=tags)
            elif spec.kind == "gauge":
                series = serve_metrics.Gauge(spec.name, description=spec.description, tag_keys=tags)
            else:
                series = serve_metrics.Histogram(
                    spec.name, description=spec.description, boundaries=list(spec.buckets), tag_keys=tags
                )
            series.set_default_tags({"stage": stage})
            self._series[spec.name] = series

    def _record(self, kind: str, name: str, value: float, labels: dict[str, str]) -> None:
        try:
            key = (name, tuple(labels.items()))
            if kind == "gauge" and self._last.get(key) == value:
                return  # a gauge keeps its value: setting it again records nothing new
            if (kind, key) not in self._checked:  # a bad name or label fails here, every time
                check(name, kind, labels)
                self._checked.add((kind, key))
            series = self._series[name]
            tags = {k: str(v) for k, v in labels.items()}
            if kind == "counter":
                series.inc(value, tags=tags)
            elif kind == "gauge":
                series.set(value, tags=tags)
                self._last[key] = value
            else:
                series.observe(value, tags=tags)
        except Exception:  # a metric must never fail the request that records it
            if name not in self._warned:
                self._warned.add(name)
                logger.warning("could not record metric %s %s", name, labels, exc_info=True)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._record("counter", name, value, labels)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._record("gauge", name, value, labels)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._record("histogram", name, value, labels)


_LOGGERS = ("serve", "deployments")


def configure_replica_logging(stage: str, level: str = "INFO") -> None:
    """One stderr handler on Darkroom's loggers, lines with ``stage=``, ``replica=`` (Serve's
    replica tag) and ``request_id=``.

    They stop propagating to the root logger (whose handler, Ray's, would print each line a second
    time without the ids). Called again (a second app in the same worker) it replaces its handler.
    """
    try:
        from ray import serve

        replica = serve.get_replica_context().replica_tag
    except Exception:  # not in a replica (a test, a script): no replica to name
        replica = "-"
    # In Ray Serve's throughput-optimized mode (RAY_SERVE_LOG_TO_STDERR=0) a replica's sys.stderr
    # is Serve's StreamToLogger, which walks the stack (traceback.extract_stack) and re-logs every
    # line into Serve's own log: ~8% of the event loop's GIL time at 16 clients, beside the model
    # thread. Lines go to the stream it wraps, the worker's stderr, as in Serve's default mode
    # (docs/operating.md: worker-*.err), in either mode.
    handler = logging.StreamHandler(getattr(sys.stderr, "_original_object", sys.stderr))
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter(stage, replica))
    handler.set_name("darkroom-replica")
    for name in _LOGGERS:
        log = logging.getLogger(name)
        log.handlers[:] = [h for h in log.handlers if h.get_name() != "darkroom-replica"] + [handler]
        log.setLevel(level)
        log.propagate = False


def replica_observability(stage: str, level: str = "INFO", gil_switch_interval_ms: float | None = None) -> RayMetrics:
    """The first line of every deployment's constructor: logging with request ids, this
    replica's metrics, its inter-deployment gRPC port on loopback in a local cluster
    (``deployments/local_cluster.py``; Serve opens that port after the constructor), and the
    process's GIL switch interval when the app has one (``AppConfig.gil_interval_ms``)."""
    from deployments.local_cluster import bind_replica_grpc_to_loopback

    set_gil_switch_interval(gil_switch_interval_ms)
    configure_replica_logging(stage, level)
    bind_replica_grpc_to_loopback()
    return RayMetrics(stage)


__all__ = [
    "PROMETHEUS_PREFIX",
    "RayMetrics",
    "configure_replica_logging",
    "replica_observability",
    "set_gil_switch_interval",
]
