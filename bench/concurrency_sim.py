"""Simulation that chose the concurrency controller (docs/performance.md#adaptive-concurrency).

A discrete-event model of the daemon in front of a provider, with no machine noise unless asked for,
comparing controllers on the cells of ``bench/throughput.py --concurrency``:

* **latency cells** (20 ms, 500 ms, 2 s; no rate limit): ``--messages`` messages (12,000, as the real
  bench) through a ceiling of 4,096 workers; the rate is messages ÷ time to finish, as the bench counts
  it, so a slow ramp costs what it costs there. The daemon spends ``cpu_ms`` of CPU per answer on one
  core (at most 1000 / cpu_ms answers/s) and the RTT it measures includes that queue. Two machines:
  ``quiet`` (0.5 ms per answer) and ``loaded`` (the daemon's share of the core drawn anew every 0.5 s
  between 0.25 and 1, and each answer costing more the more calls are in flight: ``1 + in_flight /
  2048``, as the loaded real run showed), the same seed for every controller;
* **rate-limited cell**: provider latency 200 ms, a token bucket of 500 req/s (burst 100) that drops
  to 250 req/s at 10 s and returns to 500 at 20 s; a 429 comes back in 1 ms and that message retries
  after 1 s. Reported: the share of calls answered 429, accepted/s as a share of each phase's limit (its
  first 3 s left out), and seconds after each change until two seconds accept ≥ 90 % of the limit with
  ≤ 1 % answered 429.

Controllers: ``adaptive`` (consumer.concurrency.AdaptiveLimit, the one shipped, with its pacing),
``adaptive-1`` (the previous round's: slow start ×4 per round trip, no pacing, no 429 budget),
``gradient2`` (Netflix Gradient2 as published: the same windows and gradient, ``+sqrt(limit)`` growth,
no slow start, 429s ignored — Gradient2 does not use drops), ``aimd`` (Netflix AIMDLimit: +1 per sample
while at least half used, ×0.9 on every drop), and ``fixed N`` (the sweep of the real bench).

    python bench/concurrency_sim.py            # every table (about a minute)
    python bench/concurrency_sim.py --trace    # the adaptive controller per second in each cell
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from consumer.concurrency import AdaptiveLimit, FixedLimit
from consumer.pacing import Pacer

SWEEP = (128, 512, 1024, 2048, 4096)
PHASES = [(0.0, 500.0), (10.0, 250.0), (20.0, 500.0)]


class Gradient2(AdaptiveLimit):
    """Gradient2 without this project's additions."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.slow_start = False

    def pace_s(self) -> float:
        return 0.0

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


def previous_round(floor: int, ceiling: int) -> AdaptiveLimit:
    """The controller as the last round shipped it: ×4 per round trip whatever the RTT, sends unpaced,
    no limit on 429s per round trip."""
    return AdaptiveLimit(
        floor=floor,
        ceiling=ceiling,
        slow_start_gain=3.0,
        slow_start_time_s=math.inf,
        pace_gain=0.0,
        baseline_s=None,
        queue_headroom=0.0,
        refusal_step=1.0,
        damped=False,
    )


class Aimd:
    def __init__(self, *, floor: int, ceiling: int, initial: int = 64) -> None:
        self.floor, self.ceiling = floor, ceiling
        self._limit = float(initial)
        self.limit = initial

    def pace_s(self) -> float:
        return 0.0

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
    seconds: float = 60.0,
    messages: int | None = None,
    cpu_ms: float = 0.5,
    loaded: bool = False,
    rate_phases: list[tuple[float, float]] | None = None,
    burst: float = 100.0,
    workers: int = 4096,
    seed: int = 1,
) -> dict[str, Any]:
    """One run: per second accepted and refused answers, the limit and calls in flight; ``done_s``: when
    the last of ``messages`` was answered (None: open-ended for ``seconds``)."""
    rng = random.Random(seed)
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, data: Any = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    n = int(seconds) + 1
    accepted, refused, limits, peak = [0] * n, [0] * n, [0] * n, [0] * n
    in_flight = 0
    waiting: deque[int] = deque()  # workers waiting for a slot, FIFO
    cpu_free = 0.0
    pacer = Pacer()  # the gate's pacing during slow start
    tokens, updated = burst, 0.0
    left = messages if messages is not None else math.inf
    done_s: float | None = None
    shares = [rng.uniform(0.25, 1.0) for _ in range(2 * n + 2)] if loaded else None
    for w in range(workers):
        push(0.0, "ready", w)

    def rate_at(t: float) -> float | None:
        current = None
        for begin, r in rate_phases or ():
            if t >= begin:
                current = r
        return current

    def admit(w: int, t: float) -> None:
        nonlocal in_flight
        in_flight += 1
        pace = controller.pace_s()
        push(t + (pacer.reserve(t, pace) if pace > 0 else 0.0), "send", (w, in_flight))

    while events:
        t, _, kind, data = heapq.heappop(events)
        if t >= seconds:
            break
        sec = int(t)
        limits[sec] = max(limits[sec], controller.limit)
        peak[sec] = max(peak[sec], in_flight)
        if kind == "ready":
            if left <= 0:
                continue
            left -= 1
            if in_flight < controller.limit and not waiting:
                admit(data, t)
            else:
                waiting.append(data)
            continue
        if kind == "send":
            w, used = data
            rate = rate_at(t)
            ok = True
            if rate is not None:
                tokens = min(burst, tokens + (t - updated) * rate)
                updated = t
                ok = tokens >= 1
                tokens -= 1 if ok else 0
            push(t + (latency_s if ok else 0.001), "answer", (w, t, ok, used))
            continue
        if kind == "answer":
            # The daemon's CPU handles answers one at a time; the attempt holds its slot, and its RTT
            # runs, until its turn (as the real gate's slot is released when the coroutine resumes).
            begin = max(cpu_free, t)
            cost = cpu_ms / 1000.0
            if shares is not None:
                cost *= (1 + in_flight / 2048) / shares[min(len(shares) - 1, int(begin * 2))]
            cpu_free = begin + cost
            push(cpu_free, "handled", data)
            continue
        w, sent, ok, used = data
        in_flight -= 1
        if ok:
            accepted[sec] += 1
            controller.sample(t - sent, used, t)
            if messages is not None and left <= 0 and in_flight == 0 and not waiting:
                done_s = t
            push(t, "ready", w)
        else:
            refused[sec] += 1
            left += 1  # the message is retried
            controller.overload(t, sent)
            push(t + 1.0, "ready", w)  # Retry-After: 1
        while waiting and in_flight < controller.limit:
            admit(waiting.popleft(), t)
    last = int(done_s) + 1 if done_s is not None else n - 1
    return {
        "accepted": accepted[:last],
        "refused": refused[:last],
        "limits": limits[:last],
        "in_flight": peak[:last],
        "done_s": done_s,
    }


def controllers(fixed: tuple[int, ...] = SWEEP) -> list[tuple[str, Any]]:
    return [
        ("adaptive", AdaptiveLimit(floor=8, ceiling=4096)),
        ("adaptive-1", previous_round(8, 4096)),
        ("gradient2", Gradient2(floor=8, ceiling=4096, initial=64)),
        ("aimd", Aimd(floor=8, ceiling=4096)),
        *((f"fixed {f}", FixedLimit(f)) for f in fixed),
    ]


def latency_table(messages: int) -> list[str]:
    out = [
        f"latency cells: {messages:,} messages, ceiling 4,096, rate = messages / time to finish",
        f"{'machine':<7} {'lat ms':>6} {'controller':<12} {'msg/s':>7} {'vs best fixed':>13} "
        f"{'limit end':>9}",
    ]
    for loaded in (False, True):
        for latency in (0.02, 0.5, 2.0):
            rows = []
            for name, c in controllers():
                res = simulate(c, latency_s=latency, messages=messages, loaded=loaded, seconds=400)
                rate = messages / res["done_s"] if res["done_s"] else math.nan
                rows.append((name, rate, res["limits"][-1] if res["limits"] else 0))
            best = max(r for n, r, _ in rows if n.startswith("fixed"))
            for name, rate, end in rows:
                mark = " *" if rate == best else ""
                out.append(
                    f"{'loaded' if loaded else 'quiet':<7} {latency * 1000:6g} {name + mark:<12} "
                    f"{rate:7,.0f} {rate / best:13.0%} {end:9,}"
                )
    return out


def rate_table() -> list[str]:
    out = [
        "rate-limited cell: 200 ms, token bucket 500 -> 250 (10 s) -> 500 (20 s) req/s, burst 100, 30 s",
        f"{'controller':<12} {'429 %':>6} {'first 1 s':>9}  per phase: share of limit (settle s)",
    ]
    for name, c in controllers((128, 4096)):
        res = simulate(c, latency_s=0.2, seconds=30, rate_phases=PHASES)
        acc, ref = res["accepted"], res["refused"]
        share = sum(ref) / max(1, sum(acc) + sum(ref))
        cells = []
        for i, (begin, r) in enumerate(PHASES):
            end = PHASES[i + 1][0] if i + 1 < len(PHASES) else len(acc)
            settle = next(
                (
                    t - begin
                    for t in range(int(begin), int(end) - 1)
                    if acc[t] + acc[t + 1] >= 1.8 * r and ref[t] + ref[t + 1] <= 0.01 * (acc[t] + acc[t + 1])
                ),
                math.nan,
            )
            steady = acc[int(begin) + 3 : int(end)]
            cells.append(f"{r:g}/s {sum(steady) / max(1, len(steady)) / r:4.0%} ({settle:g})")
        out.append(f"{name:<12} {share:6.2%} {ref[0]:9}  " + " | ".join(cells))
    return out


def trace() -> None:
    cells: list[tuple[str, dict[str, Any]]] = [
        ("20 ms", {"latency_s": 0.02, "messages": 12_000}),
        ("500 ms", {"latency_s": 0.5, "messages": 12_000}),
        ("2 s", {"latency_s": 2.0, "messages": 12_000}),
        ("2 s loaded", {"latency_s": 2.0, "messages": 12_000, "loaded": True}),
        ("rate-limited", {"latency_s": 0.2, "seconds": 30, "rate_phases": PHASES}),
    ]
    for name, kw in cells:
        res = simulate(AdaptiveLimit(floor=8, ceiling=4096), **kw)
        print(f"{name}: per second accepted / refused / limit / peak in flight")
        for s, row in enumerate(
            zip(res["accepted"], res["refused"], res["limits"], res["in_flight"], strict=True)
        ):
            print(f"  {s:3d} s " + " ".join(f"{x:6,}" for x in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--messages", type=int, default=12_000)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    if args.trace:
        trace()
        return
    print("\n".join(latency_table(args.messages)))
    print()
    print("\n".join(rate_table()))


if __name__ == "__main__":
    main()
