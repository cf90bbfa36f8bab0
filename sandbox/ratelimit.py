"""Per-API-key token buckets: ``per_minute`` refill rate, ``burst`` capacity (default: ``per_minute``)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["RateLimiter"]


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class RateLimiter:
    def __init__(self, per_minute: float, clock: Callable[[], float], burst: int | None = None) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self.configure(per_minute, burst)

    def configure(self, per_minute: float, burst: int | None = None) -> None:
        """Change the rate (and capacity) now; buckets keep their tokens (capped at the new capacity)."""
        self.per_minute = per_minute
        self.burst = burst
        self._rate = per_minute / 60.0
        self._capacity = float(burst if burst is not None else per_minute)
        for bucket in self._buckets.values():
            bucket.tokens = min(bucket.tokens, self._capacity)

    def to_dict(self) -> dict[str, float | int | None]:
        return {"per_minute": self.per_minute, "per_second": self.per_minute / 60.0, "burst": self.burst}

    def acquire(self, scope: str) -> float:
        """Take one token: ``0.0`` if granted, else the seconds until a token will be available."""
        now = self._clock()
        bucket = self._buckets.get(scope)
        if bucket is None:
            bucket = self._buckets[scope] = _Bucket(self._capacity, now)
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self._capacity, bucket.tokens + elapsed * self._rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self._rate

    def clear(self) -> None:
        self._buckets.clear()
