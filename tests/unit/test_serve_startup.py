"""``darkroom serve`` without Ray: the busy-port check and what holds the port, the per-stage
progress words, the banner, and the console that keeps Ray's output off the terminal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from deployments.preflight import check_port, port_holder
from deployments.startup import banner, results_location, stage_state
from serve.errors import InvalidRequestError

ROOT = Path(__file__).resolve().parents[2]


def test_a_free_port_is_free():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert port_holder("127.0.0.1", port) is None
    check_port("127.0.0.1", port)


def test_a_port_shared_with_so_reuseport_is_still_busy():
    """Serve's proxy listens with SO_REUSEPORT: a bind that set it too would succeed (and share
    the port); the check's plain bind fails, and names this process as the holder."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        holder = port_holder("127.0.0.1", port)
        with pytest.raises(InvalidRequestError) as err:
            check_port("127.0.0.1", port)
        with pytest.raises(InvalidRequestError):
            check_port("0.0.0.0", port)  # the wildcard overlaps it too
    assert holder.startswith(f"another program (pid {os.getpid()}: ")
    assert err.value.field == "--port" and err.value.value == port
    assert "in use on 127.0.0.1 by another program" in err.value.reason


@contextmanager
def http_server(routes: dict[str, object]):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path not in routes:
                self.send_response(404)
                self.end_headers()
                return
            body = json.dumps(routes[self.path]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_another_darkroom_on_ray_serve_is_named():
    with http_server({"/-/routes": {"/": "darkroom"}, "/healthz": {"status": "ok"}}) as port:
        holder = port_holder("127.0.0.1", port)
    assert holder.startswith("another Darkroom (Ray Serve app 'darkroom' at /)"), holder


def test_another_ray_serve_is_named():
    with http_server({"/-/routes": {"/api": "other"}}) as port:
        holder = port_holder("127.0.0.1", port)
    assert holder.startswith("another Ray Serve instance ('other' at /api)"), holder


def test_a_darkroom_without_ray_is_named():
    with http_server({"/healthz": {"status": "ok"}}) as port:
        assert port_holder("127.0.0.1", port).startswith("another Darkroom (pid ")


def _dep(status, **replicas):
    return SimpleNamespace(status=SimpleNamespace(value=status), replica_states=replicas)


def test_stage_states_in_words():
    assert stage_state(_dep("UPDATING", STARTING=1)) == "loading"
    assert stage_state(_dep("UPDATING", RUNNING=1, STARTING=1)) == "ready"
    assert stage_state(_dep("HEALTHY", RUNNING=2)) == "ready"
    assert stage_state(_dep("HEALTHY")) == "scaled to zero"
    assert stage_state(_dep("DEPLOY_FAILED")) == "failed"


def test_banner_names_url_docs_results_and_a_request_to_try(tmp_path):
    lines = banner("http://127.0.0.1:8000", str(tmp_path), api_keys=False, playground=False)
    assert lines[0] == "Darkroom is serving at http://127.0.0.1:8000 (Ctrl-C to stop)"
    assert "  API docs:   http://127.0.0.1:8000/docs" in lines
    assert f"  results:    {tmp_path}" in lines
    assert not any("playground" in line for line in lines)
    curl = lines[-1].split("try:", 1)[1].strip()
    assert curl.startswith("curl -s http://127.0.0.1:8000/v1/images/generations ") and "prompt" in curl
    with_all = banner("http://h:1", "s3://b/p", api_keys=True, playground=True)
    assert "  playground: http://h:1/" in with_all and "Authorization: Bearer" in with_all[-1]


def test_results_location_is_absolute_or_the_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert results_location("./outputs") == str(tmp_path / "outputs")
    assert results_location("file://out") == str(tmp_path / "out")
    assert results_location("s3://bucket/prefix") == "s3://bucket/prefix"


def test_console_keeps_ray_output_off_the_terminal():
    """Inside the console, anything written to fds 1 and 2 (Python's or a C library's) lands in
    the log file; ``say``/``show`` reach the terminal; a clean exit deletes the file."""
    code = """
import logging, os, sys
from deployments.startup import ServeConsole
logging.basicConfig(level=logging.INFO)
with ServeConsole(quiet=True) as console:
    os.write(2, b"noise from the C++ core\\n")
    print("noise from Python", file=sys.stderr)
    logging.getLogger("ray.serve").warning("noise from a Ray logger")
    logging.getLogger("deployments.x").warning("our own warning")
    console.say("progress line")
    console.show("banner line")
    print("LOG", console.log_path, file=console.err)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "banner line\n"
    assert "progress line" in proc.stderr and "our own warning" in proc.stderr
    assert "noise" not in proc.stderr + proc.stdout
    log = Path(proc.stderr.split("LOG ", 1)[1].split()[0])
    assert not log.exists()  # deleted after a clean exit
