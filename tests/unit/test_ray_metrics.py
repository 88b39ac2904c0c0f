"""RayMetrics on a stand-in for ``ray.serve.metrics`` (the Ray side is covered by the metrics
endpoint tests): what it sends, once checked, and a gauge set to its own value sent once."""

from __future__ import annotations

import logging
import types

import pytest

import deployments.observability as obs


class _Series:
    def __init__(self, name, description="", tag_keys=(), boundaries=None):
        self.name, self.calls, self.default = name, [], {}

    def set_default_tags(self, tags):
        self.default = dict(tags)

    def inc(self, value, tags):
        self.calls.append(("inc", value, {**self.default, **tags}))

    def set(self, value, tags):
        self.calls.append(("set", value, {**self.default, **tags}))

    def observe(self, value, tags):
        self.calls.append(("observe", value, {**self.default, **tags}))


@pytest.fixture
def metrics(monkeypatch):
    fake = types.SimpleNamespace(Counter=_Series, Gauge=_Series, Histogram=_Series)
    monkeypatch.setattr(obs, "serve_metrics", fake)
    return obs.RayMetrics("Denoiser")


def test_gauges_send_changes_counters_and_histograms_send_every_point(metrics):
    for value in (3, 3, 3, 4, 4, 3):
        metrics.set("darkroom_queue_length", value)
    metrics.set("darkroom_queue_length", 4, stage="Decoder")  # another series: its own last value
    assert [c[1] for c in metrics._series["darkroom_queue_length"].calls] == [3, 4, 3, 4]
    assert metrics._series["darkroom_queue_length"].calls[-1][2] == {"stage": "Decoder"}
    for _ in range(3):
        metrics.inc("darkroom_denoise_steps_total", 2)
        metrics.observe("darkroom_step_seconds", 0.5)
    assert [c[1] for c in metrics._series["darkroom_denoise_steps_total"].calls] == [2, 2, 2]
    assert len(metrics._series["darkroom_step_seconds"].calls) == 3
    assert metrics._series["darkroom_step_seconds"].calls[0][2] == {"stage": "Denoiser"}


def test_bad_points_are_dropped_and_logged_once_every_time(metrics, caplog):
    with caplog.at_level(logging.WARNING, logger=obs.__name__):
        for _ in range(3):
            metrics.inc("darkroom_queue_length")  # a gauge, not a counter
            metrics.set("darkroom_no_such_metric", 1)
            metrics.set("darkroom_queue_length", 1, colour="red")  # a label it does not take
    assert metrics._series["darkroom_queue_length"].calls == []
    assert len(caplog.records) == 2  # once per name


def test_replica_lines_skip_serves_stderr_capture(monkeypatch):
    """In Serve's throughput mode sys.stderr is Serve's StreamToLogger: Darkroom's replica lines
    go to the stream it wraps (the worker's stderr), not through it (a stack walk per line)."""
    import io
    import sys

    from ray.serve._private.logging_utils import StreamToLogger

    worker_stderr = io.StringIO()
    captured = logging.getLogger("ray.serve.test-capture")
    monkeypatch.setattr(sys, "stderr", StreamToLogger(captured, logging.INFO, worker_stderr))
    loggers = [logging.getLogger(name) for name in ("serve", "deployments")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    try:
        obs.configure_replica_logging("Decoder")
        logging.getLogger("serve.stages.decoder").info("decoded 1 image(s)")
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    assert "[stage=Decoder replica=- request_id=-] decoded 1 image(s)" in worker_stderr.getvalue()
