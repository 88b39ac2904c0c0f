"""Each Serve replica's memory during a run, from /proc (no Ray import): what a soak test watches.

A replica is a process titled ``ray::ServeReplica:<app>:<deployment>`` (Ray sets the title);
its resident memory is ``VmRSS`` in ``/proc/<pid>/status``. Only replicas on this machine are
seen, which is where ``darkroom serve`` runs them; on a remote cluster the sampler finds none
and the report says so.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

PREFIXES = ("ray::ServeReplica:", "ray::ProxyActor", "ray::ServeController")


@dataclass(frozen=True)
class MemorySample:
    t: float  # seconds since the sampler started
    process: str  # "ServeReplica:app:Deployment" (+ "#pid"), "ProxyActor#pid", ...
    rss_bytes: int


def serve_processes(proc: Path = Path("/proc")) -> dict[int, str]:
    """pid -> name of every Serve replica, proxy and controller process on this machine."""
    out = {}
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith(PREFIXES):
            # Ray retitles a worker while it runs a method ("ray::ProxyActor.receive_asgi_messages"):
            # the actor's part names the process for the whole run.
            actor = title.removeprefix("ray::").split()[0].split(".")[0]
            out[int(entry.name)] = f"{actor}#{entry.name}"
    return out


def rss_bytes(pid: int, proc: Path = Path("/proc")) -> int | None:
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemorySampler:
    """Samples every Serve process's RSS every ``interval_s`` while ``run()`` is awaited (cancel it)."""

    def __init__(self, interval_s: float = 10.0, proc: Path = Path("/proc")) -> None:
        self.interval_s = interval_s
        self.proc = proc
        self.samples: list[MemorySample] = []
        self._t0 = time.monotonic()

    def sample(self) -> None:
        now = time.monotonic() - self._t0
        for pid, name in serve_processes(self.proc).items():
            rss = rss_bytes(pid, self.proc)
            if rss is not None:
                self.samples.append(MemorySample(now, name, rss))

    async def run(self) -> None:
        self._t0 = time.monotonic()
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.interval_s)


def available() -> bool:
    return os.path.isdir("/proc")


__all__ = ["MemorySample", "MemorySampler", "available", "rss_bytes", "serve_processes"]
