"""The sandbox's rate limit changed at runtime through ``POST /_admin/rate-limit`` (real HTTP, fake clock)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from sandbox.testing import FakeClock, SandboxHarness

pytestmark = pytest.mark.anyio

Make = Callable[..., Awaitable[SandboxHarness]]


async def statuses(sb: SandboxHarness, n: int) -> list[int]:
    return [(await sb.post("/v3/aml/", {"full_name": "Jane Roe"})).status_code for _ in range(n)]


async def test_rate_limit_can_be_turned_on_changed_and_off_at_runtime(
    make_sandbox: Make, clock: FakeClock
) -> None:
    sb = await make_sandbox(clock=clock)
    assert (await sb.client.get("/_admin/rate-limit")).json()["per_minute"] is None
    assert await statuses(sb, 5) == [200] * 5  # no limit configured

    r = await sb.client.post("/_admin/rate-limit", json={"per_second": 2, "burst": 2})
    assert r.status_code == 200 and r.json() == {"per_minute": 120.0, "per_second": 2.0, "burst": 2}
    assert await statuses(sb, 3) == [200, 200, 429]
    clock.advance(0.5)  # one token back at 2/s
    assert await statuses(sb, 2) == [200, 429]

    # Lower: the bucket keeps its tokens (none left), refills at the new rate only.
    await sb.client.post("/_admin/rate-limit", json={"per_minute": 30, "burst": 1})
    clock.advance(0.5)  # 0.25 token at 0.5/s
    assert await statuses(sb, 1) == [429]
    clock.advance(2.0)
    assert await statuses(sb, 2) == [200, 429]

    # Higher: takes effect on the next request.
    await sb.client.post("/_admin/rate-limit", json={"per_second": 100, "burst": 10})
    clock.advance(1.0)
    assert await statuses(sb, 10) == [200] * 10

    await sb.client.post("/_admin/rate-limit", json={"per_minute": None})
    assert await statuses(sb, 20) == [200] * 20
    assert (await sb.client.get("/_admin/rate-limit")).json()["per_minute"] is None


async def test_a_limit_given_at_start_is_changed_and_bad_bodies_are_rejected(
    make_sandbox: Make, clock: FakeClock
) -> None:
    sb = await make_sandbox(clock=clock, rate_limit_per_min=60, rate_limit_burst=1)
    assert await statuses(sb, 2) == [200, 429]
    limited = await sb.post("/v3/aml/", {"full_name": "Jane Roe"})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    for bad in ({"per_second": 0}, {"per_second": -1}, {"burst": 0, "per_second": 1}, {"rate": 1}, [1]):
        r = await sb.client.post("/_admin/rate-limit", json=bad)
        assert r.status_code == 400, bad
        assert r.json()["error"] == "invalid_rate_limit"
    assert (await sb.client.get("/_admin/rate-limit")).json()["per_minute"] == 60
    assert (await sb.client.put("/_admin/rate-limit", json={})).status_code == 405
