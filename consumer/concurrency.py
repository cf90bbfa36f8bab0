"""Adaptive concurrency and client-side rate limiting of provider calls: how many attempts may be in flight.

:class:`ProviderClient.call <consumer.provider.ProviderClient.call>` passes every attempt through a
:class:`ProviderGate`: an optional :class:`TokenBucket` (``IDV_PROVIDER_RATE_LIMIT``), then a FIFO
concurrency gate whose limit comes from a controller. The worker count (``IDV_MAX_IN_FLIGHT``) is the
ceiling; with ``IDV_CONCURRENCY=adaptive`` (the default) the limit finds itself between
``IDV_CONCURRENCY_MIN`` and that ceiling, so a slow provider gets thousands of calls in flight and a
rate-limited one gets just enough. Waiters are served first come first served, whatever their partition.

The adaptive controller (:class:`AdaptiveLimit`; chosen by simulation, bench/concurrency_sim.py, with
the figures and the reasons in docs/performance.md "Adaptive concurrency") is Netflix concurrency-limits'
Gradient2 with additions:

* **latency gradient**: windows of one round trip (50 ms and ``min_samples`` at least, 0.5 s at most);
  ``gradient = clamp(tolerance × long_rtt / window_rtt, 0.5, 1)``; below 1 the limit shrinks towards
  ``limit × gradient + sqrt(limit)``, never below ``queue_headroom`` × accepted/s × ``long_rtt``
  (Little's law). The baseline ``long_rtt`` falls at once and rises over ``baseline_s`` (10 s): an
  average over windows chases the very queue it should detect. App-limited windows never raise it.
* **slow start**: +``slow_start_gain`` × max(1, RTT / ``slow_start_time_s``)² slots per answer (×3 per
  round trip at 200 ms, ×9 at 500 ms, the ceiling in one round trip at 2 s), fading as answers show
  queueing (HyStart-like: full up to 25 % over the lowest window RTT, none at ``tolerance``), ended by two
  windows with no growth left or two over the tolerance. Sends are **paced** meanwhile
  (:meth:`AdaptiveLimit.pace_s`, :class:`Pacer`), or one round trip's answers, arriving together, would
  each open their slots at once: a burst a rate-limited provider refuses.
* **overload answers** (429, or 503 with ``Retry-After``; reads' too): the first in a window cuts to
  ``min(0.9 × limit, 0.9 × goodput × RTT)``, each further one (sent after the cut) removes
  ``refusal_step`` slots; the accepted level is remembered (CUBIC's ``W_max``) and approached slowly,
  forgotten after ``forget_s`` without a 429.
* **event-loop lag** (:class:`~consumer.looplag.LoopLag`, when given): the daemon's own CPU queue, which
  the round trip of a slow provider hides. Over ``lag_target_s`` (or ``lag_share`` of the baseline RTT,
  when more) the limit stops growing (slow start
  holds, no probe); two windows over twice that end slow start and shrink it by 10 % a window, down to
  the Little's-law level above: past the CPU's saturation more calls in flight make each call dearer.

The token bucket is taken by every request to the provider (:meth:`ProviderGate.take_token`): calls, and
the read-only lookups and decision reads (consumer/providers/reads.py), which hold no slot.

An open circuit breaker (consumer/breaker.py) still pauses attempts before they reach the gate.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from consumer.looplag import LagRule, LoopLag
from consumer.pacing import Pacer, TokenBucket

log = logging.getLogger(__name__)

__all__ = [
    "AdaptiveLimit",
    "ConcurrencyGate",
    "FixedLimit",
    "HasLimit",
    "LimitController",
    "ProviderGate",
    "sleep_keeping_alive",
]

KeepAlive = Callable[[], Awaitable[None]] | None
Sleep = Callable[[float], Awaitable[None]]


class FixedLimit:
    """``IDV_CONCURRENCY=fixed``: the limit is the ceiling; answers change nothing."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.floor = self.ceiling = limit

    def sample(self, rtt: float, in_flight: int, now: float) -> None:
        return None

    def overload(self, now: float, sent_at: float | None = None) -> None:
        return None

    def pace_s(self) -> float:
        return 0.0


class AdaptiveLimit:
    """The gradient controller with slow start and overload cuts described in the module docstring.

    ``sample`` is called for every answered attempt that was not an overload answer (its RTT and the
    in-flight count when it was sent), ``overload`` for every 429 (or 503 with ``Retry-After``). Not
    thread-safe; one event loop.
    """

    def __init__(
        self,
        *,
        floor: int,
        ceiling: int,
        initial: int | None = None,
        tolerance: float = 1.5,
        min_window_s: float = 0.05,
        max_window_s: float = 0.5,
        min_samples: int = 10,
        slow_start_gain: float = 2.0,
        slow_start_time_s: float = 0.25,
        pace_gain: float = 2.0,
        forget_s: float = 3.0,
        baseline_s: float | None = 10.0,
        queue_headroom: float = 2.0,
        refusal_step: float = 2.0,
        damped: bool = True,
        loop_lag: LoopLag | None = None,
        lag_target_s: float = 0.025,
        lag_share: float = 0.1,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        if not 1 <= floor <= ceiling:
            raise ValueError("need 1 <= floor <= ceiling")
        self.floor = floor
        self.ceiling = ceiling
        self.tolerance = tolerance
        self.min_window_s = min_window_s
        self.max_window_s = max_window_s
        self.min_samples = min_samples
        self.slow_start_gain = slow_start_gain
        self.slow_start_time_s = slow_start_time_s
        self.pace_gain = pace_gain
        self.forget_s = forget_s
        self.baseline_s = baseline_s
        self.queue_headroom = queue_headroom
        self.refusal_step = refusal_step
        self.damped = damped
        self.lag_rule = LagRule(loop_lag, lag_target_s, lag_share) if loop_lag is not None else None
        self._min_rtt: float | None = None
        self._stalled = 0  # consecutive windows of slow start with no growth left (damped)
        self.on_change = on_change
        start = initial if initial is not None else min(ceiling, max(floor, 64))
        self._limit = float(min(ceiling, max(floor, start)))
        self.limit = int(self._limit)
        self.slow_start = True
        self.long_rtt: float | None = None
        self.rtt: float | None = None  # the last window's mean RTT
        self.last_rtt: float | None = None  # the last sample's RTT
        self.goodput = 0.0  # accepted answers per second (last window)
        self.w_max: float | None = None  # the level accepted at the last overload
        self.overloads = 0
        self._w_start: float | None = None
        self._w_count = 0
        self._w_sum = 0.0
        self._w_inflight = 0
        self._last_cut = -math.inf
        self._last_window: float | None = None
        self._congested = 0  # consecutive windows over the latency tolerance
        self._lagging = 0  # consecutive windows with the event loop over twice lag_target_s
        self._logged = self.limit

    def _set(self, value: float, why: str) -> None:
        self._limit = min(float(self.ceiling), max(float(self.floor), value))
        limit = int(self._limit)
        if limit == self.limit:
            return
        self.limit = limit
        if limit >= 2 * self._logged or limit * 2 <= self._logged:
            log.info(
                "provider concurrency limit %d -> %d (%s)",
                self._logged,
                limit,
                why,
                extra={"concurrency_limit": limit, "rtt_s": self.rtt, "reason": why},
            )
            self._logged = limit
        if self.on_change is not None:
            self.on_change(limit)

    def sample(self, rtt: float, in_flight: int, now: float) -> None:
        if self._w_start is None:
            self._w_start = now
        self.last_rtt = rtt
        if self.slow_start and self._congested == 0 and not self._cpu_busy():
            # Slow start: +gain per answer sent with at least 1/(1 + gain) of the limit in use, so the
            # limit grows (1 + gain)x per round trip whatever the timing of the answers; a round trip
            # longer than slow_start_time_s raises the gain with it, so the ramp takes about as long in
            # seconds at 2 s as at 250 ms instead of 8x longer.
            gain = self.slow_start_gain * max(1.0, rtt / self.slow_start_time_s) ** 2
            if self.damped and self._min_rtt is not None:  # HyStart-like: stop where the queue starts
                excess = (rtt / self._min_rtt - 1.0) / (self.tolerance - 1.0)  # 1 at the tolerance
                gain *= min(1.0, max(0.0, 2.0 - 2.0 * excess))
            if gain > 0 and in_flight * (1 + gain) >= self._limit:
                self._set(self._limit + gain, "slow start")
        self._w_count += 1
        self._w_sum += rtt
        if in_flight > self._w_inflight:
            self._w_inflight = in_flight
        elapsed = now - self._w_start
        window = min(self.max_window_s, max(self.min_window_s, self.rtt or 0.0))
        if elapsed < window or (self._w_count < self.min_samples and elapsed < self.max_window_s):
            return
        count, mean, used = self._w_count, self._w_sum / self._w_count, self._w_inflight
        self._w_start, self._w_count, self._w_sum, self._w_inflight = now, 0, 0.0, 0
        self._window(mean, count / elapsed if elapsed > 0 else 0.0, used, now)

    def _cpu_busy(self, factor: float = 1.0) -> bool:
        """The event loop is later than ``factor`` × its target (:class:`~consumer.looplag.LagRule`)."""
        rule = self.lag_rule
        return rule is not None and rule.over(self.long_rtt, factor)

    def _little(self, goodput: float) -> float:
        """The in-flight level the current throughput needs at the baseline RTT, times the headroom."""
        return self.queue_headroom * goodput * (self.long_rtt or 0.0)

    def _window(self, rtt: float, goodput: float, used: int, now: float) -> None:
        self.rtt = rtt
        self.goodput = goodput
        since = now - self._last_window if self._last_window is not None else 0.0
        self._last_window = now
        if self.long_rtt is None:
            self.long_rtt = rtt
        elif self.baseline_s is None:
            # Gradient2's baseline: an average over ~10 windows (at 20 ms, half a second).
            self.long_rtt += (rtt - self.long_rtt) * 0.1
            self.long_rtt = min(self.long_rtt, 2.0 * rtt)
        elif rtt < self.long_rtt:
            self.long_rtt = rtt  # a faster window: the queue drained, or the provider got faster
        else:
            # Rises with a time constant of baseline_s, not of a number of windows: an average over
            # windows chases the queue it is meant to detect (at 20 ms, within a second), and the
            # limit then creeps up to the ceiling on a daemon that is CPU-bound.
            self.long_rtt += (rtt - self.long_rtt) * min(1.0, since / self.baseline_s)
        limit = self._limit
        if self.slow_start and self.damped and self._min_rtt is not None:
            # Two windows where the damping left no growth: the ramp has stopped where the queue
            # starts; end it, so the limit is probed (and paced no more) from here.
            stalled = rtt > self._min_rtt * (1.0 + (self.tolerance - 1.0) / 2.0)
            self._stalled = self._stalled + 1 if stalled else 0
            if self._stalled >= 2:
                self.slow_start = False
        if self._min_rtt is None or rtt < self._min_rtt:
            # The lowest window mean, not the lowest sample: one quick answer (a 4xx, a replay from the
            # provider's cache) must not make every later one look queued.
            self._min_rtt = rtt
        gradient = max(0.5, min(1.0, self.tolerance * self.long_rtt / rtt))
        if gradient < 1.0:
            self._congested += 1
            if self.slow_start and self._congested < 2:
                return  # one noisy window does not end slow start: hold, and look again
            self.slow_start = False
            target = limit * gradient + math.sqrt(limit)
            if self.queue_headroom > 0:
                # Never below what the current throughput needs at the baseline RTT, times the
                # headroom (Little's law): when the queue is the daemon's own (CPU-bound, or a loaded
                # machine), in-flight calls beyond that only add overhead, but fewer would idle the
                # CPU whenever it gets more of the machine.
                target = max(target, self._little(goodput))
            if target < limit:
                self._set(limit + (target - limit) * 0.5, "latency")
            return
        self._congested = 0
        if self._cpu_busy():
            # The event loop is late: the CPU, not the provider, is the queue. No growth (slow start
            # holds); two windows well over the target end slow start and shrink the limit, never below
            # the Little's-law level (fewer would idle the provider).
            self._lagging = self._lagging + 1 if self._cpu_busy(2.0) else 0
            if self._lagging >= 2:
                self.slow_start = False
                target = max(limit * 0.9, self._little(goodput))
                if target < limit:
                    self._set(target, "event-loop lag")
            return
        self._lagging = 0
        if used * 2 < limit or now - self._last_cut < 2 * rtt:
            return  # app-limited (the limit was not tested), or just cut: wait for its effect
        if self.slow_start:
            return  # grown per answer, in sample()
        w_max = self.w_max
        if w_max is not None and now - self._last_cut > self.forget_s:
            w_max = self.w_max = None  # no 429 for a while: the provider's limit may have gone up
        if w_max is not None and limit < 0.9 * w_max:
            step = max(math.sqrt(limit), (w_max - limit) / 2)  # well below the accepted level: close in
        elif w_max is not None and limit <= w_max:
            step = 1.0  # near it: one slot per window
        elif w_max is not None and limit <= 1.25 * w_max:
            step = 0.25  # just above it: a slot every fourth window
        else:
            step = math.sqrt(limit)
        self._set(limit + step, "probe")

    def pace_s(self) -> float:
        """Seconds between two sends the gate keeps to during slow start: ``pace_gain`` × the limit per
        round trip (per ``slow_start_time_s`` when the round trip is longer, as the ramp). Without it
        the answers of one round trip (which arrive together) each open 1 + gain slots at once, and a
        rate-limited provider sees a burst of several times its rate."""
        if not self.slow_start or self.pace_gain <= 0 or self.last_rtt is None or self.limit >= self.ceiling:
            return 0.0
        return min(self.last_rtt, self.slow_start_time_s) / (self.pace_gain * self._limit)

    def overload(self, now: float, sent_at: float | None = None) -> None:
        """A 429 (or 503 with Retry-After) for an attempt sent at ``sent_at``. Answers to attempts sent
        before the last cut were sent under the old limit: the cut already accounted for them."""
        self.overloads += 1
        self.slow_start = False
        if sent_at is not None and sent_at < self._last_cut:
            return
        limit = self._limit
        rtt = self.rtt if self.rtt is not None else self.min_window_s
        if now - self._last_cut >= max(rtt, self.min_window_s):
            self._last_cut = now
            accepted = self.goodput * rtt
            self.w_max = accepted if accepted >= self.floor else limit * 0.9
            self._set(min(limit * 0.9, 0.9 * self.w_max), "overload")
        else:
            self._set(limit - self.refusal_step, "overload")


LimitController = FixedLimit | AdaptiveLimit


@dataclass(slots=True, eq=False)
class _Waiter:
    event: anyio.Event
    granted: bool = False


class HasLimit(Protocol):
    @property
    def limit(self) -> int: ...


class ConcurrencyGate:
    """A FIFO semaphore whose size is ``controller.limit`` (read on every release and acquire)."""

    def __init__(self, controller: HasLimit) -> None:
        self.controller = controller
        self.in_flight = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if not self._waiters and self.in_flight < self.controller.limit:
            self.in_flight += 1
            return True
        return False

    async def acquire(self, keep_alive: KeepAlive = None, every: float = 20.0) -> None:
        if self.try_acquire():
            return
        waiter = _Waiter(anyio.Event())
        self._waiters.append(waiter)
        try:
            while True:
                with anyio.move_on_after(every if keep_alive is not None else math.inf):
                    await waiter.event.wait()
                if waiter.granted:
                    return
                assert keep_alive is not None
                await keep_alive()
        except BaseException:
            if waiter.granted:
                self.release()
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self.wake()

    def wake(self) -> None:
        """Hand free slots to the oldest waiters (also after the limit grew)."""
        limit = self.controller.limit
        while self._waiters and self.in_flight < limit:
            waiter = self._waiters.popleft()
            waiter.granted = True
            self.in_flight += 1
            waiter.event.set()


async def sleep_keeping_alive(sleep: Sleep, delay: float, keep_alive: KeepAlive, every: float) -> None:
    """Sleep ``delay`` seconds in steps of at most ``every``, calling ``keep_alive()`` between steps (the
    gate's waits and the provider client's back-offs)."""
    while delay > 0:
        step = delay if keep_alive is None else min(delay, every)
        await sleep(step)
        delay -= step
        if delay > 0 and keep_alive is not None:
            await keep_alive()


class ProviderGate:
    """What :class:`~consumer.provider.ProviderClient` passes each attempt through."""

    def __init__(
        self,
        controller: LimitController,
        bucket: TokenBucket | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.controller = controller
        self.gate = ConcurrencyGate(controller)
        self.bucket = bucket
        self.clock = clock
        self.pacer = Pacer()

    @property
    def limit(self) -> int:
        return self.controller.limit

    @property
    def adaptive(self) -> bool:
        """Whether the limit finds itself (``IDV_CONCURRENCY=adaptive``) rather than being fixed."""
        return isinstance(self.controller, AdaptiveLimit)

    async def enter(self, sleep: Sleep, keep_alive: KeepAlive = None, every: float = 20.0) -> int:
        """Wait for a token, a slot and (during slow start) the pacer; returns the in-flight count
        including this attempt."""
        await self.take_token(sleep, keep_alive, every)
        await self.gate.acquire(keep_alive, every)
        pace = self.controller.pace_s()
        if pace > 0:
            try:
                await sleep_keeping_alive(sleep, self.pacer.reserve(self.clock(), pace), keep_alive, every)
            except BaseException:
                self.gate.release()
                raise
        return self.gate.in_flight

    async def take_token(self, sleep: Sleep, keep_alive: KeepAlive = None, every: float = 20.0) -> None:
        """Wait for the client-side rate limit's token, if there is one. Every request to the provider
        takes one (calls and the read-only lookups and decision reads): its limit counts them all."""
        if self.bucket is None:
            return
        delay = self.bucket.reserve()
        try:
            await sleep_keeping_alive(sleep, delay, keep_alive, every)
        except BaseException:
            self.bucket.cancel()
            raise

    def refused(self, rtt: float) -> None:
        """A request that held no slot (a read) was answered 429 after ``rtt`` seconds: the provider's
        limit counts it too, so the controller cuts as for a call."""
        now = self.clock()
        self.controller.overload(now, now - rtt)

    def leave(
        self, rtt: float | None, in_flight: int, *, overload: bool = False, sample: bool = True
    ) -> None:
        """The attempt ended after ``rtt`` seconds (``None``: a transport error or cancellation).
        ``overload``: answered 429 (or 503 + Retry-After); ``sample=False``: an answer that says nothing
        about load (other 5xx, 408/409/425), not used as an RTT sample."""
        now = self.clock()
        before = self.controller.limit
        if overload:
            self.controller.overload(now, now - rtt if rtt is not None else None)
        elif rtt is not None and sample:
            self.controller.sample(rtt, in_flight, now)
        self.gate.release()
        if self.controller.limit > before:
            self.gate.wake()
