"""The README as a new user follows it: every command block, in order, in a fresh virtual
environment made by the README's own install line (not the test extra), on a fresh copy of the
repository. Each command must succeed; the openai example runs after the README's install step
for it. Blocks marked ``<!-- not run by tests: ... -->`` (a GPU, real weights, S3) are skipped.

A ``darkroom serve`` command runs in the background, as a script's background job, until the
next one (stopped with SIGINT first: the README uses port 8000 throughout) or the end; the
README's ``127.0.0.1:8000`` becomes a free port; a ``darkroom bench --serve`` command (which
starts and stops its own server) runs with the background server stopped, as the README asks.
This is the slowest test of the suite (a venv install, server starts, an ONNX export, three
benchmarks); every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.cluster import live_clusters
from tests.integration.conftest import _free_port
from tests.integration.test_serve_cli import RAY_NOISE, Server
from tests.unit.test_readme import ROOT, readme_blocks, server_command, starts_its_own_server

pytestmark = pytest.mark.integration

INSTALL_TIMEOUT_S = 1800  # pip installs from the package index into an empty venv
SERVER_TIMEOUT_S = 900  # a server's start, on a loaded 2-core machine
COMMAND_TIMEOUT_S = 900  # an export, a benchmark


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked and new, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, listed):
        src = ROOT / os.fsdecode(rel)
        if src.is_file():
            (dest / os.fsdecode(rel)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(rel))
    return dest


def venv_env(venv: Path, home: Path, ray_tmpdir: str) -> dict[str, str]:
    """The environment of a shell with the venv activated, nothing of this checkout's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "PYTHONHOME")}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        DARKROOM_CACHE_DIR=str(home / "darkroom-cache"),
        HF_HUB_OFFLINE="1",  # no test downloads anything
        RAY_TMPDIR=ray_tmpdir,
        # The suite's own session-wide Ray cluster (other tests) is not the user's: the README's
        # `bench --in-process` must not refuse to run beside it.
        DARKROOM_BENCH_IGNORE_SESSIONS=",".join(c.session for c in live_clusters() if c.session),
    )
    return env


def with_port(text: str, port: int) -> str:
    return text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")


def server_args(command: str, port: int) -> list[str]:
    args = shlex.split(command.split(" #")[0])
    if "--port" in args:
        args[args.index("--port") + 1] = str(port)
    else:
        args += ["--port", str(port)]
    return args


def check_output(command: str, proc: subprocess.CompletedProcess) -> None:
    """Exit status 0, and for curl (which exits 0 on HTTP errors too) a JSON answer, no error."""
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if command.startswith("curl "):
        answer = json.loads(proc.stdout)
        assert "error" not in answer, answer


@pytest.mark.timeout(3 * 3600)
def test_every_readme_block_runs_in_a_fresh_venv(tmp_path):
    clone = fresh_copy(tmp_path / "darkroom")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    ray_tmpdir = tempfile.mkdtemp(prefix="drk", dir="/tmp")  # Ray's socket paths stay short
    env = venv_env(venv, tmp_path, ray_tmpdir)
    port = _free_port()
    server: Server | None = None
    ran: list[tuple[str, float]] = []
    skipped: list[str] = []

    def run(command: str, timeout: float) -> None:
        t0 = time.monotonic()
        proc = subprocess.run(
            ["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout
        )
        check_output(command, proc)
        ran.append((command, time.monotonic() - t0))

    def stop(server: Server) -> None:
        assert server.interrupt(timeout_s=180) == 0, server.text()[-3000:]
        assert not [n for n in RAY_NOISE if n in server.text()], server.text()[-3000:]

    try:
        for block in readme_blocks():
            if block.not_run:
                skipped.append(f"{block.section}: {block.not_run}")
                continue
            if block.language == "python":
                t0 = time.monotonic()
                proc = subprocess.run(
                    [str(venv / "bin" / "python"), "-c", with_port(block.code, port)],
                    cwd=clone,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=COMMAND_TIMEOUT_S,
                )
                check_output("python example", proc)
                ran.append((f"python: {block.code.splitlines()[-1]}", time.monotonic() - t0))
                continue
            for command in block.commands():
                command = with_port(command, port)
                if starts_its_own_server(command):
                    # As the README says: stop the running server first (the bench starts its own,
                    # and measures the in-process baseline only with no cluster alive).
                    if server is not None:
                        stop(server)
                        server = None
                    run(f"{command} --serve-port {port}", COMMAND_TIMEOUT_S)
                    continue
                if not server_command(command):
                    timeout = INSTALL_TIMEOUT_S if command.startswith("pip ") else COMMAND_TIMEOUT_S
                    run(command, timeout)
                    continue
                *before, serve_part = [p.strip() for p in command.split("&&")]
                for part in before:  # e.g. the install line's pip commands
                    run(part, INSTALL_TIMEOUT_S)
                if server is not None:
                    stop(server)
                t0 = time.monotonic()
                server = Server(server_args(serve_part, port), clone, env, background=True)
                server.wait_for_url(timeout_s=SERVER_TIMEOUT_S)
                ran.append((serve_part + " (until ready)", time.monotonic() - t0))
        if server is not None:
            stop(server)
            server = None
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
        print("\nREADME blocks run in a fresh venv:")
        for command, seconds in ran:
            print(f"  {seconds:7.1f} s  {command[:120]}")
        print("not run: " + "; ".join(skipped))
    # What the README promised, on disk in the user's folder.
    assert (clone / "star-0.png").read_bytes().startswith(b"\x89PNG")
    assert (clone / "demo-onnx" / "manifest.json").is_file()
    assert (clone / "bench-out" / "report.json").is_file() and (clone / "bench-ab" / "report.json").is_file()
    every = {g["check"] for g in json.loads((clone / "bench-ab" / "report.json").read_text())["goals"]}
    assert {
        "img/s split / monolith at c=1",
        "img/s colocated / monolith at c=1",
        "p50 colocated / in-process at c=1",
    } <= every
    for out in ("bench-out", "bench-limit", "bench-ab"):
        # Every request served: bench-out's against the README's `darkroom serve --config
        # deployments/configs/local.yaml` (the config file's server, stopped with SIGINT above).
        report = json.loads((clone / out / "report.json").read_text())
        for level in report["levels"]:
            for target, result in level["results"].items():
                for run in result["rounds"]:
                    m = run["metrics"]
                    assert m["ok"] == m["requests"] > 0 and m["failed"] == 0, (out, level["level"], target, m)
    limit = json.loads((clone / "bench-limit" / "report.json").read_text())
    assert [p["kind"] for p in limit["phases"]] == ["served", "in-process"] * 2 and limit["goals"]
    assert json.loads((clone / "gpu-smoke.json").read_text())["results"]
    # The venv was made by the README's install line alone: no test-only package came with it.
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.util as u; print(u.find_spec('pytest') is None)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip() == "True"
