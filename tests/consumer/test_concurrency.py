"""Adaptive provider concurrency and the client-side token bucket (consumer/concurrency.py).

Fast unit tests of the controller, the FIFO gate and the bucket on a fake clock, then two behavioural
tests on the real sandbox over HTTP: the limit backs off on 429 and opens up on a slow provider
(assertions on the limit's direction, not on timings).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import pytest

from consumer.admission import Admission
from consumer.breaker import BreakerState, CircuitBreaker
from consumer.concurrency import AdaptiveLimit, ConcurrencyGate, FixedLimit, ProviderGate
from consumer.errors import RetriesExhausted
from consumer.fdlimit import raise_fd_limit
from consumer.looplag import LoopLag
from consumer.pacing import Pacer, TokenBucket
from consumer.provider import ProviderClient, RetryPolicy, gate_from_settings
from consumer.settings import Settings
from producer.envelope import OPERATIONS
from tests.consumer.conftest import API_KEY, Sandbox, wait_until

AML = OPERATIONS["aml_screening"]


def feed(c: AdaptiveLimit, t: float, rtt: float, windows: int, in_flight: int | None = None) -> float:
    """``windows`` full windows of samples at ``rtt`` starting at ``t``; returns the time after them."""
    for _ in range(windows):
        for i in range(20):
            c.sample(rtt, c.limit if in_flight is None else in_flight, t + rtt * (i + 1) / 20)
        t += rtt
    return t


# -- the controller ------------------------------------------------------------------------------------


def round_trip(c: AdaptiveLimit, t: float, rtt: float) -> float:
    """One round trip with every slot used: ``limit`` answers, each sent at the round's limit."""
    n = c.limit
    for i in range(n):
        c.sample(rtt, n, t + rtt * (i + 1) / n)
    return t + rtt


def test_slow_start_grows_four_times_per_round_trip_up_to_the_ceiling() -> None:
    # Gain 3 at a round trip of slow_start_time_s: x4 per round trip.
    c = AdaptiveLimit(floor=4, ceiling=1000, initial=16, slow_start_gain=3.0, slow_start_time_s=0.5)
    seen = [c.limit]
    t = 0.0
    for _ in range(5):
        t = round_trip(c, t, 0.5)
        seen.append(c.limit)
    assert seen == [16, 64, 256, 1000, 1000, 1000]
    assert c.slow_start


def test_queueing_latency_shrinks_the_limit_and_ends_slow_start() -> None:
    c = AdaptiveLimit(floor=4, ceiling=4096, initial=256)
    t = feed(c, 0.0, 0.02, 3)
    before = c.limit
    t = feed(c, t, 0.08, 1)  # 4x the baseline: well past the 1.5x tolerance
    assert c.limit >= before and c.slow_start  # one window only holds slow start
    held = c.limit
    t = feed(c, t, 0.08, 1)
    assert c.limit < held and not c.slow_start
    for _ in range(20):
        t = feed(c, t, 0.08, 1)
    assert c.limit >= c.floor


def test_an_app_limited_window_does_not_raise_the_limit() -> None:
    c = AdaptiveLimit(floor=4, ceiling=4096, initial=100)
    feed(c, 0.0, 0.1, 10, in_flight=10)  # only 10 of 100 slots used
    assert c.limit == 100


def test_overload_cuts_at_once_then_one_slot_per_further_429_never_below_the_floor() -> None:
    c = AdaptiveLimit(floor=8, ceiling=4096, initial=400, refusal_step=1.0)
    t = feed(c, 0.0, 0.2, 1)  # goodput 100/s at 0.2 s: 20 accepted
    before = c.limit
    c.overload(t)
    cut = c.limit
    assert cut <= 0.9 * before and not c.slow_start
    assert c.w_max is not None and cut <= 0.9 * c.w_max + 1
    c.overload(t + 0.001, sent_at=t - 0.2)  # sent before the cut: already accounted for
    assert c.limit == cut
    c.overload(t + 0.001, sent_at=t + 0.0005)
    c.overload(t + 0.002)
    assert c.limit == cut - 2
    for i in range(1000):
        c.overload(t + 0.003 + i * 1e-6)
    assert c.limit == 8


def test_slow_start_at_a_long_round_trip_reaches_the_ceiling_in_one_round_trip() -> None:
    # Gain 2 x (RTT / 0.25 s)^2: x3 per round trip at 200 ms (a rate-limited provider sees a gentle
    # ramp), x9 at 500 ms, from 64 to the 4,096 ceiling in one round trip at 2 s.
    seen = {}
    for rtt in (0.2, 0.5, 2.0):
        c = AdaptiveLimit(floor=8, ceiling=4096, initial=64)
        round_trip(c, 0.0, rtt)
        seen[rtt] = c.limit
    assert seen == {0.2: 64 * 3, 0.5: 64 * 9, 2.0: 4096}


def test_slow_start_growth_fades_as_the_answers_show_queueing() -> None:
    # Full gain up to half way to the latency tolerance (1.5x the lowest window's RTT), none at it.
    def grown(rtt: float, damped: bool = True) -> int:
        c = AdaptiveLimit(floor=8, ceiling=4096, initial=64, damped=damped)
        t = feed(c, 0.0, 0.2, 2)  # the lowest window mean: 200 ms
        before = c.limit
        c.sample(rtt, c.limit, t + 0.01)
        return c.limit - before

    assert grown(0.2) == grown(0.25) == 2  # +2 per answer up to 25 % over the lowest RTT
    assert grown(0.3) == 0  # 50 % over it: the latency tolerance
    assert grown(0.3, damped=False) == 2
    # One quick answer (a 4xx, a replay from the provider's cache) is not the baseline: it is a window's
    # mean that sets it, so the answers after it still grow the limit.
    c = AdaptiveLimit(floor=8, ceiling=4096, initial=64)
    c.sample(0.002, 64, 0.1)
    t = feed(c, 0.1, 0.2, 2)
    assert c._min_rtt is not None and c._min_rtt > 0.1
    before = c.limit
    c.sample(0.22, c.limit, t + 0.01)
    assert c.limit > before


def test_a_stalled_ramp_ends_slow_start() -> None:
    c = AdaptiveLimit(floor=8, ceiling=4096, initial=64)
    t = feed(c, 0.0, 0.2, 2)
    t = feed(c, t, 0.27, 2)  # 35 % over the lowest RTT: no growth left, under the tolerance
    assert c.slow_start
    t = feed(c, t, 0.27, 1)
    assert not c.slow_start


def cpu_bound_round(c: AdaptiveLimit, t: float, rtt: float, rate: float) -> float:
    """One round trip of a CPU-bound daemon: every slot taken, but only ``rate`` answers per second."""
    n = max(1, int(rate * rtt))
    for i in range(n):
        c.sample(rtt, c.limit, t + rtt * (i + 1) / n)
    return t + rtt


def test_event_loop_lag_stops_growth_and_over_twice_its_target_shrinks_to_the_littles_law_level() -> None:
    # A slow provider (500 ms) and a CPU-bound daemon (1,000 answers/s whatever the limit): the round trip
    # stays flat, so the gradient sees nothing; the event loop is late.
    lag = LoopLag()
    ramp = AdaptiveLimit(floor=8, ceiling=4096, initial=64, loop_lag=lag)
    lag.value = 0.06  # over the target (25 ms, then 10 % of the 500-ms RTT) from the start: slow start holds
    round_trip(ramp, 0.0, 0.5)
    assert ramp.limit == 64 and ramp.slow_start
    lag.value = 0.0
    round_trip(ramp, 0.5, 0.5)
    assert ramp.limit == 64 * 9  # on time: slow start as before

    c = AdaptiveLimit(floor=8, ceiling=4096, initial=3000, loop_lag=lag)
    lag.value = 0.06  # over the target (10 % of the 500-ms RTT): no growth
    t = 0.0
    for _ in range(6):
        t = cpu_bound_round(c, t, 0.5, 1000)
    assert c.limit == 3000 and c.slow_start
    lag.value = 0.12  # over twice the target: slow start ends, -10 % a window, down to 2 x 1,000/s x 0.5 s
    t = cpu_bound_round(c, t, 0.5, 1000)
    assert c.limit == 3000  # one window is not enough
    for _ in range(40):
        t = cpu_bound_round(c, t, 0.5, 1000)
    assert 990 <= c.limit <= 1100 and not c.slow_start
    lag.value = 0.0  # the loop keeps up again: probing resumes
    low = c.limit
    for _ in range(5):
        t = cpu_bound_round(c, t, 0.5, 1000)
    assert c.limit > low

    free = AdaptiveLimit(floor=8, ceiling=4096, initial=3000)  # the same answers, no lag signal
    t = feed(free, 0.0, 0.5, 1)
    for _ in range(10):
        t = cpu_bound_round(free, t, 0.5, 1000)
    assert free.limit > 3000


def test_loop_lag_smooths_lateness_and_keeps_the_peak() -> None:
    lag = LoopLag(interval_s=0.05, halflife_s=0.5)
    lag.observe(0.2, 0.5)  # one half-life: half way to 200 ms
    assert lag.value == pytest.approx(0.1)
    lag.observe(-0.001, 0.05)  # early (clock jitter) counts as on time
    assert 0.09 < lag.value < 0.1
    assert lag.take_peak() == pytest.approx(0.2) and lag.take_peak() == 0.0


@pytest.mark.anyio
async def test_loop_lag_sees_a_blocked_event_loop() -> None:
    lag = LoopLag(interval_s=0.01, halflife_s=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lag.run_forever)
        await anyio.sleep(0.05)
        time.sleep(0.3)  # noqa: ASYNC251 - the point: the loop is blocked
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert lag.take_peak() >= 0.25


def test_slow_start_paces_sends_and_stops_pacing_at_the_ceiling() -> None:
    c = AdaptiveLimit(floor=8, ceiling=4096, initial=64, damped=False)
    assert c.pace_s() == 0.0  # no round trip measured yet: nothing to pace by
    c.sample(0.2, 64, 0.2)
    # pace_gain (2) x the limit per round trip: the limit's worth of sends spread over half of it.
    assert c.pace_s() == pytest.approx(0.2 / (2 * c.limit))
    c.sample(4.0, c.limit, 4.2)  # a long round trip paces over slow_start_time_s instead
    assert c.pace_s() == pytest.approx(0.25 / (2 * c.limit))
    round_trip(c, 4.2, 2.0)
    assert c.limit == 4096 and c.pace_s() == 0.0
    c2 = AdaptiveLimit(floor=8, ceiling=4096, initial=64)
    c2.sample(0.2, 64, 0.2)
    c2.overload(0.3)
    assert not c2.slow_start and c2.pace_s() == 0.0  # pacing is for the ramp only


def test_pacer_is_fifo_and_retimes_its_queue_when_the_interval_shrinks() -> None:
    p = Pacer()
    assert p.reserve(0.0, 0.1) == 0.0
    assert [p.reserve(0.0, 0.1) for _ in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    # The limit grew tenfold: the 0.4 s already booked shrinks to 0.04 s, the next send follows it.
    assert p.reserve(0.0, 0.01) == pytest.approx(0.04)
    assert p.reserve(1.0, 0.01) == 0.0  # idle: no backlog


def test_further_429s_remove_refusal_step_slots_each() -> None:
    c = AdaptiveLimit(floor=8, ceiling=4096, initial=400)
    t = feed(c, 0.0, 0.2, 1)
    c.overload(t)
    cut = c.limit
    c.overload(t + 0.001, sent_at=t + 0.0005)
    assert c.limit == cut - 2  # default refusal_step: two slots per refusal after the cut


def test_the_baseline_rtt_does_not_chase_a_standing_queue() -> None:
    # A daemon whose own queue doubles the RTT (CPU-bound): with Gradient2's baseline (an average over
    # ~10 windows) the queue becomes the baseline within a second and the limit creeps up; with a
    # baseline that rises over baseline_s (10 s) the same queue keeps reading as queueing.
    chasing = AdaptiveLimit(floor=4, ceiling=4096, initial=200, baseline_s=None, queue_headroom=0.0)
    steady = AdaptiveLimit(floor=4, ceiling=4096, initial=200, queue_headroom=0.0)
    for c in (chasing, steady):
        t = feed(c, 0.0, 0.05, 2)
        t = feed(c, t, 0.1, 20)  # one second at twice the RTT
        assert c.long_rtt is not None
    assert chasing.long_rtt is not None and steady.long_rtt is not None
    assert chasing.long_rtt > 0.09 and steady.long_rtt < 0.06
    assert steady.limit < chasing.limit


def cpu_bound(c: AdaptiveLimit, seconds: float, rate: float = 2000.0, provider_rtt: float = 0.02) -> None:
    """A daemon that answers ``rate`` calls/s whatever the limit: every slot beyond rate x provider RTT
    is queueing in the daemon, so the RTT it measures is limit / rate."""
    t = 0.0
    while t < seconds:
        t += 1.0 / rate
        c.sample(max(provider_rtt, c.limit / rate), c.limit, t)


def test_a_latency_cut_keeps_what_the_throughput_needs_at_the_baseline_rtt() -> None:
    # Little's law: a cut for latency never goes below queue_headroom (2) x goodput x baseline RTT,
    # here 2 x 2,000/s x 20 ms = 80, which keeps the CPU busy; without the floor it goes lower.
    # (Undamped slow start, so that the ramp overshoots into a standing queue and latency cuts follow.)
    c = AdaptiveLimit(floor=4, ceiling=4096, initial=64, queue_headroom=2.0, damped=False)
    bare = AdaptiveLimit(floor=4, ceiling=4096, initial=64, queue_headroom=0.0, damped=False)
    for x in (c, bare):
        cpu_bound(x, 5.0)
        assert not x.slow_start  # the queue ended the ramp
    assert c.limit >= 0.9 * 80, c.limit
    assert bare.limit < c.limit
    # The baseline still rises (a provider may really have got slower), but over baseline_s: after 20 s
    # of the same standing queue the limit is well under half of where Gradient2's baseline takes it.
    chasing = AdaptiveLimit(floor=4, ceiling=4096, initial=64, queue_headroom=0.0, baseline_s=None)
    steady = AdaptiveLimit(floor=4, ceiling=4096, initial=64)
    for x in (chasing, steady):
        cpu_bound(x, 20.0)
    assert steady.limit * 2 < chasing.limit, (steady.limit, chasing.limit)


def test_probing_is_one_slot_per_window_near_the_level_of_the_last_429() -> None:
    c = AdaptiveLimit(floor=4, ceiling=4096, initial=100)
    t = feed(c, 0.0, 0.2, 1)
    c.overload(t)
    t += 1.0
    level = c.limit
    t = feed(c, t, 0.2, 3)
    assert level < c.limit <= level + 3  # +1 per window while near W_max
    c2 = AdaptiveLimit(floor=4, ceiling=4096, initial=100)
    t2 = feed(c2, 0.0, 0.2, 1)
    c2.overload(t2)
    c2.w_max = 10_000.0  # far below the remembered level: sqrt(limit) steps
    t2 = feed(c2, t2 + 1.0, 0.2, 1)
    assert c2.limit >= level + 5


def test_fixed_limit_never_moves() -> None:
    c = FixedLimit(128)
    c.overload(0.0)
    c.sample(5.0, 128, 1.0)
    assert c.limit == 128


# -- the FIFO gate and the token bucket ----------------------------------------------------------------


@pytest.mark.anyio
async def test_gate_is_fifo_honours_the_limit_and_releases_on_cancel() -> None:
    gate = ConcurrencyGate(FixedLimit(2))
    order: list[int] = []
    assert gate.try_acquire() and gate.try_acquire() and not gate.try_acquire()

    async def waiter(i: int) -> None:
        await gate.acquire()
        order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(waiter, i)
            await anyio.lowlevel.checkpoint()
        await anyio.sleep(0.01)
        assert gate.waiting == 4 and order == []
        gate.release()
        gate.release()
        await anyio.sleep(0.01)
        assert order == [0, 1] and gate.in_flight == 2
        gate.release()
        gate.release()
    assert order == [0, 1, 2, 3]
    # A cancelled waiter leaves the queue; one cancelled after being granted gives its slot back.
    with anyio.move_on_after(0.01):
        await gate.acquire()
    assert gate.waiting == 0 and gate.in_flight == 2


@pytest.mark.anyio
async def test_keep_alive_runs_while_waiting_at_the_gate() -> None:
    gate = ConcurrencyGate(FixedLimit(1))
    assert gate.try_acquire()
    pings = 0

    async def ping() -> None:
        nonlocal pings
        pings += 1
        if pings == 3:
            gate.release()

    with anyio.fail_after(2):
        await gate.acquire(ping, every=0.01)
    assert pings == 3 and gate.in_flight == 1


def test_token_bucket_burst_then_fifo_reservations_at_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(10.0, 3, clock=lambda: now[0])
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    waits = [bucket.reserve() for _ in range(3)]
    assert waits == pytest.approx([0.1, 0.2, 0.3])  # first come, first served, 1/rate apart
    bucket.cancel()  # the last waiter gave up: its token comes back
    assert bucket.reserve() == pytest.approx(0.3)
    now[0] = 10.0  # a long idle time refills only up to the burst
    assert [bucket.reserve() for _ in range(4)] == pytest.approx([0.0, 0.0, 0.0, 0.1])


@pytest.mark.anyio
async def test_provider_gate_waits_for_a_token_then_a_slot() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    gate = ProviderGate(FixedLimit(4), TokenBucket(2.0, 1, clock=lambda: now[0]), clock=lambda: now[0])
    assert await gate.enter(sleep) == 1
    assert await gate.enter(sleep) == 2
    assert slept == pytest.approx([0.5])
    gate.leave(0.1, 2)
    assert gate.gate.in_flight == 1


def test_settings_follow_the_ceiling_and_build_the_gate() -> None:
    base = {"IDV_PROVIDER_API_KEY": "k", "IDV_FINGERPRINT_KEY": "x" * 16}
    s = Settings.from_env(base)
    assert (s.max_in_flight, s.max_buffered, s.provider_max_connections) == (4096, 8192, 4096)
    assert s.concurrency == "adaptive"
    gate = gate_from_settings(s)
    assert isinstance(gate.controller, AdaptiveLimit) and gate.bucket is None
    assert gate.controller.ceiling == 4096 and gate.controller.floor == 8
    s = Settings.from_env(
        {**base, "IDV_MAX_IN_FLIGHT": "64", "IDV_CONCURRENCY": "fixed", "IDV_PROVIDER_RATE_LIMIT": "5"}
    )
    assert (s.max_buffered, s.provider_max_connections) == (1024, 64)
    gate = gate_from_settings(s)
    assert isinstance(gate.controller, FixedLimit) and gate.limit == 64
    assert gate.bucket is not None and gate.bucket.rate == 5 and gate.bucket.burst == 1


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    import resource

    soft, hard = raise_fd_limit(16)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft
    assert hard == resource.RLIM_INFINITY or soft == hard


# -- behaviour on the real sandbox over HTTP -----------------------------------------------------------


@pytest.fixture
def sb(sandbox: object) -> Iterator[Sandbox]:
    yield Sandbox(sandbox.url)  # type: ignore[attr-defined]


def set_rate_limit(sb: Sandbox, **limit: float) -> None:
    import httpx

    httpx.post(sb.url + "/_admin/rate-limit", json=limit, timeout=10).raise_for_status()


async def _hammer(client: ProviderClient, workers: int, seconds: float) -> int:
    answered = 0

    async def worker() -> None:
        nonlocal answered
        with anyio.move_on_after(seconds):
            while True:
                try:
                    await client.call(AML, {"full_name": "Jane Roe"}, f"idv_c-{uuid.uuid4().hex}")
                    answered += 1
                except RetriesExhausted:
                    pass

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)
    return answered


@pytest.mark.anyio
async def test_the_limit_opens_up_on_a_slow_provider(sb: Sandbox) -> None:
    sb.faults(latency_ms=200)
    controller = AdaptiveLimit(floor=2, ceiling=512, initial=16)
    client = ProviderClient(
        sb.url, API_KEY, gate=ProviderGate(controller), transport_kind="aiohttp", max_connections=512
    )
    async with client:
        answered = await _hammer(client, 300, 2.5)
    assert answered > 0
    assert controller.limit > 16 * 4, controller.limit  # well above its start


@pytest.mark.anyio
async def test_the_limit_backs_off_on_429(sb: Sandbox) -> None:
    set_rate_limit(sb, per_second=40, burst=10)
    sb.faults(latency_ms=20)
    controller = AdaptiveLimit(floor=2, ceiling=512, initial=64)
    client = ProviderClient(
        sb.url,
        API_KEY,
        gate=ProviderGate(controller),
        transport_kind="aiohttp",
        retry=RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.02),
        retry_after_max_s=0.05,
        rng=random.Random(0),
    )
    async with client:
        await _hammer(client, 100, 2.0)
    assert controller.overloads > 0
    assert controller.limit < 64, controller.limit  # below where it started


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
async def test_429s_open_the_breaker_only_without_an_adaptive_limit(sb: Sandbox, mode: str) -> None:
    """A provider refusing most calls with 429: with the adaptive limit that is the controller's signal (it
    cut the limit already), and the breaker stays closed; with a fixed limit the breaker is the only
    brake and opens, as before."""
    set_rate_limit(sb, per_second=20, burst=5)
    sb.faults(latency_ms=5)
    states: list[BreakerState] = []
    statuses: list[int | None] = []
    breaker = CircuitBreaker(window=20, failure_ratio=0.5, min_calls=10, open_s=0.5, on_change=states.append)
    controller = AdaptiveLimit(floor=2, ceiling=256, initial=64) if mode == "adaptive" else FixedLimit(64)
    client = ProviderClient(
        sb.url,
        API_KEY,
        gate=ProviderGate(controller),
        breaker=breaker,
        transport_kind="aiohttp",
        retry=RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.02),
        retry_after_max_s=0.05,
        rng=random.Random(0),
        on_attempt=lambda status, _s: statuses.append(status),
    )
    async with client:
        await _hammer(client, 64, 1.5)
    assert statuses.count(429) > 20, statuses.count(429)  # the provider did refuse, in both modes
    if mode == "adaptive":
        assert BreakerState.OPEN not in states, states
    else:
        assert BreakerState.OPEN in states, states


@pytest.mark.anyio
async def test_decision_reads_take_tokens_from_the_calls_rate_limit(didit: Sandbox) -> None:
    # IDV_PROVIDER_RATE_LIMIT is the provider's limit, which counts every request: a read of a decision
    # (workflows, reconciliation lookups) waits for a token of the same bucket as the calls.
    from consumer.errors import ProviderNotFound
    from consumer.providers.didit import DiditAdapter

    now = [0.0]
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(4.0, 1, clock=lambda: now[0])
    controller = AdaptiveLimit(floor=2, ceiling=64, initial=16)
    gate = ProviderGate(controller, bucket)
    client = ProviderClient(didit.url, API_KEY, adapter=DiditAdapter(), gate=gate, sleep=sleep)
    async with client:
        for _ in range(3):
            with pytest.raises(ProviderNotFound):
                await client.get_decision("00000000-0000-0000-0000-000000000000")
        assert slept == pytest.approx([0.25, 0.25])  # burst 1, then one token every 1/4 s
        # A read answered 429 cuts the limit as a call's 429 would (the read held no slot).
        controller.sample(0.1, 16, now[0])
        gate.refused(0.001)
        assert controller.overloads == 1 and controller.limit < 16
        assert gate.gate.in_flight == 0


@pytest.mark.anyio
async def test_admission_lets_twice_the_limit_plus_extra_workers_hold_a_message() -> None:
    limit = [10]
    admission = Admission(lambda: limit[0], factor=2.0, extra=4)
    inside = 0
    peak = 0
    release = anyio.Event()

    async def worker() -> None:
        nonlocal inside, peak
        await admission.acquire()
        inside += 1
        peak = max(peak, inside)
        try:
            await release.wait()
        finally:
            inside -= 1
            admission.release()

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(worker)
        await wait_until(lambda: admission.gate.waiting == 76, "76 waiting", timeout=10, interval=0.01)
        assert inside == 24 and admission.gate.in_flight == 24  # 2 x 10 + 4
        limit[0] = 30  # the limit grew: the next releases admit up to 2 x 30 + 4
        release.set()
    assert peak <= 64 and inside == 0 and admission.gate.in_flight == 0


@pytest.mark.anyio
async def test_admission_does_not_count_workers_sleeping_between_retries() -> None:
    admission = Admission(lambda: 1, factor=1.0, extra=0)
    await admission.acquire()  # the one permit, now held by a worker that goes into a back-off
    got = anyio.Event()

    async def next_worker() -> None:
        await admission.acquire()
        got.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(next_worker)
        await wait_until(lambda: admission.gate.waiting == 1, "a worker waiting", timeout=10, interval=0.01)
        with admission.backing_off():  # the holder sleeps out a Retry-After: its permit does not count
            with anyio.fail_after(5):
                await got.wait()
            assert admission.gate.in_flight == 2 and admission.limit == 2
    assert admission.limit == 1
