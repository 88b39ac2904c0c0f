"""What the tests read from a live local cluster: the replicas' log lines and the listening sockets
of the cluster's processes (from /proc, as ``ss -ltnp`` would)."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

# A replica's own lines (deployments/observability.py, serve/request_context.py LOG_FORMAT).
LINE = re.compile(r"\[stage=(?P<stage>\S+) replica=(?P<replica>\S+) request_id=(?P<request_id>\S+)\] (?P<message>.*)")


def logs_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


class LogWatch:
    """New lines of every file under the cluster's log folder since the watch started."""

    def __init__(self) -> None:
        self.root = logs_dir()
        self.offsets: dict[Path, int] = {p: p.stat().st_size for p in self._files()}
        self.seen: list[str] = []

    def _files(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.is_file() and p.suffix in (".log", ".err", ".out")]

    def poll(self) -> list[str]:
        for path in self._files():
            start = self.offsets.get(path, 0)
            try:
                with path.open("rb") as fh:
                    fh.seek(start)
                    data = fh.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # whole lines only; the rest is read next time
            self.offsets[path] = start + end
            self.seen += data[:end].decode("utf-8", "replace").splitlines()
        return self.seen

    def wait_for(self, predicate: Callable[[dict], bool], timeout_s: float = 60.0) -> dict:
        """The first of our lines (parsed) for which ``predicate`` holds; bounded wait."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.poll():
                m = LINE.search(line)
                if m and predicate(m.groupdict()):
                    return m.groupdict()
            if time.monotonic() > deadline:
                raise TimeoutError("no such log line within the timeout")
            time.sleep(0.05)

    def ours(self) -> list[dict]:
        return [m.groupdict() for line in self.poll() if (m := LINE.search(line))]


# -- listening sockets ---------------------------------------------------------------------------


def _address(hexaddr: str, v6: bool) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if v6:
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw), int(port, 16)
    return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)


def _listening_inodes() -> dict[str, tuple[str, int]]:
    out = {}
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                out[fields[9]] = _address(fields[1], v6)
    return out


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(pid: int) -> set[int]:
    parents = _parents()
    found, changed = {pid}, True
    while changed:
        changed = False
        for child, parent in parents.items():
            if parent in found and child not in found:
                found.add(child)
                changed = True
    return found


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120].strip()
    except OSError:
        return "?"


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int, str]]:
    """``(address, port, pid, command)`` for every TCP socket the processes listen on."""
    inodes = _listening_inodes()
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                address, port = inodes[target[8:-1]]
                out.append((address, port, pid, command(pid)))
    return sorted(set(out), key=lambda s: (s[1], s[2]))


def is_loopback(address: str) -> bool:
    return address in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or address.startswith("127.")
