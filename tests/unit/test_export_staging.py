"""``darkroom export`` writes into a folder next to ``--out`` and renames it into place: a failed
run (a broken install, a failing component, an interrupt) leaves nothing behind, a retry works,
a previous export survives a failed re-export, and every progress line prints once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import export.exporter as exporter
from export import export_model, read_manifest
from serve.errors import EngineError

ROOT = Path(__file__).resolve().parents[2]

# onnxruntime present on disk but failing to import (a broken install): find_spec succeeds, so
# the export starts and fails inside, after its staging folder exists.
BROKEN_ORT = """
import importlib.abc, importlib.machinery, sys

class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnxruntime":
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")

sys.meta_path.insert(0, Broken())
from serve.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _darkroom(args, cwd, code=None, timeout=600):
    cmd = [sys.executable, "-c", code or "import sys; from serve.cli import main; sys.exit(main(sys.argv[1:]))"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_failing_export_leaves_nothing_and_a_retry_works(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "deep" / "tiny-onnx"

    def broken_verify(*args, **kwargs):
        raise EngineError("simulated: the exported graph does not match torch")

    monkeypatch.setattr(exporter, "verify_onnx", broken_verify)
    with pytest.raises(EngineError, match="simulated"):
        export_model(tiny_model, out)
    assert _leftovers(tmp_path) == []  # neither the folder, a staging folder, nor the parent it made
    monkeypatch.undo()

    messages: list[str] = []
    assert export_model(tiny_model, out, progress=messages.append) == out.resolve()
    assert read_manifest(out)["components"].keys() == {"text_encoder", "unet", "vae_decoder"}
    assert _leftovers(out.parent) == ["tiny-onnx"]
    # Each progress message once (the exporter reports to the callback or the log, not both).
    assert [m for m, k in Counter(messages).items() if k > 1] == []


def test_failed_reexport_keeps_the_previous_export(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "repo"
    export_model(tiny_model, out, size="64:64:64")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_model, out, size="48:64:96")  # another profile: every component re-exports
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert _leftovers(tmp_path) == ["repo"]


def test_reexport_carries_unchanged_files_into_the_new_folder(tiny_model, tmp_path):
    out = tmp_path / "repo"
    export_model(tiny_model, out, size="64:64:64")
    messages: list[str] = []
    export_model(tiny_model, out, size="64:64:64", progress=messages.append)
    assert sum("kept" in m for m in messages) == 3
    manifest = read_manifest(out)
    for entry in manifest["components"].values():
        assert all((out / f).is_file() for f in entry["onnx"]["files"])
    assert _leftovers(tmp_path) == ["repo"]


def test_a_killed_runs_staging_folder_is_cleaned_up(tmp_path):
    out = tmp_path / "repo"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".repo.export-{dead.stdout.strip()}-abcd1234"
    (stale / "unet").mkdir(parents=True)
    mine = tmp_path / f".repo.export-{os.getpid()}-live0000"  # a live process's: left alone
    mine.mkdir()
    exporter._remove_stale(out)
    assert _leftovers(tmp_path) == [mine.name]


def test_cli_export_with_a_broken_onnxruntime_is_one_line_and_leaves_nothing(tiny_model, tmp_path):
    proc = _darkroom(["export", "--model", tiny_model, "--out", "tiny-onnx"], tmp_path, code=BROKEN_ORT)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "darkroom: error: the Python package 'onnxruntime' is missing from this environment: "
        "reinstall Darkroom (pip install -e .)"
    ], proc.stderr
    assert "Traceback" not in proc.stderr
    assert _leftovers(tmp_path) == []


def test_cli_export_without_onnxruntime_stops_before_any_work(tiny_model, tmp_path):
    code = (
        "import sys; sys.modules['onnxruntime'] = None  # not installed\n"
        "from serve.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = _darkroom(["export", "--model", tiny_model, "--out", "tiny-onnx"], tmp_path, code=code)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("(pip install -e .)"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _leftovers(tmp_path) == []


def test_cli_export_tensorrt_without_tensorrt_names_the_extra(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    if __import__("importlib").util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    proc = _darkroom(["export", "--model", tiny_model, "--out", "trt", "--format", "tensorrt"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "darkroom[gpu]" in lines[0], proc.stderr
    assert _leftovers(tmp_path) == []


def test_cli_export_prints_each_line_once(tiny_model, tmp_path):
    """Even with the libraries' INFO logs on, no progress line appears twice."""
    proc = _darkroom(
        ["--log-level", "info", "export", "--model", tiny_model, "--out", "o", "--size", "64:64:64"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    # A log line without its "time LEVEL logger: " prefix equals the printed line it repeats.
    lines = [re.sub(r"^\d{4}-\d\d-\d\d [\d:,]+ \w+ [\w.]+: ", "", line) for line in proc.stderr.splitlines()]
    repeated = [line for line, k in Counter(lines).items() if k > 1]
    assert repeated == [], proc.stderr
    assert sum("unet: verifying" in line for line in proc.stderr.splitlines()) == 1
