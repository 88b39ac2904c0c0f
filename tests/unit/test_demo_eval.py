"""`darkroom eval` on a few captions: a report with its config, machine, per-attribute rates and
a sample grid; bad flags exit 2 naming the flag."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from serve.demo.checker import ATTRIBUTES
from tests.unit.test_cli import run


def test_eval_writes_report_and_grid(tmp_path):
    out = tmp_path / "report"
    proc = run("eval", "--captions", "3", "--steps", "2", "--grid", "3", "--batch", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "darkroom-demo" and report["n"] == 3
    assert report["config"]["steps"] == 2 and report["config"]["captions"] == 3
    assert set(report["adherence"]) == {*ATTRIBUTES, "all"}
    assert all(0.0 <= rate <= 1.0 for rate in report["adherence"].values())
    assert report["machine"]["cpu_count"] and report["seconds_per_image"] > 0
    assert [r["seed"] for r in report["results"]] == [0, 1, 2]
    # The rates are the results' own: recomputed from the per-caption verdicts.
    for attribute in ATTRIBUTES:
        mean = np.mean([r["ok"][attribute] for r in report["results"]])
        assert report["adherence"][attribute] == mean
    for line in ("colour", "shape", "position"):
        assert line in proc.stdout
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[0] > 64 * 3 and grid.shape[1] > 3 * 64 * 3  # three tiles at 3x, captions below


def test_eval_seen_split(tmp_path):
    out = tmp_path / "report"
    proc = run(
        "eval",
        "--model",
        "tiny",
        "--split",
        "seen",
        "--captions",
        "2",
        "--steps",
        "1",
        "--grid",
        "0",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 seen captions" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["split"] == "seen" and report["n"] == 2


def test_eval_bad_flags_name_the_flag(tmp_path):
    for args, flag in (
        (["--split", "train"], "--split"),
        (["--captions", "0"], "--captions"),
        (["--steps", "0"], "--steps"),
        (["--scheduler", "nope"], "--scheduler"),
    ):
        proc = run("eval", *args, "--out", str(tmp_path / "x"))
        assert proc.returncode == 2, proc.stderr
        assert flag in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
