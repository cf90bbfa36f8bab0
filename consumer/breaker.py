"""A circuit breaker in front of the provider.

When most recent attempts fail with retriable errors (the provider is down or overloaded), sending every
message through its whole retry budget would only move the outage into the dead-letter topic. Instead the
breaker opens: attempts wait (without spending the message's retry budget), workers stay busy, the
in-flight slots fill up and the daemon pauses fetching. After ``open_s`` one probe attempt is let through
(half-open); its success closes the breaker, its failure opens it again.

Terminal answers (4xx) count as successes here: the provider is up, the request was wrong.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from consumer.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        *,
        window: int = 20,
        failure_ratio: float = 0.5,
        min_calls: int = 10,
        open_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.window = window
        self.failure_ratio = failure_ratio
        self.min_calls = min_calls
        self.open_s = open_s
        self.clock = clock
        self.on_change = on_change
        self.state = BreakerState.CLOSED
        self._results: deque[bool] = deque(maxlen=window)
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._changed = anyio.Event()
        self.opened_count = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, on_change: Callable[[BreakerState], None] | None = None
    ) -> CircuitBreaker:
        """The daemon's breaker (``IDV_BREAKER_*``); the window holds at least 20 results."""
        return cls(
            failure_ratio=settings.breaker_failure_ratio,
            min_calls=settings.breaker_min_calls,
            window=max(settings.breaker_min_calls, 20),
            open_s=settings.breaker_open_s,
            on_change=on_change,
        )

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            log.warning("provider circuit breaker %s", state.name.lower().replace("_", "-"))
            if state is BreakerState.OPEN:
                self.opened_count += 1
            if self.on_change is not None:
                self.on_change(state)
            self._changed.set()
            self._changed = anyio.Event()

    async def acquire(self) -> bool:
        """Wait until an attempt may be made; returns True when this attempt is the half-open probe."""
        while True:
            if self.state is BreakerState.CLOSED:
                return False
            if self.state is BreakerState.OPEN:
                remaining = self._opened_at + self.open_s - self.clock()
                if remaining <= 0:
                    self._set(BreakerState.HALF_OPEN)
                    continue
                with anyio.move_on_after(remaining):
                    await self._changed.wait()
                continue
            # HALF_OPEN: exactly one probe at a time; the others wait for its verdict.
            if not self._probe_in_flight:
                self._probe_in_flight = True
                return True
            await self._changed.wait()

    def abort_probe(self) -> None:
        """The probe was cancelled before a verdict: let another attempt probe."""
        self._probe_in_flight = False
        self._changed.set()
        self._changed = anyio.Event()

    def record(self, success: bool, *, probe: bool = False) -> None:
        if probe:
            self._probe_in_flight = False
            if success:
                self._results.clear()
                self._set(BreakerState.CLOSED)
            else:
                self._opened_at = self.clock()
                self._set(BreakerState.OPEN)
            return
        self._results.append(success)
        if self.state is BreakerState.CLOSED and len(self._results) >= self.min_calls:
            failures = self._results.count(False)
            if failures / len(self._results) >= self.failure_ratio:
                self._opened_at = self.clock()
                self._results.clear()
                self._set(BreakerState.OPEN)
