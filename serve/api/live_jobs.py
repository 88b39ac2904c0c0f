"""A job running in this Ingress replica: its record and what its event streams replay and follow
(``serve/api/jobs.py`` runs it)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve.api.streaming import StreamContext


@dataclass(eq=False)
class LiveJob:
    """A job running in this replica: its record and what its event streams replay and follow."""

    record: dict[str, Any]
    ctx: StreamContext
    task: asyncio.Task | None = None
    events: list[bytes] = field(default_factory=list)  # partial and completed events so far
    subscribers: set[asyncio.Queue] = field(default_factory=set)
    cancel_requested: bool = False
    lost: bool = False  # another replica took the job over: this attempt is void
    on_end: Callable[[], None] | None = None  # e.g. release its API key's images
    written_at: float = 0.0
    # Record writes run in threads, and a cancelled write's thread still finishes: numbered
    # writes under a lock keep a late progress write from overwriting the final record.
    writes: int = 0
    written: int = 0
    write_lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, chunk: bytes | None, keep: bool = False) -> None:
        """Send an event to every subscriber (None ends their streams); ``keep``: replay it to late ones."""
        if keep and chunk is not None:
            self.events.append(chunk)
        for queue in self.subscribers:
            queue.put_nowait(chunk)
