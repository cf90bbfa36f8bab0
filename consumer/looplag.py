"""Event-loop lag: how late a periodic timer fires, i.e. how long a ready callback waits for the CPU.

The adaptive concurrency controller (consumer/concurrency.py) reads it as the daemon's own queue. At a
slow provider (500 ms, 2 s) the round trip barely moves when the daemon's CPU saturates, so the latency
gradient sees nothing while each further call in flight makes every call dearer (a larger heap, more
timers and sockets) and the rate falls. The lag rises at once: every answer waits that long before its
worker runs. Exported as ``idv_event_loop_lag_seconds`` (operators see a CPU-bound daemon directly).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

__all__ = ["LagRule", "LoopLag"]


class LoopLag:
    """A timer every ``interval_s``; ``value`` is its smoothed lateness in seconds (half-life
    ``halflife_s``), ``peak`` the largest single lateness since the last :meth:`take_peak`."""

    def __init__(
        self,
        interval_s: float = 0.05,
        halflife_s: float = 0.5,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.interval_s = interval_s
        self.halflife_s = halflife_s
        self.clock = clock
        self.value = 0.0
        self.peak = 0.0

    def observe(self, late_s: float, elapsed_s: float) -> None:
        """One timer that fired ``late_s`` late, ``elapsed_s`` after it was set."""
        late_s = max(0.0, late_s)
        weight = 1.0 - 0.5 ** (elapsed_s / self.halflife_s)
        self.value += (late_s - self.value) * weight
        if late_s > self.peak:
            self.peak = late_s

    def take_peak(self) -> float:
        peak, self.peak = self.peak, 0.0
        return peak

    async def run_forever(self) -> None:
        """Measure until cancelled (the daemon runs this in its task group)."""
        clock, interval = self.clock, self.interval_s
        while True:
            start = clock()
            await anyio.sleep(interval)
            elapsed = clock() - start
            self.observe(elapsed - interval, elapsed)


@dataclass(slots=True)
class LagRule:
    """When the loop counts as late: over ``target_s``, or ``share`` of the baseline RTT when that is more
    (a 60-ms wait is 3 % of a 2-s call, and the best rate there)."""

    lag: LoopLag
    target_s: float = 0.025
    share: float = 0.1

    def over(self, baseline_rtt: float | None, factor: float = 1.0) -> bool:
        target = max(self.target_s, self.share * (baseline_rtt or 0.0))
        return self.lag.value > factor * target
