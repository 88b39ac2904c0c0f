"""Free loopback ports for servers a test starts, chosen where nothing else will take them.

A port from ``bind(("127.0.0.1", 0))`` comes from the kernel's ephemeral range (32768-60999 by
default), and so do the ports every Ray process binds the same way (GCS clients, the dashboard
agent, gRPC servers): a server started a moment later on that port could find it taken (seen in
CI: Serve's proxy "Failed to bind to address '127.0.0.1:43295'"). These come from below the
ephemeral range and above Ray's worker ports (10002-19999 by default), checked free, never the
same one twice in a test session.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_LOW = 20000  # above Ray's default min/max_worker_port range (10002-19999)
_given: set[int] = set()
_lock = threading.Lock()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere the range differs, and the bind check still holds


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    high = _ephemeral_low() - 1
    with _lock:
        if high - _LOW > 100:
            for _ in range(200):
                port = random.randint(_LOW, high)
                if port not in _given and _bindable(port):
                    _given.add(port)
                    return port
        # No room below the ephemeral range (an unusual kernel setting): the kernel's choice.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        _given.add(port)
        return port


__all__ = ["free_port"]
