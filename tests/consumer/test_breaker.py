from __future__ import annotations

import anyio
import pytest

from consumer.breaker import BreakerState, CircuitBreaker
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio


async def test_opens_on_failure_ratio_and_closes_after_successful_probe() -> None:
    clock = FakeClock()
    states: list[BreakerState] = []
    b = CircuitBreaker(
        window=10, failure_ratio=0.5, min_calls=4, open_s=5, clock=clock, on_change=states.append
    )
    for ok in (True, False, False, True):
        assert await b.acquire() is False
        b.record(ok)
    assert b.state is BreakerState.OPEN
    clock.now = 5.0
    assert await b.acquire() is True  # the half-open probe
    b.record(True, probe=True)
    assert b.state is BreakerState.CLOSED
    assert states == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


async def test_failed_probe_reopens_and_others_wait_for_the_verdict() -> None:
    clock = FakeClock()
    b = CircuitBreaker(window=4, failure_ratio=0.5, min_calls=2, open_s=1, clock=clock)
    b.record(False)
    b.record(False)
    assert b.state is BreakerState.OPEN
    clock.now = 1.0
    assert await b.acquire() is True
    waited = []

    async def other() -> None:
        waited.append(await b.acquire())

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await anyio.sleep(0.05)
        assert waited == []  # blocked while the probe runs
        b.record(False, probe=True)
        assert b.state is BreakerState.OPEN
        clock.now = 2.0
        b.abort_probe()  # wake the waiter; the breaker has expired its open period
    assert waited == [True]


async def test_mostly_successful_traffic_never_opens() -> None:
    b = CircuitBreaker(window=20, failure_ratio=0.5, min_calls=10)
    for i in range(100):
        await b.acquire()
        b.record(i % 3 != 0)  # a third fails
    assert b.state is BreakerState.CLOSED
