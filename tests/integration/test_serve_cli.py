"""``darkroom serve`` as a user runs it: the README's main command, its API examples, Ctrl-C.

Each test starts its own Ray cluster in a subprocess (``darkroom serve`` never joins another
cluster by accident), so these are the slowest tests; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import _free_port
from tests.unit.test_readme import ROOT, setup_commands

pytestmark = pytest.mark.integration
README_URL = "http://127.0.0.1:8000"


class Server:
    """A ``darkroom serve`` subprocess with its output read on a thread (bounded waits).

    ``background=True`` starts it as a script's background job (``cmd &`` in ``bash -c``), which
    the shell starts with SIGINT ignored: ``interrupt`` then signals the job itself.
    """

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], background: bool = False) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.pid: int | None = None
        if background:
            args = ["bash", "-c", f'{shlex.join(args)} & echo "background pid $!"; wait $!']
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        if not background:
            self.pid = self.proc.pid
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_url(self, timeout_s: float = 240) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            pid = re.match(r"background pid (\d+)", line)
            if pid:
                self.pid = int(pid.group(1))
            m = re.search(r"serving at (http://\S+)", line)
            if m:
                return m.group(1)
        self.kill()
        raise AssertionError("darkroom serve did not print its URL:\n" + "".join(self.output)[-4000:])

    def interrupt(self, timeout_s: float = 90) -> int:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.pid is not None and self.pid != self.proc.pid and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # the background job this test started
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def text(self) -> str:
        return "".join(self.output)


def _env(tmp_path: Path, tiny_model: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # A fresh cache folder: nothing a previous run left there (the tiny model, hub files) is used.
    env["DARKROOM_CACHE_DIR"] = str(tmp_path / "cache")
    return env


def api_examples() -> list[tuple[str, str]]:
    """The README's API examples: (language, code) in the 'Using the API' section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using the API", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```(bash|python)\n(.+?)\n```", section, flags=re.S)


def streaming_examples() -> list[str]:
    """The README's Python examples in 'Watch it develop': streaming with the official client, a job's events."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Watch it develop", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.+?)\n```", section, flags=re.S)


# Ray's own lines that `darkroom serve` keeps off the terminal by default (--verbose shows them).
RAY_NOISE = ("Connecting to existing Serve app", "graceful_shutdown", "Token authentication", "Started Serve")


def _run_python(code: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_readme_main_command_serves_and_examples_work(tmp_path, tiny_model):
    """The README's main command, started as a script's background job (SIGINT ignored by the
    shell): progress per stage and a banner, the README's API examples, a second `darkroom serve`
    on the same port refused in one line before Ray, and SIGINT stops it cleanly."""
    main, _ = setup_commands()
    (serve_part,) = [p for p in main.split("&&") if p.strip().startswith("darkroom ")]
    port = _free_port()
    env = _env(tmp_path, tiny_model)
    server = Server([*shlex.split(serve_part), "--port", str(port)], tmp_path, env, background=True)
    try:
        url = server.wait_for_url()
        assert url == f"http://127.0.0.1:{port}"
        for stage in ("Ingress", "TextEncoder", "Denoiser", "Decoder"):
            assert f"{stage}: loading" in server.text() and f"{stage}: ready" in server.text()
        time.sleep(0.5)  # the banner's last lines (printed right after the URL line)
        assert f"API docs:   {url}/docs" in server.text()
        assert f"results:    {tmp_path / 'outputs'}" in server.text()
        try_line = server.text().split("try:", 1)[1].splitlines()[0].strip()
        tried = subprocess.run(["bash", "-c", try_line], capture_output=True, text=True, timeout=180)
        assert '"data"' in tried.stdout, tried.stdout + tried.stderr

        # A second server on the busy port: one line naming it and the other Darkroom, exit 2,
        # and no Ray started (its RAY_TMPDIR stays empty).
        ray_tmp = tmp_path / "second-ray"
        ray_tmp.mkdir()
        second = subprocess.run(
            [*shlex.split(serve_part), "--port", str(port)],
            cwd=tmp_path,
            env={**env, "RAY_TMPDIR": str(ray_tmp)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stdout == "" and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert "--port: in use on 127.0.0.1 by another Darkroom" in second.stderr
        assert f"(got {port})" in second.stderr
        assert list(ray_tmp.iterdir()) == []
        examples = api_examples()
        assert [lang for lang, _ in examples] == ["bash", "bash", "python", "bash"]
        assert examples[1][1] == "pip install openai"  # the README says how to get the client
        for lang, code in examples:
            if code.startswith("pip "):
                continue  # installs run in tests/integration/test_readme_venv.py's fresh venv
            code = code.replace(README_URL, url)
            cmd = ["bash", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
            proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
            assert proc.returncode == 0, proc.stderr
            if lang == "bash":
                assert '"data"' in proc.stdout or '"status"' in proc.stdout, proc.stdout
            else:
                assert proc.stdout.strip() == "42"
        for name in ("star-0.png", "star-1.png"):
            assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
        # Watch it develop: the official client's stream (partial images, then the final image with
        # its seed) and a job's events (progress to the last step, then the completed events).
        stream, job = streaming_examples()
        out = [_run_python(code.replace(README_URL, url), tmp_path) for code in (stream, job)]
        assert out[0].splitlines() == ["partial image 0", "partial image 1", "done, seed 7"], out[0]
        assert (tmp_path / "circle.png").read_bytes().startswith(b"\x89PNG")
        lines = out[1].splitlines()
        steps = [int(line.split()[1]) for line in lines if line.startswith("step ")]
        assert (
            steps == sorted(steps)
            and steps[-1] == 20
            and all(line.endswith(" of 20") for line in lines if "step" in line)
        )
        assert lines.count("image_generation.partial_image ") == 3, out[1]  # partial_images 3
        assert lines[-2:] == ["image_generation.completed ", "job.status succeeded"], out[1]
        # Results landed in ./outputs relative to where the user ran the command.
        assert list((tmp_path / "outputs" / "images").rglob("*.png"))
        assert server.interrupt() == 0
    finally:
        server.kill()
    # SIGINT shut down what the command started: the port is free again, and Ray's noise
    # (start warnings, "Connecting to existing Serve app", shutdown retries) never showed.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    assert not [n for n in RAY_NOISE if n in server.text()], server.text()
    assert server.text().rstrip().endswith("stopped"), server.text()[-2000:]


def test_busy_port_held_by_another_program_is_one_line_before_ray(tmp_path, tiny_model):
    """A port held by another program: one line naming the port and the program, exit 2,
    before Ray starts (its RAY_TMPDIR stays empty)."""
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = subprocess.run(
            ["darkroom", "serve", "--port", str(port)],
            cwd=tmp_path,
            env={**_env(tmp_path, tiny_model), "RAY_TMPDIR": str(ray_tmp)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("darkroom: error: --port: in use on 127.0.0.1 by another program (pid ")
    assert f"pid {os.getpid()}: " in line and line.endswith(f"(got {port})")  # this test's process
    assert list(ray_tmp.iterdir()) == []


def test_the_ingress_imports_no_torch():
    """The Ingress replica starts without torch (it only routes), so /healthz answers seconds
    after the HTTP proxy is up instead of after the stages' imports; torch is imported in the
    background once it runs."""
    code = (
        "import sys, deployments.ingress\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))\n"
        "print(heavy[:5]); sys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_readiness_names_the_stages_still_loading(monkeypatch):
    """While a stage's first replica starts, /readyz says "loading" for it (from Serve's
    status, without pinging it); running stages are pinged as before."""
    import asyncio
    from types import SimpleNamespace

    from ray import serve

    from deployments import ingress

    def dep(status, **replicas):
        return SimpleNamespace(status=status, message="", replica_states=replicas)

    app = SimpleNamespace(
        deployments={
            "TextEncoder": dep("DeploymentStatus.HEALTHY", RUNNING=1),
            "Denoiser": dep("DeploymentStatus.UPDATING", STARTING=1),
            "Decoder": dep("DeploymentStatus.UPDATING"),
        }
    )
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"darkroom": app}))
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(app_name="darkroom"))
    stages = ingress.HandleStages(None, None, None)
    assert asyncio.run(stages._controller_view()) == {"Denoiser": "loading", "Decoder": "loading"}
