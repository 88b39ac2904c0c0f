"""Before ``darkroom serve`` starts Ray: is its HTTP port free, and if not, what holds it.

Ray Serve's proxy binds with SO_REUSEPORT, so a second cluster on a busy port starts without
error and the kernel splits connections between the two (PITFALLS); a port held by another
program ends in a long Ray traceback. A plain bind (without SO_REUSEPORT) fails in both cases:
that is the check. No Ray import here, so a refused start costs well under a second.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from serve.errors import InvalidRequestError

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def check_port(host: str, port: int) -> None:
    """Raise ``InvalidRequestError("--port", ...)`` naming what holds ``host:port``, if anything."""
    holder = port_holder(host, port)
    if holder is not None:
        raise InvalidRequestError("--port", port, f"in use on {host} by {holder}; stop it or choose another port")


def port_holder(host: str, port: int) -> str | None:
    """None when ``host:port`` is free to listen on; otherwise what holds it, in words."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise InvalidRequestError("--host", host, f"cannot be resolved ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as sock:
        # SO_REUSEADDR, as servers set it, so a port in TIME_WAIT after a restart counts as free;
        # never SO_REUSEPORT, which would share the port with a running Serve proxy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
            return None
        except PermissionError:
            return "nobody yet, but binding it needs privileges (ports below 1024 need root)"
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    return describe_holder(_WILDCARDS.get(host, host), port)


def describe_holder(host: str, port: int) -> str:
    """What answers on ``host:port``: another Darkroom, another Ray Serve, or a named program."""
    served = _probe_http(host, port)
    process = listening_process(port)
    if served and process:
        return f"{served} ({process})"
    if served:
        return served
    if process:
        if "ray::" in process or "ProxyActor" in process:
            return f"a Ray Serve proxy ({process})"
        return f"another program ({process})"
    return "another program"


def _probe_http(host: str, port: int) -> str | None:
    """Ask the port: Ray Serve's proxy lists its routes at ``/-/routes``; Darkroom answers
    ``/healthz`` with ``{"status": "ok"}``."""
    import httpx

    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with httpx.Client(base_url=f"http://{netloc}", timeout=1.0) as http:
            routes = http.get("/-/routes")
            apps = routes.json() if routes.status_code == 200 else None
            apps = apps if isinstance(apps, dict) else None
            prefixes = sorted(apps) if apps else ["/"]
            for prefix in prefixes:
                health = http.get(prefix.rstrip("/") + "/healthz")
                if health.status_code == 200 and _json(health) == {"status": "ok"}:
                    name = f" (Ray Serve app {apps[prefix]!r} at {prefix})" if apps else ""
                    return f"another Darkroom{name}"
            if apps is not None:
                listed = ", ".join(f"{v!r} at {k}" for k, v in sorted(apps.items())) or "no apps yet"
                return f"another Ray Serve instance ({listed})"
    except (httpx.HTTPError, ValueError):
        return None
    return None


def _json(response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


def listening_process(port: int) -> str | None:
    """``pid N: command line`` of the process listening on TCP ``port`` (Linux ``/proc``), or
    None when it cannot be told (another OS, or another user's process without privileges)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; field 9 is the socket inode.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in inodes:
                return f"pid {pid}: {_command_line(pid)}"
    return None


def _command_line(pid: str) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    line = " ".join(" ".join(part.decode(errors="replace").split()) for part in raw.split(b"\0") if part)
    return line[:100] + ("..." if len(line) > 100 else "")
