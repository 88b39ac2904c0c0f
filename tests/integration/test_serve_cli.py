"""``darkroom serve`` as a user runs it: the README's main command, its API examples, Ctrl-C.

Each test starts its own Ray cluster in a subprocess (``darkroom serve`` never joins another
cluster by accident), so these are the slowest tests; every wait is bounded.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
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
    """A ``darkroom serve`` subprocess with its output read on a thread (bounded waits)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
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
            m = re.search(r"serving at (http://\S+)", line)
            if m:
                return m.group(1)
        self.kill()
        raise AssertionError("darkroom serve did not print its URL:\n" + "".join(self.output)[-4000:])

    def interrupt(self, timeout_s: float = 90) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


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


def test_readme_main_command_serves_and_examples_work(tmp_path, tiny_model):
    main, _ = setup_commands()
    (serve_part,) = [p for p in main.split("&&") if p.strip().startswith("darkroom ")]
    port = _free_port()
    server = Server([*shlex.split(serve_part), "--port", str(port)], tmp_path, _env(tmp_path, tiny_model))
    try:
        url = server.wait_for_url()
        assert url == f"http://127.0.0.1:{port}"
        examples = api_examples()
        assert [lang for lang, _ in examples] == ["bash", "python", "bash"]
        for lang, code in examples:
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
        # Results landed in ./outputs relative to where the user ran the command.
        assert list((tmp_path / "outputs" / "images").rglob("*.png"))
        assert server.interrupt() == 0
    finally:
        server.kill()
    # Ctrl-C shut down what the command started: the port is free again.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_serve_config_file(tmp_path, tiny_model):
    port = _free_port()
    args = ["darkroom", "serve", "--config", str(ROOT / "deployments/configs/local.yaml"), "--port", str(port)]
    server = Server(args, tmp_path, _env(tmp_path, tiny_model))
    try:
        url = server.wait_for_url()
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a cat", "num_inference_steps": 2}, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(r.json()["data"][0]["url"], timeout=30).status_code == 200
        assert server.interrupt() == 0
    finally:
        server.kill()
