"""Per-API-key limits: requests per minute (a token bucket) and images in flight.

Configured per key (``rate_limits.keys``, else ``rate_limits.default``); over a limit the client
gets 429 in OpenAI's shape (``code: rate_limit_exceeded``) with ``Retry-After``.

**Per Ingress replica, not shared.** Each replica keeps its own buckets and counts: a shared
count would need an atomic increment on every request, which the result store (a folder or S3)
does not offer (a conditional-write loop on S3 costs two round trips per request and contends
under load). Serve's proxy spreads requests evenly over the Ingress replicas, so with R
replicas a key gets up to R times the configured numbers: configure ``limit / R`` for a
cluster-wide limit (the Ingress is small; most apps run one or two replicas).

The bucket is a pure function of ``(state, now)`` (:func:`take`): tests pass the clock in.
Worked example: 60 requests/minute with a burst of 10 refills one token a second; a key idle for
a while sends 10 at once, the 11th (at the same moment) is refused with ``Retry-After: 1``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from serve.errors import RateLimitError


class KeyLimit(BaseModel):
    """One key's limits; a limit left unset does not apply."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: float | None = Field(
        None, gt=0, description="Sustained generation requests (sync and jobs) per minute; None = unlimited."
    )
    burst: int | None = Field(
        None,
        ge=1,
        description="Requests a key may send at once after being idle (the bucket's size); "
        "None = 10 seconds' worth of requests_per_minute, at least 1.",
    )
    max_inflight_images: int | None = Field(
        None, ge=1, description="Images a key may have in generation at once (n of each running request); None = any."
    )

    @property
    def capacity(self) -> float:
        if self.burst is not None:
            return float(self.burst)
        return max(1.0, (self.requests_per_minute or 0.0) / 6.0)


class RateLimits(BaseModel):
    """Limits per API key; keys without an entry get ``default``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: KeyLimit = Field(
        default_factory=KeyLimit,
        description="Limits of every key without its own entry (without api_keys: of all callers together).",
    )
    keys: dict[str, KeyLimit] = Field(
        default_factory=dict, description="Per API key (the key as in api_keys): its limits, replacing default."
    )

    def for_key(self, key: str | None) -> KeyLimit:
        return self.keys.get(key, self.default) if key is not None else self.default


@dataclass(frozen=True)
class Bucket:
    """A token bucket's state: ``tokens`` left at time ``updated`` (seconds, any clock)."""

    tokens: float
    updated: float


def take(bucket: Bucket | None, limit: KeyLimit, now: float) -> tuple[Bucket, float]:
    """Spend one token: ``(new state, 0.0)`` if there is one, else ``(state, seconds until one)``.

    A bucket seen first (``None``) starts full. Tokens refill at ``requests_per_minute / 60`` per
    second up to ``capacity``.
    """
    if limit.requests_per_minute is None:
        return bucket or Bucket(0.0, now), 0.0
    rate = limit.requests_per_minute / 60.0
    capacity = limit.capacity
    if bucket is None:
        tokens = capacity
    else:
        tokens = min(capacity, bucket.tokens + max(0.0, now - bucket.updated) * rate)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, now), 0.0
    return Bucket(tokens, now), (1.0 - tokens) / rate


def retry_after(seconds: float) -> int:
    """Whole seconds for a ``Retry-After`` header: never earlier than the token (ceil), at least 1."""
    return max(1, math.ceil(seconds))


class KeyLimiter:
    """This replica's buckets and in-flight image counts, per key."""

    def __init__(self, limits: RateLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._buckets: dict[str | None, Bucket] = {}
        self._inflight: dict[str | None, int] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        limits = [self.limits.default, *self.limits.keys.values()]
        return any(lim.requests_per_minute is not None or lim.max_inflight_images is not None for lim in limits)

    def admit(self, key: str | None, images: int) -> None:
        """Count one request of ``images`` images for ``key``, or raise :class:`RateLimitError`.

        An admitted request must be :meth:`release` d when it ends (success or not).
        """
        limit = self.limits.for_key(key)
        with self._lock:
            inflight = self._inflight.get(key, 0)
            if limit.max_inflight_images is not None and inflight + images > limit.max_inflight_images:
                raise RateLimitError(
                    f"this key has {inflight} image(s) in generation and a limit of {limit.max_inflight_images} "
                    f"at once; this request asks for {images}",
                    kind="images",
                    retry_after_s=1,
                )
            bucket, wait = take(self._buckets.get(key), limit, self.clock())
            self._buckets[key] = bucket
            if wait > 0:
                raise RateLimitError(
                    f"rate limit of {limit.requests_per_minute:g} requests per minute reached for this key; "
                    f"retry in {retry_after(wait)} s",
                    kind="requests",
                    retry_after_s=retry_after(wait),
                )
            self._inflight[key] = inflight + images

    def release(self, key: str | None, images: int) -> None:
        with self._lock:
            left = self._inflight.get(key, 0) - images
            if left > 0:
                self._inflight[key] = left
            else:
                self._inflight.pop(key, None)


__all__ = ["Bucket", "KeyLimit", "KeyLimiter", "RateLimits", "retry_after", "take"]
