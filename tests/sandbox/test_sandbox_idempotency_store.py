from __future__ import annotations

import pytest

from sandbox.idempotency import (
    Claimed,
    IdempotencyStore,
    InFlight,
    Mismatch,
    Replay,
    StoredResponse,
    fingerprint,
    parse_key,
)
from sandbox.ratelimit import RateLimiter
from sandbox.testing import FakeClock

RESPONSE = StoredResponse(201, ((b"content-type", b"application/json"),), b'{"ok":true}')
FP = fingerprint(b"POST", "/v3/aml/", b"{}")


def test_fingerprint_covers_method_path_and_body() -> None:
    assert fingerprint(b"POST", "/v3/aml/", b"{}") == FP
    assert fingerprint(b"PUT", "/v3/aml/", b"{}") != FP
    assert fingerprint(b"POST", "/v3/session/", b"{}") != FP
    assert fingerprint(b"POST", "/v3/aml/", b"{ }") != FP


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"abc", "abc"),
        (b'"abc"', "abc"),
        (b"  abc ", "abc"),
        (b"", None),
        (b'""', None),
        (b"\xff", None),
    ],
)
def test_parse_key(raw: bytes, expected: str | None) -> None:
    assert parse_key(raw) == expected


def test_claim_in_flight_complete_replay_mismatch() -> None:
    store = IdempotencyStore(ttl_s=60, clock=FakeClock(1000.0))
    claim = store.begin("ak", "k", FP)
    assert isinstance(claim, Claimed)
    assert store.in_flight == 1
    assert isinstance(store.begin("ak", "k", FP), InFlight)
    assert isinstance(store.begin("ak", "k", b"other"), Mismatch)
    store.complete(claim, RESPONSE)
    assert store.in_flight == 0
    replay = store.begin("ak", "k", FP)
    assert isinstance(replay, Replay)
    assert replay.response is RESPONSE
    assert isinstance(store.begin("ak", "k", b"other"), Mismatch)


def test_keys_are_scoped() -> None:
    store = IdempotencyStore(ttl_s=60, clock=FakeClock(1000.0))
    assert isinstance(store.begin("ak1", "k", FP), Claimed)
    assert isinstance(store.begin("ak2", "k", FP), Claimed)
    assert len(store) == 2


def test_release_frees_the_key() -> None:
    store = IdempotencyStore(ttl_s=60, clock=FakeClock(1000.0))
    claim = store.begin("ak", "k", FP)
    assert isinstance(claim, Claimed)
    store.release(claim)
    assert store.in_flight == 0
    assert isinstance(store.begin("ak", "k", b"other"), Claimed)


def test_release_after_complete_keeps_the_response() -> None:
    store = IdempotencyStore(ttl_s=60, clock=FakeClock(1000.0))
    claim = store.begin("ak", "k", FP)
    assert isinstance(claim, Claimed)
    store.complete(claim, RESPONSE)
    store.release(claim)
    assert isinstance(store.begin("ak", "k", FP), Replay)


def test_expiry() -> None:
    clock = FakeClock(1000.0)
    store = IdempotencyStore(ttl_s=60, clock=clock)
    claim = store.begin("ak", "k", FP)
    assert isinstance(claim, Claimed)
    store.complete(claim, RESPONSE)
    clock.now += 59.9
    assert isinstance(store.begin("ak", "k", FP), Replay)
    clock.now += 0.1
    assert isinstance(store.begin("ak", "k", b"other"), Claimed)


def test_expired_entries_are_purged() -> None:
    clock = FakeClock(1000.0)
    store = IdempotencyStore(ttl_s=10, clock=clock)
    for i in range(100):
        claim = store.begin("ak", f"k{i}", FP)
        assert isinstance(claim, Claimed)
        store.complete(claim, RESPONSE)
    clock.now += 11
    assert isinstance(store.begin("ak", "new", FP), Claimed)
    assert len(store) == 1


def test_in_flight_entries_do_not_expire() -> None:
    clock = FakeClock(1000.0)
    store = IdempotencyStore(ttl_s=10, clock=clock)
    claim = store.begin("ak", "k", FP)
    clock.now += 100
    assert isinstance(store.begin("ak", "k", FP), InFlight)
    assert isinstance(claim, Claimed)
    store.complete(claim, RESPONSE)
    assert isinstance(store.begin("ak", "k", FP), Claimed)


def test_clear_detaches_in_flight_claims() -> None:
    store = IdempotencyStore(ttl_s=10, clock=FakeClock(1000.0))
    claim = store.begin("ak", "k", FP)
    assert isinstance(claim, Claimed)
    store.clear()
    assert store.in_flight == 0
    store.complete(claim, RESPONSE)
    assert store.in_flight == 0
    assert isinstance(store.begin("ak", "k", FP), Claimed)


def test_rate_limiter_refills_over_time() -> None:
    clock = FakeClock(1000.0)
    limiter = RateLimiter(per_minute=60, clock=clock, burst=2)
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(1.0)
    assert limiter.acquire("b") == 0.0  # buckets are per scope
    clock.now += 0.5
    assert limiter.acquire("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.acquire("a") == 0.0
    clock.now -= 100  # a wall clock stepping back must not drain the bucket
    assert limiter.acquire("a") == pytest.approx(1.0)
    limiter.clear()
    assert limiter.acquire("a") == 0.0
