"""What ``darkroom serve`` shows while it starts, serves and stops.

Its own lines only, by default: Ray's start warnings, Serve's "Connecting to existing Serve app
... New http_options will not be applied" (misleading: it is the app this command just
started) and its shutdown noise ("Task ServeController.graceful_shutdown failed ...") go to a
log file instead (``--verbose`` shows them). Startup reports each stage as it loads and becomes
ready (from Serve's own status), then a banner: the URL, the API docs, the playground when the
app has one, where results go, and a request to try.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from serve.errors import DarkroomError

TRY_BODY = '{"prompt": "a yellow triangle in the center on a purple background", "num_inference_steps": 20}'


class ServeConsole:
    """Within ``with``: the process's stdout/stderr (Python's and the C++ core's, file
    descriptors 1 and 2) go to a log file, and ``say``/``show`` reach the terminal.

    Without ``quiet`` nothing is redirected (``--verbose``). The log file is deleted after a
    clean exit and named on the terminal after a failure.
    """

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.log_path: Path | None = None
        self.out: TextIO = sys.stdout
        self.err: TextIO = sys.stderr
        self._saved: tuple[int, int] | None = None
        self._handlers: list[logging.StreamHandler] = []

    def __enter__(self) -> ServeConsole:
        if not self.quiet:
            return self
        fd, path = tempfile.mkstemp(prefix="darkroom-serve-", suffix=".log")
        self.log_path = Path(path)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        self.err = os.fdopen(os.dup(2), "w", buffering=1)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        # Darkroom's own log records still reach the terminal; Ray's loggers write to fd 2.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.stdout):
                handler.setStream(self.err)
                handler.addFilter(_not_ray)
                self._handlers.append(handler)
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if self._saved is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        for handler in self._handlers:
            handler.setStream(sys.stderr)
            handler.removeFilter(_not_ray)
        self.out.close()
        self.err.close()
        self.out, self.err = sys.stdout, sys.stderr
        failed = kind is not None and not issubclass(kind, (KeyboardInterrupt, SystemExit))
        if self.log_path is not None and not failed:
            self.log_path.unlink(missing_ok=True)
        elif self.log_path is not None:
            print(f"darkroom: Ray's output is in {self.log_path}", file=sys.stderr)

    def say(self, message: str) -> None:
        """A progress line (stderr)."""
        print(message, file=self.err, flush=True)

    def show(self, message: str) -> None:
        """A result line (stdout): the banner."""
        print(message, file=self.out, flush=True)


def _not_ray(record: logging.LogRecord) -> bool:
    return not record.name.startswith("ray")


def stage_state(dep: Any) -> str:
    """One deployment's state in words: loading, ready, scaled to zero, failed."""
    status = str(getattr(dep.status, "value", dep.status))
    running = sum(n for state, n in dep.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")
    if status == "DEPLOY_FAILED":
        return "failed"
    if running:
        return "ready"
    if status == "HEALTHY":
        return "scaled to zero"  # no replica and nothing to start: min_replicas 0
    return "loading"


def wait_until_deployed(app_names: Iterable[str], timeout_s: float, say: Callable[[str], None], t0: float) -> None:
    """Report each stage's progress (loading -> ready) until every app is RUNNING (bounded).

    Not ``deploy_apps(_blocking=True)``: that gives up after a fixed 60 s, shorter than a GPU
    replica's start (weights download + load) or a busy small machine's. A DEPLOY_FAILED app
    raises with Serve's reason.
    """
    from ray import serve

    names = list(app_names)
    deadline = time.monotonic() + timeout_s
    reported: dict[str, str] = {}
    last = "no status yet"
    while time.monotonic() < deadline:
        apps = serve.status().applications
        for name in names:
            app = apps.get(name)
            if app is None:
                continue
            if str(getattr(app.status, "value", app.status)) == "DEPLOY_FAILED":
                raise DarkroomError(f"Serve could not deploy {name!r}: {app.message}")
            for dep_name, dep in app.deployments.items():
                label = dep_name if len(names) == 1 else f"{name}/{dep_name}"
                state = stage_state(dep)
                if reported.get(label) == state:
                    continue
                reported[label] = state
                elapsed = time.monotonic() - t0
                if state == "loading":
                    say(f"  {label}: loading ...")
                elif state == "ready":
                    say(f"  {label}: ready ({elapsed:.0f} s)")
                elif state == "scaled to zero":
                    say(f"  {label}: ready, at zero replicas (starts on the first request)")
        states = {n: str(getattr(apps[n].status, "value", apps[n].status)) for n in names if n in apps}
        if len(states) == len(names) and all(s == "RUNNING" for s in states.values()):
            return
        last = ", ".join(f"{n} {s}" for n, s in states.items()) or last
        time.sleep(0.5)
    raise DarkroomError(f"Serve applications not running within {timeout_s:.0f} s: {last}")


def wait_ready(url: str, timeout_s: float) -> None:
    """Bounded wait for ``url/readyz`` to answer 200."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200:
                return
            last = r.text[:300]
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise DarkroomError(f"the app did not become ready within {timeout_s:.0f} s: {last}")


def has_playground(url: str) -> bool:
    """Whether the app serves a page at its root (the playground)."""
    import httpx

    try:
        r = httpx.get(f"{url}/", headers={"Accept": "text/html"}, timeout=5)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.headers.get("content-type", "").startswith("text/html")


def banner(url: str, results: str, api_keys: bool, playground: bool) -> list[str]:
    """The lines printed once the app is ready."""
    auth = " -H 'Authorization: Bearer YOUR_KEY'" if api_keys else ""
    curl = f"curl -s {url}/v1/images/generations -H 'Content-Type: application/json'{auth} -d {shlex.quote(TRY_BODY)}"
    lines = [f"Darkroom is serving at {url} (Ctrl-C to stop)", f"  API docs:   {url}/docs"]
    if playground:
        lines.append(f"  playground: {url}/")
    lines += [f"  results:    {results}", f"  try:        {curl}"]
    return lines


def results_location(storage: str) -> str:
    """Where images land, as a user finds them: an absolute folder, or the S3 URI as given."""
    if "://" in storage and not storage.startswith("file://"):
        return storage
    return str(Path(storage.removeprefix("file://")).expanduser().resolve())
