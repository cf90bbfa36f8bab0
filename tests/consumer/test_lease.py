"""One live owner per key: two processors sharing one store, a short lease and a provider that trickles
its answer, against the real broker and the sandbox provider over HTTP.

The sandbox ledger stamps every attempt's start (``at``) and end (``ended_at``: last byte written, or the
client gone). The invariant checked: the attempts of one key never overlap in time.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from consumer.errors import LeaseLost
from consumer.keys import idempotency_key
from consumer.pipeline import Disposition, Handled, Processor
from consumer.provider import ProviderClient, RetryPolicy
from consumer.settings import LEASE_SLACK_S, Settings
from consumer.store import State, open_store
from consumer.store.base import DedupeStore
from producer.envelope import Envelope
from tests.consumer.conftest import (
    API_KEY,
    Sandbox,
    daemon_env,
    publish,
    read_all,
    start_daemon,
    wait_committed_to_end,
)

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

LEASE_S = 2.0
TIMEOUT_S = 1.0


def assert_no_overlap(attempts: list[dict[str, Any]]) -> None:
    spans = sorted((a["at"], a["ended_at"]) for a in attempts)
    assert all(end is not None for _, end in spans), spans
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"two attempts of one key overlapped: {spans}"


async def one_record(kafka_bootstrap: str, topic: str) -> tuple[Envelope, Any]:
    env = Envelope(
        message_id=f"lease-{uuid.uuid4()}",
        operation="aml_screening",
        subject_id="subject-lease",
        request={"full_name": "Lease Person"},
    )
    await publish(kafka_bootstrap, topic, [env])
    (msg,) = [m for m in await read_all(kafka_bootstrap, topic) if env.message_id.encode() in m.value]
    return env, msg


def processor(store: DedupeStore, sb: Sandbox, owner: str) -> Processor:
    provider = ProviderClient(
        sb.url,
        API_KEY,
        timeout_s=TIMEOUT_S,
        retry=RetryPolicy(max_attempts=5, base_delay_s=0.2, max_delay_s=0.2),
        transport_kind="aiohttp",
    )
    return Processor(
        store=store,
        provider=provider,
        owner=owner,
        namespace="idv",
        lease_s=LEASE_S,
        retention_s=3600,
        max_message_bytes=1 << 20,
    )


async def test_a_trickling_provider_never_sees_two_owners_at_once(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str
) -> None:
    """2 s lease, 1 s attempt deadline, the first two answers trickled over 3 s each. Before: the first
    owner's attempt outlived its lease, the second owner took the key and called too, and the two took it
    from each other in a loop. Now each attempt ends at its deadline, the lease is renewed meanwhile, and
    the second owner only ever waits."""
    sb.faults(script=["trickle:3000", "trickle:3000"])
    env, msg = await one_record(kafka_bootstrap, topic)
    key = idempotency_key("idv", env.operation, env.message_id)
    async with open_store(sqlite_url) as store:
        a, b = processor(store, sb, "owner-a"), processor(store, sb, "owner-b")
        results: dict[str, Handled] = {}

        async def run(name: str, p: Processor, delay: float) -> None:
            await anyio.sleep(delay)
            async with p.provider:
                results[name] = await p.handle(msg)

        t0 = time.monotonic()
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "a", a, 0.0)
                tg.start_soon(run, "b", b, 0.3)
        elapsed = time.monotonic() - t0
        record = await store.get(key)
    assert results["a"].disposition is Disposition.COMPLETED
    assert results["b"].disposition is Disposition.DUPLICATE
    assert record is not None and record.state is State.COMPLETED
    assert record.attempts == 1  # never taken over
    entry = sb.ledger()["keys"][key]
    assert entry["side_effects"] == 1
    attempts = entry["attempts"]
    assert_no_overlap(attempts)
    assert len(attempts) == 3  # two cut at the deadline, the third answered from the stored response
    assert all(a["ended_at"] - a["at"] < TIMEOUT_S + 0.3 for a in attempts), attempts
    assert elapsed < 10


async def test_the_lease_is_kept_alive_while_the_call_waits_in_an_open_circuit_breaker(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str
) -> None:
    """A's breaker is open for 3 s (longer than the 2 s lease) before its first attempt. The background
    renewer holds the lease through the wait: B never gets the key, A makes the only call."""
    from consumer.breaker import BreakerState, CircuitBreaker

    env, msg = await one_record(kafka_bootstrap, topic)
    key = idempotency_key("idv", env.operation, env.message_id)
    async with open_store(sqlite_url) as store:
        a, b = processor(store, sb, "owner-a"), processor(store, sb, "owner-b")
        breaker = CircuitBreaker(window=1, min_calls=1, failure_ratio=1.0, open_s=3.0)
        breaker.record(False)
        assert breaker.state is BreakerState.OPEN
        a.provider.breaker = breaker
        results: dict[str, Handled] = {}

        async def run(name: str, p: Processor, delay: float) -> None:
            await anyio.sleep(delay)
            async with p.provider:
                results[name] = await p.handle(msg)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "a", a, 0.0)
                tg.start_soon(run, "b", b, 0.2)
        record = await store.get(key)
    assert results["a"].disposition is Disposition.COMPLETED
    assert results["b"].disposition is Disposition.DUPLICATE
    assert record is not None and record.attempts == 1
    assert len(sb.ledger()["keys"][key]["attempts"]) == 1


class RenewStalls:
    """The shared store, except that one owner's renewals hang until ``go`` is set (a stalled store
    connection, a paused process): its lease runs out although it is alive."""

    def __init__(self, store: DedupeStore, owner: str) -> None:
        self._store = store
        self._owner = owner
        self.go = anyio.Event()
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def renew(self, key: str, owner: str, lease_s: float) -> None:
        if owner == self._owner:
            await self.go.wait()
        try:
            await self._store.renew(key, owner, lease_s)
        except LeaseLost:
            self.lost += 1
            raise


async def test_lease_lost_waits_for_the_other_owner_instead_of_taking_the_key_back(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str
) -> None:
    """A's renewals stall, its lease runs out and B takes over; B's answer is trickled over 1.5 s. When A's
    renewal finally runs it is refused (LeaseLost): A must wait for B's outcome — not call, not claim."""
    sb.faults(script=["trickle:3000", "trickle:800"])
    env, msg = await one_record(kafka_bootstrap, topic)
    key = idempotency_key("idv", env.operation, env.message_id)
    async with open_store(sqlite_url) as store:
        stalled = RenewStalls(store, "owner-a")
        a = processor(stalled, sb, "owner-a")  # type: ignore[arg-type]
        b = processor(store, sb, "owner-b")
        results: dict[str, Handled] = {}
        finished: dict[str, float] = {}

        async def run(name: str, p: Processor, delay: float) -> None:
            await anyio.sleep(delay)
            async with p.provider:
                results[name] = await p.handle(msg)
            finished[name] = time.monotonic()

        async def unstall() -> None:
            await anyio.sleep(LEASE_S + 0.4)  # B has taken over and is being answered
            stalled.go.set()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "a", a, 0.0)
                tg.start_soon(run, "b", b, 0.2)
                tg.start_soon(unstall)
        record = await store.get(key)
    assert stalled.lost >= 1  # A learnt it had lost the lease
    assert results["b"].disposition is Disposition.COMPLETED
    assert results["a"].disposition is Disposition.DUPLICATE  # waited for B, then found it done
    assert finished["a"] >= finished["b"]
    assert record is not None and record.state is State.COMPLETED
    assert record.attempts == 2  # B's one take-over after A's lease expired; A never took it back
    entry = sb.ledger()["keys"][key]
    assert entry["side_effects"] == 1
    assert len(entry["attempts"]) == 2  # A's first attempt (cut at the deadline) and B's; A sent no more
    assert_no_overlap(entry["attempts"])


def test_the_lease_must_cover_the_attempt_deadline_plus_slack() -> None:
    base = {
        "IDV_PROVIDER_API_KEY": "k",
        "IDV_PROVIDER_TIMEOUT_S": "5",
        "IDV_FINGERPRINT_KEY": "lease-test-fingerprint-key",
    }
    Settings.from_env({**base, "IDV_LEASE_S": str(5 + LEASE_SLACK_S)})
    from consumer.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="IDV_LEASE_S"):
        Settings.from_env({**base, "IDV_LEASE_S": "5.5"})


async def test_a_call_cancelled_after_its_request_left_keeps_the_key_until_the_lease_expires(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str
) -> None:
    """Cancelled (rebalance drain bound, shutdown) while the provider holds the request: releasing would
    let the next owner call while the provider may still be working. The key stays IN_PROGRESS until its
    lease expires. Cancelled before anything was sent (waiting in an open breaker): released at once."""
    from consumer.breaker import CircuitBreaker

    sb.faults(latency_ms=900)
    env, msg = await one_record(kafka_bootstrap, topic)
    key = idempotency_key("idv", env.operation, env.message_id)
    async with open_store(sqlite_url) as store:
        a = processor(store, sb, "owner-a")
        async with a.provider:
            with anyio.move_on_after(0.4):
                await a.handle(msg)
        record = await store.get(key)
        assert record is not None and record.state is State.IN_PROGRESS and record.owner == "owner-a"
        assert record.lease_until is not None and record.lease_until > time.time()

        # Not sent yet: the breaker holds the first attempt; the cancelled claim is handed back.
        env2, msg2 = await one_record(kafka_bootstrap, topic)
        key2 = idempotency_key("idv", env2.operation, env2.message_id)
        b = processor(store, sb, "owner-b")
        breaker = CircuitBreaker(window=1, min_calls=1, failure_ratio=1.0, open_s=5.0)
        breaker.record(False)
        b.provider.breaker = breaker
        async with b.provider:
            with anyio.move_on_after(0.4):
                await b.handle(msg2)
        record2 = await store.get(key2)
    assert record2 is not None and record2.state is State.RELEASED and record2.last_error == "abandoned"
    assert key2 not in sb.ledger()["keys"]


@pytest.mark.timeout(180)
async def test_two_daemons_sharing_one_store_never_call_one_key_at_once(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    """Two daemon processes (different groups, e.g. a second deployment or a replay beside the live one)
    read the same messages and share one store; 2 s lease, 1 s deadline, answers trickled over 3 s."""
    sb.faults(script=["trickle:3000"] * 6)
    envs = [
        Envelope(
            message_id=f"two-{i}-{uuid.uuid4()}",
            operation="aml_screening",
            subject_id=f"subject-two-{i}",
            request={"full_name": "Two Daemons"},
        )
        for i in range(3)
    ]
    await publish(kafka_bootstrap, topic, envs)
    common: dict[str, Any] = dict(
        bootstrap=kafka_bootstrap, topic=topic, store_url=sqlite_url, provider_url=sb.url, lease_s=LEASE_S,
        provider_timeout_s=TIMEOUT_S, provider_backoff_base_s=0.2, provider_backoff_max_s=0.2,
        provider_max_attempts=8, breaker_min_calls=1000,
    )  # fmt: skip
    groups = ["ga-" + uuid.uuid4().hex[:6], "gb-" + uuid.uuid4().hex[:6]]
    procs = [
        start_daemon(daemon_env(**common, group=g, instance_id=g), tmp_path / f"{g}.log") for g in groups
    ]
    try:
        for g in groups:
            await wait_committed_to_end(kafka_bootstrap, g, topic, 90)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert proc.wait(30) == 0, proc.log()[-2000:]
    finally:
        for proc in procs:
            proc.kill()
    ledger = sb.ledger()["keys"]
    async with open_store(sqlite_url) as store:
        for env in envs:
            key = idempotency_key("idv", env.operation, env.message_id)
            assert ledger[key]["side_effects"] == 1
            assert_no_overlap(ledger[key]["attempts"])
            record = await store.get(key)
            assert record is not None and record.state is State.COMPLETED
            assert record.attempts == 1, record  # never taken over from a live owner
