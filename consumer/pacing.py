"""Send timing for provider calls: the client-side token bucket (``IDV_PROVIDER_RATE_LIMIT``) and the
slow-start pacer, both used by :class:`~consumer.concurrency.ProviderGate`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["Pacer", "TokenBucket"]


class TokenBucket:
    """Client-side rate limit: ``rate`` attempts per second, ``burst`` at once; FIFO by reservation.

    :meth:`reserve` takes a token now or books the next one (tokens may go negative), so callers are
    served in the order they asked, whichever partition they belong to; it returns the wait.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("need rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self._updated = clock()

    def reserve(self) -> float:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self._updated) * self.rate)
        self._updated = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def cancel(self) -> None:
        """A reserved token was not used (the waiter was cancelled): give it back."""
        self.tokens = min(self.burst, self.tokens + 1.0)


class Pacer:
    """Spaces sends ``interval`` seconds apart, first come first served (reservations, like
    :class:`TokenBucket`). The interval is read at each reservation; when it shrinks (the limit grew)
    the queue already booked is re-timed to it, so that a burst of reservations made at a small limit
    does not hold back the sends of a larger one."""

    def __init__(self) -> None:
        self._next = -math.inf
        self._interval = 0.0

    def reserve(self, now: float, interval: float) -> float:
        """Book the next send; returns how long to wait for it."""
        backlog = max(0.0, self._next - now)
        if 0 < interval < self._interval:
            backlog *= interval / self._interval
        self._interval = interval
        self._next = now + backlog + interval
        return backlog
