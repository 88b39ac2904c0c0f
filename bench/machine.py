"""Where and when a benchmark ran: the clock, the host's load, the machine, versions and commit
(nothing here imports torch or ray)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity where the OS says, else the CPU count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_metadata() -> dict[str, Any]:
    """Where and with what the run happened (nothing here imports torch or ray)."""
    status = _git("status", "--porcelain")
    return {
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_affinity": usable_cores() if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "python": sys.version.split()[0],
        },
        "versions": {
            d: _version(d) for d in ("darkroom", "torch", "diffusers", "transformers", "ray", "httpx", "fastapi")
        },
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None},
        "argv": sys.argv,
        "environment": settings_from_environment(),
    }


#: Environment variables that change how the served app or the baseline runs (Ray Serve's modes,
#: such as RAY_SERVE_ENABLE_HA_PROXY; thread counts; Darkroom's device and dtype): recorded with
#: every run. Names that may hold a secret are never recorded.
RECORDED_ENV = ("RAY_SERVE_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "DARKROOM_DEVICE", "DARKROOM_DTYPE")
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")


def settings_from_environment() -> dict[str, str]:
    """The recorded variables set in this process's environment (the launched server inherits them)."""
    return {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith(RECORDED_ENV) and not any(word in k for word in SECRET_WORDS)
    }


__all__ = ["load1", "machine_metadata", "now_iso", "settings_from_environment", "usable_cores"]
