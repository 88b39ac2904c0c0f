"""The in-process baseline runs alone: finding serving clusters alive on this machine, and a
target the bench launches and stops itself (``darkroom bench --serve CONFIG``).

Why (DESIGN house style 9, PITFALLS "A baseline runs alone"): measured beside a live Ray
cluster, the in-process pipeline shares its cores with a dozen Ray processes (GCS, raylet,
controller, proxy, replicas) that poll and health-check even when idle; measured that way here it
ran 2-3x slower (p50 297/180/292 ms beside the cluster, 81/93/109 ms alone right after), which
made the served app look closer to its limit than it is.

What counts as alive: a Ray instance (its ``raylet`` or ``gcs_server`` process) or a ``darkroom
serve`` process, by anyone, on this machine. Found from ``/proc`` (Linux; elsewhere ``psutil``
when installed). Plain Python: nothing heavy is imported.

Frozen instead of stopped (``darkroom bench --serve CONFIG --in-process --freeze``): every process
of the server the bench started is sent SIGSTOP and read back as stopped (``T``) before the
in-process run, and SIGCONT after. A stopped process gets no CPU time (the run records the
frozen processes' CPU seconds to show it: 0), so the baseline still runs alone on the cores, but
the server need not be restarted for every round: rounds cost seconds instead of a minute, so a
run can afford many short, interleaved ones, and the machine's drift (this machine: 9-15 img/s
for the same baseline minutes apart) falls on both sides of each ratio alike.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.cpu import tree
from serve.errors import DarkroomError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveCluster:
    """One serving cluster found on this machine: ``kind`` is ``ray`` or ``darkroom serve``."""

    kind: str
    pid: int
    session: str | None  # Ray's session name (one per cluster), None for a darkroom serve process
    command: str

    def describe(self) -> str:
        if self.kind == "ray":
            return f"a Ray instance (pid {self.pid}, {self.session or 'unknown session'})"
        return f"a darkroom serve process (pid {self.pid}: {self.command})"


def _processes() -> list[tuple[int, list[str]]]:
    """``(pid, argv)`` of every process this user can see."""
    out: list[tuple[int, list[str]]] = []
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
            if argv:
                out.append((int(entry.name), argv))
        return out
    try:
        import psutil
    except ImportError:  # pragma: no cover - neither /proc nor psutil: cannot tell
        logger.warning("cannot list processes (no /proc, no psutil): assuming no cluster is alive")
        return out
    for p in psutil.process_iter(["pid", "cmdline"]):  # pragma: no cover - non-Linux
        argv = p.info.get("cmdline") or []
        if argv:
            out.append((p.info["pid"], list(argv)))
    return out


def _session(argv: list[str]) -> str | None:
    for arg in argv:
        for flag in ("--session_name=", "--session-name="):
            if arg.startswith(flag):
                return arg[len(flag) :]
    return None


def _is_darkroom_serve(argv: list[str]) -> bool:
    """``darkroom serve ...`` or ``python -m serve.cli serve ...`` (not bench, generate, --check)."""
    if "--check" in argv:
        return False  # validates a file; starts nothing
    for i, arg in enumerate(argv[:-1]):
        if Path(arg).name == "darkroom" and argv[i + 1] == "serve":
            return True
        if arg == "-m" and argv[i + 1] == "serve.cli" and i + 2 < len(argv) and argv[i + 2] == "serve":
            return True
    return False


def live_clusters(
    processes: Iterable[tuple[int, list[str]]] | None = None,
    *,
    ignore_sessions: Iterable[str] = (),
    ignore_pids: Iterable[int] = (),
) -> list[LiveCluster]:
    """Serving clusters alive on this machine (one entry per Ray session, one per darkroom serve).

    ``processes`` defaults to this machine's; ``ignore_sessions`` names Ray sessions not to count
    (a test's own session-wide cluster, measured apart by other means); ``ignore_pids`` names
    processes not to count (the bench's own launched server while it is frozen: ``frozen``).
    """
    ignored = set(ignore_sessions)
    skip = {os.getpid(), *ignore_pids}
    found: dict[str, LiveCluster] = {}
    for pid, argv in _processes() if processes is None else processes:
        if pid in skip or not argv:
            continue
        command = " ".join(argv)
        if Path(argv[0]).name in ("raylet", "gcs_server"):
            session = _session(argv)
            if session in ignored:
                continue
            key = f"ray:{session or pid}"
            if key not in found or Path(argv[0]).name == "raylet":
                found[key] = LiveCluster("ray", pid, session, command[:120])
        elif _is_darkroom_serve(argv):
            found[f"serve:{pid}"] = LiveCluster("darkroom serve", pid, None, command[:120])
    return sorted(found.values(), key=lambda c: c.pid)


def require_alone(ignore_sessions: Iterable[str] = (), ignore_pids: Iterable[int] = ()) -> None:
    """Raise (one line) when a serving cluster is alive: the in-process baseline must run alone."""
    alive = live_clusters(ignore_sessions=ignore_sessions, ignore_pids=ignore_pids)
    if alive:
        names = "; ".join(c.describe() for c in alive[:3]) + (f" and {len(alive) - 3} more" if len(alive) > 3 else "")
        raise DarkroomError(
            f"refusing to measure the in-process baseline beside a live serving cluster on this machine ({names}): "
            "it would share the cores; stop it, or let the bench start and stop the target itself "
            "(darkroom bench --serve CONFIG --in-process)"
        )


def wait_until_gone(sessions: Iterable[str], timeout_s: float) -> list[LiveCluster]:
    """Wait (bounded) until no process of the named Ray sessions is left; returns what is left."""
    wanted = set(sessions)
    deadline = time.monotonic() + timeout_s
    while True:
        left = [c for c in live_clusters() if c.session in wanted]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def process_state(pid: int) -> str | None:
    """The one-letter state of a process (``R``, ``S``, ``T`` for stopped, ...); None if it is gone
    (or without ``/proc``)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()[0]


def signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_stopped(pids: list[int], timeout_s: float) -> list[str]:
    """Wait (bounded) until every process is stopped (state ``T``); returns ``pid (state)`` of each
    that is not (a gone process reads ``gone``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {pid: process_state(pid) for pid in pids}
        running = [f"{pid} ({state or 'gone'})" for pid, state in states.items() if state not in ("T", "t")]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.02)


class LaunchedServer:
    """``darkroom serve --config CONFIG`` in a child process, started and stopped by the bench.

    ``start()`` returns once every URL answers ``/readyz`` (bounded); ``stop()`` sends SIGTERM
    (``darkroom serve`` then shuts down the app and the local Ray cluster it started), waits for
    the process and for every process of that Ray session to exit, and raises if any is left.
    """

    def __init__(
        self,
        config: Path,
        urls: list[str],
        *,
        port: int | None = None,
        ready_timeout_s: float = 300.0,
        stop_timeout_s: float = 120.0,
        log_path: Path | None = None,
        model: str | None = None,
    ) -> None:
        self.config = Path(config)
        self.model = model  # darkroom serve --model: replaces the config's model in every app
        self.urls = urls
        self.port = port
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.sessions: set[str] = set()
        self.starts = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "serve.cli", "serve", "--config", str(self.config)]
        if self.port is not None:
            cmd += ["--port", str(self.port)]
        if self.model is not None:
            cmd += ["--model", self.model]
        cmd += ["--ready-timeout", str(int(self.ready_timeout_s))]
        return cmd

    def start(self) -> float:
        """Start the server and wait for it; returns the seconds it took."""
        if self.proc is not None:
            raise RuntimeError("already started")
        before = {c.session for c in live_clusters() if c.kind == "ray"}
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another cluster
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop
        t0 = time.monotonic()
        proc = self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env, start_new_session=True)
        self._log = log
        self.starts += 1
        try:
            self._wait_ready(proc, t0)
        except BaseException:
            self.stop()
            raise
        self.sessions = {c.session for c in live_clusters() if c.kind == "ray" and c.session} - before
        return time.monotonic() - t0

    def _wait_ready(self, proc: subprocess.Popen, t0: float) -> None:
        import httpx

        pending = list(self.urls)
        last = "no answer"
        while pending:
            # ``proc``, not ``self.proc``: a stop() from another thread (the run was interrupted
            # while the server started) clears self.proc; the process's exit ends this wait.
            if proc.poll() is not None:
                raise DarkroomError(
                    f"the server the bench started exited with status {proc.returncode} before it was ready"
                    + (f" (its output: {self.log_path})" if self.log_path else "")
                )
            if time.monotonic() - t0 > self.ready_timeout_s:
                raise DarkroomError(f"{pending[0]} not ready within {self.ready_timeout_s:.0f} s ({last})")
            try:
                r = httpx.get(f"{pending[0]}/readyz", timeout=5)
                if r.status_code == 200:
                    pending.pop(0)
                    continue
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(0.5)

    def processes(self) -> list[int]:
        """The server's process and every descendant (Ray's GCS, raylet, controller, proxy, replicas)."""
        return tree(self.proc.pid) if self.proc is not None else []

    @contextmanager
    def frozen(self, timeout_s: float = 10.0) -> Iterator[list[int]]:
        """Freeze every process of the server (SIGSTOP) for the block, then let them go on (SIGCONT).

        Yields the frozen pids once each reads stopped (``T``) in ``/proc``; raises (after thawing)
        if one does not within ``timeout_s`` or is gone. A stopped process is given no CPU at all,
        so the block runs as if the server were not there; its memory stays. Ray's and Serve's
        health checks time out after 10-30 s, so keep a block shorter than that (one level's
        in-process run). The server is thawed even if the block raises.
        """
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("not running")
        pids = tree(self.proc.pid)
        try:
            signal_all(pids, signal.SIGSTOP)
            running = wait_stopped(pids, timeout_s)
            if running:
                raise DarkroomError(
                    f"could not freeze the server the bench started: not stopped after {timeout_s:.0f} s: "
                    + ", ".join(running[:5])
                )
            yield pids
        finally:
            signal_all(pids, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server and its Ray cluster (bounded); raise if any of its processes is left."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "darkroom serve (pid %d) ignored SIGTERM for %.0f s: killing it", proc.pid, self.stop_timeout_s
                )
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        left = wait_until_gone(self.sessions, self.stop_timeout_s)
        if left:
            raise DarkroomError(
                "the cluster the bench started is still alive after stopping it ("
                + "; ".join(c.describe() for c in left)
                + "): not measuring the in-process baseline beside it"
            )


__all__ = [
    "LaunchedServer",
    "LiveCluster",
    "live_clusters",
    "process_state",
    "require_alone",
    "signal_all",
    "wait_stopped",
    "wait_until_gone",
]
