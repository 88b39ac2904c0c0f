"""The soak tooling on the live app: a short duration run reports each minute and each replica's
memory (the committed 10-minute soak runs on an idle machine: docs/operating.md gives the command)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_a_duration_run_reports_minutes_replica_memory_and_the_verdict(local_app, tmp_path):
    out = tmp_path / "soak"
    cmd = [sys.executable, "-m", "serve.cli", "bench", "--url", local_app["url"], "--rate", "2"]
    cmd += [
        "--duration",
        "15s",
        "--steps",
        "2",
        "--memory-interval",
        "2",
        "--warmup",
        "1",
        "--quiet",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    soak = next(iter(report["levels"][0]["results"].values()))["rounds"][0]["soak"]
    assert soak["per_minute"][0]["requests"] >= 10 and soak["per_minute"][0]["errors"] == {}
    memory = soak["memory_mib_per_minute"]
    for stage in ("Ingress", "TextEncoder", "Denoiser", "Decoder"):
        assert any(f":{stage}#" in name and row[0] > 0 for name, row in memory.items()), sorted(memory)
    assert soak["verdict"]["errors_ok"] is True
    summary = (out / "summary.md").read_text()
    assert "Minute by minute" in summary and "Soak checks" in summary
