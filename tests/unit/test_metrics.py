"""The metric catalogue, its in-memory recorder, and the dashboard and docs built on it (no Ray)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from serve.metrics import CATALOGUE, NO_METRICS, RecordingMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deployments" / "dashboards" / "darkroom.json"
OPERATING = ROOT / "docs" / "operating.md"
PREFIX = "ray_"  # Ray exports every application metric under its namespace (deployments/observability.py)


def prometheus_names() -> set[str]:
    names = set()
    for spec in CATALOGUE.values():
        names.add(PREFIX + spec.name)
        if spec.kind == "histogram":
            names |= {PREFIX + spec.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def referenced(expr: str) -> set[str]:
    return set(re.findall(r"\bray_darkroom_[a-z_]+", expr))


def test_catalogue_names_kinds_and_labels():
    for name, spec in CATALOGUE.items():
        assert name == spec.name and re.fullmatch(r"darkroom_[a-z_]+", name)
        assert spec.kind in ("counter", "gauge", "histogram")
        assert name.endswith("_total") == (spec.kind == "counter")  # Prometheus' naming rule for counters
        assert spec.description and spec.all_labels[0] == "stage"
        assert (spec.kind == "histogram") == bool(spec.buckets)
        assert list(spec.buckets) == sorted(spec.buckets)
        # Serve adds these itself; a clash makes Ray refuse the metric.
        assert not {"deployment", "replica", "application", "route"} & set(spec.labels)


def test_recording_metrics_checks_names_kinds_and_labels():
    m = RecordingMetrics("Decoder")
    m.inc("darkroom_images_total", 2, status="stored")
    m.inc("darkroom_images_total", status="stored")
    m.inc("darkroom_images_total", status="withheld")
    m.observe("darkroom_step_seconds", 0.25)
    m.set("darkroom_queue_length", 3)
    m.set("darkroom_queue_length", 1)
    assert m.value("darkroom_images_total", status="stored") == 3
    assert m.value("darkroom_images_total") == 4
    assert m.value("darkroom_queue_length") == 1
    assert m.samples("darkroom_step_seconds") == [0.25]
    m.inc("darkroom_stage_retries_total", stage="Denoiser")  # another stage's series
    assert m.value("darkroom_stage_retries_total", stage="Denoiser") == 1
    with pytest.raises(KeyError):
        m.inc("darkroom_typo_total")
    with pytest.raises(TypeError):
        m.observe("darkroom_images_total", 1, status="stored")
    with pytest.raises(ValueError):
        m.inc("darkroom_images_total")  # its status label is missing
    with pytest.raises(ValueError):
        m.inc("darkroom_images_total", status="stored", colour="red")
    NO_METRICS.inc("anything at all")  # the default recorder checks and records nothing


def test_dashboard_references_only_metrics_that_exist():
    exprs = dashboard_exprs()
    used = set().union(*(referenced(e) for e in exprs))
    assert len(exprs) >= 15 and len(used) >= 10
    assert used <= prometheus_names(), sorted(used - prometheus_names())
    # Every series of the catalogue has a panel: an operator sees everything we measure.
    bases = {re.sub(r"_(bucket|sum|count)$", "", n).removeprefix(PREFIX) for n in used}
    assert bases == set(CATALOGUE), sorted(set(CATALOGUE) - bases)


def test_the_name_check_can_fail():
    assert referenced("rate(ray_darkroom_no_such_thing_total[1m])") - prometheus_names()


def test_dashboard_panels_are_explained_in_operating_md():
    dash = json.loads(DASHBOARD.read_text())
    text = OPERATING.read_text()
    titles = [p["title"] for p in dash["panels"] if p["type"] != "row"]
    missing = [t for t in titles if t not in text]
    assert missing == []
    for name in CATALOGUE:
        assert name in text, f"docs/operating.md does not explain {name}"
