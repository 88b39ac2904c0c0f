"""The process's GIL switch interval (``AppConfig.gil_switch_interval_ms``): how long a thread
that wants the GIL waits before its holder must drop it. Ray-free: replicas set it with their
logging (``deployments/observability.py``), the bench's in-process baseline and ``bench/gil.py``
around their runs."""

from __future__ import annotations

import sys


def set_gil_switch_interval(ms: float | None) -> float:
    """This process's GIL switch interval to ``ms`` milliseconds (None: leave it); returns the
    interval it had, in seconds (``sys.setswitchinterval`` takes it back)."""
    before = sys.getswitchinterval()
    if ms is not None:
        sys.setswitchinterval(ms / 1000)
    return before


__all__ = ["set_gil_switch_interval"]
