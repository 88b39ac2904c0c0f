"""Admission for the benchmark's baseline: one adapter set in the batch at a time.

Darkroom's Denoiser mixes adapters in one batch (``lora_batching="mixed"``). The baseline it is
measured against (``"one_group"``) serves one adapter set at a time, as a server must when an
adapter is merged into (or refitted onto) its weights, or when only requests sharing an adapter
may share a step: the batch holds requests of one adapter set; when it empties, the set of the
oldest waiting request goes next. Requests of the running set join it only while no other set
waits, so no set starves. Pure: ``pending`` and ``active`` are adapter-set keys.

Worked example (max 4): pending ``[A, B, A, A]``, nothing running -> admit indices 0, 2, 3 (the
A's); later, with A running and B waiting, a new A waits until the batch empties and B has run.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def one_group_admission(pending: Sequence[Hashable], active: Sequence[Hashable], room: int) -> list[int]:
    """Indices of ``pending`` (in queue order) to admit now."""
    if room <= 0 or not pending:
        return []
    if active:
        group = active[0]
        if any(k != group for k in pending):
            return []  # another set waits: let the running batch drain
    else:
        group = pending[0]
    return [i for i, k in enumerate(pending) if k == group][:room]


def adapter_set(loras: Sequence[tuple[str, float]]) -> Hashable:
    """The key two requests must share to batch together in the one-group baseline."""
    return tuple(sorted((n, float(s)) for n, s in loras))


__all__ = ["adapter_set", "one_group_admission"]
