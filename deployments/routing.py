"""LoRA-affinity request routing for the Denoiser: send a request where its adapters already are.

Each Denoiser replica keeps its own adapter cache (``serve.lora``), bounded in bytes. With plain
routing (Serve's power of two choices) every replica sees every adapter, so with more adapters
than one cache holds each replica keeps loading and evicting. Here a request prefers a replica
that holds its adapters -- as the replica reported them (``record_routing_stats``: ``{"loras":
[...]}``, every ``request_routing_stats_period_s``) or as this router last sent them (known at
once, before the next report) -- unless that replica's queue is longer than the least loaded one's
by more than ``max_imbalance``; then, and for requests without adapters, the least loaded wins.

``rank_replicas`` is the policy, a pure function (unit-tested without Ray); ``LoraAffinityRouter``
is the thin Ray Serve ``RequestRouter`` (alpha API in Ray 2.60) around it. The base class probes
queue lengths within each returned rank and takes the shortest queue that accepts the request.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

logger = logging.getLogger(__name__)

#: How long an adapter this router sent to a replica counts as held there without a report.
RECENT_S = 30.0


def rank_replicas(
    replicas: Sequence[Hashable],
    wanted: Sequence[str],
    held: Mapping[Hashable, set[str]],
    queue: Mapping[Hashable, int | None],
    *,
    max_imbalance: int,
    rng: random.Random | None = None,
) -> list[list[Hashable]]:
    """Ranks of replicas to try, most preferred first.

    Worked example: replicas r1 (holds ink, queue 3) and r2 (holds nothing, queue 1); a request for
    ink with ``max_imbalance`` 4 -> ``[[r1], [r2, r1]]`` (r1's queue is within 4 of the shortest);
    with ``max_imbalance`` 1 -> ``[[r2, r1]]`` by queue: the affinity is not worth the wait. A
    request for oil, which neither holds, at equal queues -> r2 first (it holds fewer adapters).
    """
    rng = rng or random
    if not replicas:
        return []
    if not wanted:
        # Plain power of two choices: two random replicas, the base class takes the shorter queue.
        return [rng.sample(list(replicas), min(2, len(replicas)))]
    lengths = {r: queue.get(r) or 0 for r in replicas}
    shortest = min(lengths.values())
    score = {r: len(set(wanted) & held.get(r, set())) for r in replicas}
    best = max(score.values())
    # Ties on queue length: the replica holding more of the wanted adapters, then the one holding
    # fewer adapters in all (a new adapter goes where there is room: adapters spread over replicas),
    # then at random.
    tie = {r: rng.random() for r in replicas}
    by_queue = sorted(replicas, key=lambda r: (lengths[r], -score[r], len(held.get(r, ())), tie[r]))
    if best == 0:
        return [by_queue]
    preferred = [r for r in replicas if score[r] == best and lengths[r] <= shortest + max_imbalance]
    if not preferred:
        return [by_queue]
    return [sorted(preferred, key=lambda r: lengths[r]), by_queue]


def job_loras(pending: PendingRequest | None) -> list[str]:
    """The adapter names of the DenoiseJob a request carries (none for other calls)."""
    if pending is None or not pending.args:
        return []
    return [name for name, _ in getattr(pending.args[0], "loras", ()) or ()]


class LoraAffinityRouter(RequestRouter):
    """Ray Serve request router for the Denoiser: adapter affinity, bounded by queue imbalance."""

    max_imbalance = 4

    def initialize_state(self, max_imbalance: int = 4, **kwargs: Any) -> None:
        self.max_imbalance = int(max_imbalance)

    @property
    def _recent(self) -> dict[str, tuple[ReplicaID, float]]:
        """Adapter -> (replica, when this router sent a request using it there)."""
        if not hasattr(self, "_recent_routes"):
            self._recent_routes: dict[str, tuple[ReplicaID, float]] = {}
        return self._recent_routes

    def _held(self, replicas: Sequence[RunningReplica]) -> dict[ReplicaID, set[str]]:
        now = time.monotonic()
        held = {}
        for r in replicas:
            stats = r.routing_stats or {}
            held[r.replica_id] = set(stats.get("loras", ()))
        for name, (rid, when) in list(self._recent.items()):
            if now - when > RECENT_S:
                del self._recent[name]
            elif rid in held:
                held[rid].add(name)
        return held

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        queue = {rid: self.replica_queue_len_cache.get(rid) for rid in by_id}
        ranks = rank_replicas(
            list(by_id),
            job_loras(pending_request),
            self._held(candidate_replicas),
            queue,
            max_imbalance=self.max_imbalance,
        )
        return [[by_id[rid] for rid in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        now = time.monotonic()
        for name in job_loras(pending_request):
            self._recent[name] = (replica_id, now)


__all__ = ["LoraAffinityRouter", "job_loras", "rank_replicas"]
