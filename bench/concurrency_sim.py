"""Simulation that chose the concurrency controller (docs/performance.md#adaptive-concurrency).

A discrete-event model of the daemon in front of a provider, with no machine noise, comparing
controllers on the same scenarios:

* ``slow``: provider latency 500 ms or 2 s, no rate limit; the daemon spends ``cpu_ms`` of CPU per
  answer (one core: at most 1000 / cpu_ms answers/s), so the RTT it measures includes its own queueing;
* ``rate``: provider latency 200 ms, a token bucket of 500 req/s (burst 100) that drops to 250 req/s at
  10 s and returns to 500 at 20 s; a 429 comes back in 1 ms and that message retries after 1 s.

Controllers: ``adaptive`` (consumer.concurrency.AdaptiveLimit, the one shipped), ``gradient2`` (Netflix
Gradient2 as published: the same windows and gradient, ``+sqrt(limit)`` growth, no slow start, 429s
ignored — Gradient2 does not use drops), ``aimd`` (Netflix AIMDLimit: +1 per sample while at least half
used, ×0.9 on every drop), and ``fixed N``.

    python bench/concurrency_sim.py
"""

from __future__ import annotations

import heapq
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from consumer.concurrency import AdaptiveLimit, FixedLimit


class Gradient2(AdaptiveLimit):
    """Gradient2 without this project's additions."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.slow_start = False

    def _window(self, rtt: float, goodput: float, used: int, now: float) -> None:
        self.rtt = rtt
        self.long_rtt = rtt if self.long_rtt is None else self.long_rtt + (rtt - self.long_rtt) * 0.1
        gradient = max(0.5, min(1.0, self.tolerance * self.long_rtt / rtt))
        if used * 2 < self._limit:
            return
        target = self._limit * gradient + math.sqrt(self._limit)
        self._set(self._limit * 0.8 + target * 0.2, "gradient2")

    def overload(self, now: float, sent_at: float | None = None) -> None:
        return None


class Aimd:
    def __init__(self, *, floor: int, ceiling: int, initial: int = 64) -> None:
        self.floor, self.ceiling = floor, ceiling
        self._limit = float(initial)
        self.limit = initial

    def sample(self, rtt: float, in_flight: int, now: float) -> None:
        if in_flight * 2 >= self._limit:
            self._limit = min(self.ceiling, self._limit + 1)
            self.limit = int(self._limit)

    def overload(self, now: float, sent_at: float | None = None) -> None:
        self._limit = max(self.floor, self._limit * 0.9)
        self.limit = int(self._limit)


def simulate(
    controller: Any,
    *,
    latency_s: float,
    seconds: float,
    cpu_ms: float = 0.5,
    rate_phases: list[tuple[float, float]] | None = None,
    burst: float = 100.0,
    workers: int = 4096,
) -> dict[str, Any]:
    """Returns accepted/s and 429/s per second, and the limit per second."""
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, data: Any = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    in_flight = 0
    waiting: list[int] = []  # workers waiting for a slot (FIFO by list order)
    cpu_free = 0.0
    tokens, updated = burst, 0.0
    accepted = [0] * int(seconds + 1)
    refused = [0] * int(seconds + 1)
    limits = [0] * int(seconds + 1)
    for w in range(workers):
        push(0.0, "ready", w)

    def rate_at(t: float) -> float | None:
        if rate_phases is None:
            return None
        current = None
        for start, r in rate_phases:
            if t >= start:
                current = r
        return current

    def start(w: int, t: float) -> None:
        nonlocal in_flight, tokens, updated
        in_flight += 1
        rate = rate_at(t)
        ok = True
        if rate is not None:
            tokens = min(burst, tokens + (t - updated) * rate)
            updated = t
            if tokens >= 1:
                tokens -= 1
            else:
                ok = False
        push(t + (latency_s if ok else 0.001), "answer", (w, t, ok, in_flight))

    while events:
        t, _, kind, data = heapq.heappop(events)
        if t >= seconds:
            break
        sec = int(t)
        limits[sec] = max(limits[sec], controller.limit)
        if kind == "ready":
            if in_flight < controller.limit and not waiting:
                start(data, t)
            else:
                waiting.append(data)
            continue
        w, sent, ok, used = data
        # The daemon's CPU handles answers one at a time: the RTT it sees includes that queue.
        cpu_free = max(cpu_free, t) + cpu_ms / 1000.0
        done = cpu_free
        in_flight -= 1
        if ok:
            accepted[sec] += 1
            controller.sample(done - sent, used, done)
            push(done, "ready", w)
        else:
            refused[sec] += 1
            controller.overload(done, sent)
            push(done + 1.0, "ready", w)  # Retry-After: 1
        while waiting and in_flight < controller.limit:
            start(waiting.pop(0), done)
    return {"accepted": accepted[:-1], "refused": refused[:-1], "limits": limits[:-1]}


def summary(name: str, res: dict[str, Any], rate_phases: list[tuple[float, float]] | None) -> str:
    acc, ref = res["accepted"], res["refused"]
    total = sum(acc) + sum(ref)
    share = sum(ref) / total if total else 0.0
    line = f"  {name:<14} {sum(acc) / len(acc):8,.0f} accepted/s  {share:6.2%} 429"
    if rate_phases is not None:
        settle = []
        for i, (begin, r) in enumerate(rate_phases):
            end = rate_phases[i + 1][0] if i + 1 < len(rate_phases) else len(acc)
            s = next(
                (
                    t - begin
                    for t in range(int(begin), int(end) - 1)
                    if acc[t] + acc[t + 1] >= 1.8 * r and ref[t] + ref[t + 1] <= 0.01 * (acc[t] + acc[t + 1])
                ),
                math.nan,
            )
            settle.append(s)
            steady = acc[int(begin) + 3 : int(end)]
            line += f" | {r:g}/s: {sum(steady) / max(1, len(steady)) / r:4.0%} of limit, settle {s:g} s"
    else:
        reach = next((t for t, a in enumerate(acc) if a >= 0.9 * max(acc)), math.nan)
        line += f" | 90 % of its peak after {reach} s; limit at end {res['limits'][-1]}"
    return line


def main() -> None:
    def controllers() -> list[tuple[str, Any]]:
        return [
            ("adaptive", AdaptiveLimit(floor=8, ceiling=4096)),
            ("gradient2", Gradient2(floor=8, ceiling=4096, initial=64)),
            ("aimd", Aimd(floor=8, ceiling=4096)),
            ("fixed 128", FixedLimit(128)),
            ("fixed 4096", FixedLimit(4096)),
        ]

    for latency in (0.5, 2.0):
        print(f"provider latency {latency * 1000:g} ms, daemon 0.5 ms CPU per answer (<= 2,000/s), 30 s:")
        for name, c in controllers():
            print(summary(name, simulate(c, latency_s=latency, seconds=30), None))
    phases = [(0.0, 500.0), (10.0, 250.0), (20.0, 500.0)]
    print("rate-limited: 200 ms, token bucket 500 -> 250 -> 500 req/s (burst 100), 30 s:")
    for name, c in controllers():
        print(summary(name, simulate(c, latency_s=0.2, seconds=30, rate_phases=phases), phases))


if __name__ == "__main__":
    main()
