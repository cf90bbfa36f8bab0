"""consumer.pipeline.Processor without a broker: a real SQLite store (tmp_path), the provider on
``httpx.MockTransport``, records built as aiokafka ``ConsumerRecord`` objects.

The mock provider sees what the store holds when each request arrives, so these tests pin the orderings
of docs/guarantees.md from the inside: claim before call, one key on every attempt, nothing sent for a
conflict or a duplicate, in doubt never recorded FAILED. The broker-backed suites (test_exactly_once.py,
test_lease.py, test_in_doubt.py) check the same guarantees end to end.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from consumer.keys import Fingerprinter, idempotency_key
from consumer.pipeline import Disposition, Handled, Processor
from consumer.provider import ProviderClient, RetryPolicy
from consumer.store import ClaimStatus, Outcome, State
from consumer.store.sqlite import SqliteStore
from producer.envelope import Envelope, encode
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio

OWNER = "owner-a"
FP_KEY = "processor-test-fingerprint-key"
LEASE_S = 30.0


class MockProvider:
    """Answers from a script (one entry per attempt, the last one repeated) and keeps every request."""

    def __init__(self, *answers: tuple[int, dict[str, Any]]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.before_answer: Callable[[httpx.Request], Awaitable[None]] | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.before_answer is not None:
            await self.before_answer(request)
        status, body = self.answers[min(len(self.requests), len(self.answers)) - 1]
        return httpx.Response(status, content=orjson.dumps(body))

    @property
    def keys(self) -> list[str | None]:
        return [r.headers.get("idempotency-key") for r in self.requests]


APPROVED = (200, {"status": "approved", "request_id": "ref-1"})
UNAVAILABLE = (503, {"error": "unavailable"})


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(tmp_path / "dedupe.db", clock=FakeClock(1_000_000.0)) as s:
        yield s


async def _no_wait(_: float) -> None:
    await anyio.lowlevel.checkpoint()


def processor(store: SqliteStore, provider: MockProvider, *, max_attempts: int = 4) -> Processor:
    client = ProviderClient(
        "http://provider.test",
        "test-api-key",
        timeout_s=5.0,
        retry=RetryPolicy(max_attempts=max_attempts, base_delay_s=0.01, max_delay_s=0.01),
        transport=httpx.MockTransport(provider),
        sleep=_no_wait,
    )
    return Processor(
        store=store, provider=client, owner=OWNER, namespace="idv", lease_s=LEASE_S, retention_s=3600.0,
        max_message_bytes=1 << 20, fingerprint_key=FP_KEY,
    )  # fmt: skip


def envelope(full_name: str = "Jane Roe", message_id: str | None = None) -> Envelope:
    return Envelope(
        message_id=message_id or f"proc-{uuid.uuid4()}",
        operation="aml_screening",
        subject_id="subject-1",
        request={"full_name": full_name, "date_of_birth": "1990-01-01", "nationality": "FR"},
    )


def record_of(env: Envelope, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    value = encode(env)
    return ConsumerRecord(
        topic="idv.requests", partition=0, offset=offset, timestamp=0, timestamp_type=0, key=None,
        value=value, checksum=None, serialized_key_size=-1, serialized_value_size=len(value), headers=(),
    )  # fmt: skip


def key_of(env: Envelope) -> str:
    return idempotency_key("idv", env.operation, env.message_id)


async def handle(store: SqliteStore, provider: MockProvider, env: Envelope, **kw: Any) -> Handled:
    p = processor(store, provider, **kw)
    with anyio.fail_after(10):
        async with p.provider:
            return await p.handle(record_of(env))


async def test_the_key_is_claimed_before_the_provider_is_called(store: SqliteStore) -> None:
    env = envelope()
    provider = MockProvider(APPROVED)
    seen: list[Any] = []

    async def check(request: httpx.Request) -> None:
        record = await store.get(key_of(env))
        seen.append(record)
        assert record is not None and record.state is State.IN_PROGRESS and record.owner == OWNER

    provider.before_answer = check
    handled = await handle(store, provider, env)
    assert handled.disposition is Disposition.COMPLETED
    assert len(seen) == 1 and provider.keys == [key_of(env)]
    done = await store.get(key_of(env))
    assert done is not None and done.state is State.COMPLETED
    assert done.outcome == Outcome("approved", 200, "ref-1")


async def test_a_conflict_never_calls(store: SqliteStore) -> None:
    first = envelope("Jane Roe")
    other = envelope("John Doe", message_id=first.message_id)  # same ID, another payload
    assert (await handle(store, MockProvider(APPROVED), first)).disposition is Disposition.COMPLETED
    provider = MockProvider(APPROVED)
    handled = await handle(store, provider, other)
    assert handled.disposition is Disposition.CONFLICT
    assert handled.dead_letter is not None and handled.dead_letter.reason == "idempotency_conflict"
    assert provider.requests == []
    assert len(await store.conflicts(first.message_id)) == 1


async def test_a_duplicate_never_calls(store: SqliteStore) -> None:
    env = envelope()
    assert (await handle(store, MockProvider(APPROVED), env)).disposition is Disposition.COMPLETED
    provider = MockProvider(APPROVED)
    handled = await handle(store, provider, env)
    assert handled.disposition is Disposition.DUPLICATE
    assert provider.requests == []


async def test_a_terminal_4xx_is_recorded_failed(store: SqliteStore) -> None:
    env = envelope()
    provider = MockProvider((400, {"error": "validation_error"}), APPROVED)
    handled = await handle(store, provider, env)
    assert handled.disposition is Disposition.FAILED
    assert len(provider.requests) == 1  # never retried
    record = await store.get(key_of(env))
    assert record is not None and record.state is State.FAILED
    assert record.outcome is not None and record.outcome.http_status == 400
    assert record.outcome.detail == "validation_error"
    # And a redelivery is a duplicate: the failure is final.
    assert (await handle(store, MockProvider(APPROVED), env)).disposition is Disposition.DUPLICATE


async def test_retriable_then_success_keeps_one_idempotency_key(store: SqliteStore) -> None:
    env = envelope()
    provider = MockProvider(UNAVAILABLE, (429, {"error": "rate_limited"}), APPROVED)
    handled = await handle(store, provider, env)
    assert handled.disposition is Disposition.COMPLETED
    assert provider.keys == [key_of(env)] * 3
    assert len({r.content for r in provider.requests}) == 1  # the same body on every attempt
    record = await store.get(key_of(env))
    assert record is not None and record.state is State.COMPLETED and record.attempts == 1


async def test_retries_exhausted_releases_and_dead_letters(store: SqliteStore) -> None:
    env = envelope()
    provider = MockProvider(UNAVAILABLE)
    handled = await handle(store, provider, env, max_attempts=3)
    assert handled.disposition is Disposition.SET_ASIDE
    assert handled.dead_letter is not None and handled.dead_letter.reason == "retries_exhausted"
    assert handled.dead_letter.attempts == 3 and len(provider.requests) == 3
    record = await store.get(key_of(env))
    assert record is not None and record.state is State.RELEASED
    assert record.last_error == "retries_exhausted" and record.owner is None


async def test_lease_lost_waits_for_the_other_owner_and_never_calls_again(store: SqliteStore) -> None:
    """Our lease runs out during the first attempt (503) and owner-b takes the key over. The renewal
    before our second attempt finds the key lost: no second call; we wait while owner-b holds it, and
    end as a duplicate of its outcome."""
    env = envelope()
    key = key_of(env)
    clock: FakeClock = store.clock  # type: ignore[assignment]
    provider = MockProvider(UNAVAILABLE, APPROVED)
    taken: list[float] = []

    async def take_over(request: httpx.Request) -> None:
        if taken:
            return
        clock.now += LEASE_S + 1  # our lease has run out ...
        fp, legacy = Fingerprinter(FP_KEY).with_legacy(env)
        claim = await store.claim(
            key=key, message_id=env.message_id, operation=env.operation, fingerprint=fp, owner="owner-b",
            lease_s=LEASE_S, retention_s=3600.0, legacy_fingerprints=legacy,
        )  # fmt: skip
        assert claim.status is ClaimStatus.ACQUIRED  # ... and owner-b took the key over
        taken.append(anyio.current_time())

    provider.before_answer = take_over

    async def owner_b_finishes() -> None:
        while not taken:
            await anyio.sleep(0.01)
        await anyio.sleep(0.3)  # owner-b holds the key a while: we must be waiting, not calling
        assert len(provider.requests) == 1
        await store.complete(key, "owner-b", Outcome("approved", 200, "ref-b"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(owner_b_finishes)
        handled = await handle(store, provider, env)
    assert handled.disposition is Disposition.DUPLICATE
    assert len(provider.requests) == 1  # never a second call, neither while owner-b held it nor after
    record = await store.get(key)
    assert record is not None and record.state is State.COMPLETED and record.owner is None
    assert record.outcome == Outcome("approved", 200, "ref-b") and record.attempts == 2


async def test_key_reused_422_is_in_doubt_not_failed(store: SqliteStore) -> None:
    env = envelope()
    provider = MockProvider((422, {"error": "idempotency_key_reused"}), APPROVED)
    handled = await handle(store, provider, env)
    assert handled.disposition is Disposition.IN_DOUBT
    assert handled.dead_letter is not None and handled.dead_letter.reason == "in_doubt"
    assert len(provider.requests) == 1
    record = await store.get(key_of(env))
    assert record is not None and record.state is State.RELEASED and record.last_error == "in_doubt"
    assert record.outcome is None  # never recorded FAILED
