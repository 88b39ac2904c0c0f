"""CPU time per image, by process: where a run's CPU went, measured in a way a busy machine bends less.

Wall-clock latency and throughput on a shared machine depend on what else runs there; the CPU
seconds each process of the target spends per image depend much less on it. For a target the
bench started (``--serve``), every process of its tree (``darkroom serve``, Ray's GCS and raylet,
the controller, the proxy, every replica) plus the bench process itself (the client) are read
from ``/proc`` before and after the measured schedule; for the in-process target, the bench
process. Linux only: elsewhere the report says "not measured".

Worked example: a c=8 run of 24 images in which the Ingress replica used 1.75 CPU-s, the proxy
0.15 s and the bench client 0.07 s reports 73, 6 and 3 CPU-ms per image (82 in total); the
in-process pipeline at 77 CPU-ms per image then is the limit those 82 approach.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CLIENT = "bench client (this process)"


def _stat(pid: int) -> tuple[int, float] | None:
    """``(ppid, cpu seconds)`` of a process, from ``/proc/PID/stat``; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command may hold spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def label(pid: int) -> str:
    """A stable name for a process: Ray's process title without the method it is running
    (``ray::ServeController.listen_for_change`` -> ``ray::ServeController``), else the program's
    or script's file name."""
    try:
        argv = [p.decode(errors="replace") for p in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if p]
    except OSError:
        return f"pid {pid}"
    if not argv:
        return f"pid {pid}"
    if argv[0].startswith("ray::"):
        return " ".join(argv).split(".")[0].split()[0]
    name = Path(argv[0]).name
    if name.startswith("python"):
        rest = iter(argv[1:])
        for arg in rest:
            if arg == "-c":
                return f"{name} -c"
            if arg == "-m":
                return f"{name} -m {next(rest, '')}"
            if not arg.startswith("-"):
                return f"{name} {Path(arg).name}"
    return name


def tree(root: int) -> list[int]:
    """``root`` and every descendant alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def snapshot(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds of each process alive now."""
    out = {}
    for pid in pids:
        stat = _stat(pid)
        if stat is not None:
            out[pid] = stat[1]
    return out


def per_image(before: dict[int, float], after: dict[int, float], images: int) -> dict[str, float] | None:
    """CPU-ms per image by process label (processes alive at both ends), plus ``total``; the
    bench process is labelled ``CLIENT``. None without /proc or images."""
    if not images or not after:
        return None
    me = os.getpid()
    by: dict[str, float] = {}
    for pid, end in after.items():
        if pid not in before:
            continue
        name = CLIENT if pid == me else label(pid)
        by[name] = by.get(name, 0.0) + (end - before[pid]) * 1000.0 / images
    out = {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1]) if v > 0}
    out["total"] = round(sum(by.values()), 2)
    return out


__all__ = ["CLIENT", "label", "per_image", "snapshot", "tree"]
