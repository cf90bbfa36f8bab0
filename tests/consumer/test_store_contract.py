"""The dedupe store contract: every backend must pass the same suite.

Backends: SQLite and PostgreSQL, always both parametrized, so the PostgreSQL half cannot vanish from the
collected tests: without ``IDV_TEST_POSTGRES_URL`` (or with the server down) it fails under ``CI`` and is
skipped, with the command that starts it, elsewhere. Each transition is
a compare-and-set; these tests pin the rules PITFALLS lists (take-over only after lease expiry, only the
owner completes or releases, nothing deleted on error, completed records never overwritten).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from consumer.errors import LeaseLost, StoreError
from consumer.keys import HMAC_V1, Fingerprinter, fingerprint
from consumer.store import Claim, ClaimStatus, DedupeStore, Outcome, Record, State, open_store
from consumer.store.base import COLUMNS, Decision, decide_claim, dump_outcome, record_from_row
from producer.envelope import Envelope
from tests.conftest import FakeClock
from tests.consumer.conftest import backend_url, claim_key

pytestmark = pytest.mark.anyio


BACKENDS = ["sqlite", "postgres"]
if os.environ.get("CI") and not os.environ.get("IDV_TEST_POSTGRES_URL"):
    # A collection error, not 13 quiet skips: CI must run the contract against PostgreSQL.
    pytest.fail(
        "CI is set but IDV_TEST_POSTGRES_URL is not: the PostgreSQL contract tests need it", pytrace=False
    )


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DedupeStore]:
    async with backend_url(request.param, tmp_path, "contract") as url:
        s = open_store(url)
        s.clock = FakeClock(1_000_000.0)
        async with s:
            yield s


def _key() -> str:
    return "idv_" + uuid.uuid4().hex


_claim = claim_key


async def test_first_claim_acquires(store: DedupeStore) -> None:
    key = _key()
    claim = await _claim(store, key)
    assert claim.status is ClaimStatus.ACQUIRED
    assert claim.record.state is State.IN_PROGRESS
    assert claim.record.owner == "a"
    assert claim.record.attempts == 1


async def test_live_lease_is_not_taken_over(store: DedupeStore) -> None:
    key = _key()
    await _claim(store, key, owner="a")
    claim = await _claim(store, key, owner="b")
    assert claim.status is ClaimStatus.BUSY
    assert claim.record.owner == "a"
    # The same owner is not re-entrant either: two concurrent handlers in one process must not both call.
    assert (await _claim(store, key, owner="a")).status is ClaimStatus.BUSY


async def test_expired_lease_is_taken_over_and_counts_attempts(store: DedupeStore) -> None:
    key = _key()
    await _claim(store, key, owner="a", lease=10)
    store.clock.now += 11  # type: ignore[attr-defined]
    claim = await _claim(store, key, owner="b")
    assert claim.status is ClaimStatus.ACQUIRED
    assert claim.record.owner == "b"
    assert claim.record.attempts == 2
    # The old owner can no longer complete or release.
    with pytest.raises(LeaseLost):
        await store.complete(key, "a", Outcome("approved", 200, "ref"))
    with pytest.raises(LeaseLost):
        await store.release(key, "a", "x")


async def test_only_owner_completes(store: DedupeStore) -> None:
    key = _key()
    await _claim(store, key, owner="a")
    with pytest.raises(LeaseLost):
        await store.complete(key, "intruder", Outcome("approved"))
    returned = await store.complete(key, "a", Outcome("approved", 200, "ref-1"))
    record = await store.get(key)
    assert record is not None
    assert returned == record  # complete returns the stored record (used for result events)
    assert record.state is State.COMPLETED
    assert record.outcome == Outcome("approved", 200, "ref-1")
    assert record.owner is None


async def test_only_owner_releases(store: DedupeStore) -> None:
    """A live lease cannot be released by someone who never acquired it (powertools-typescript #5675)."""
    key = _key()
    await _claim(store, key, owner="a")
    with pytest.raises(LeaseLost):
        await store.release(key, "intruder", "abandoned")
    record = await store.get(key)
    assert record is not None
    assert record.state is State.IN_PROGRESS and record.owner == "a" and record.last_error is None
    assert (await _claim(store, key, owner="b")).status is ClaimStatus.BUSY


async def test_completed_is_done_and_never_overwritten(store: DedupeStore) -> None:
    key = _key()
    await _claim(store, key, owner="a")
    await store.complete(key, "a", Outcome("declined", 200, "ref-1"))
    store.clock.now += 10_000  # type: ignore[attr-defined]  # way past any lease
    claim = await _claim(store, key, owner="b")
    assert claim.status is ClaimStatus.DONE
    assert claim.record.outcome is not None and claim.record.outcome.status == "declined"
    with pytest.raises(LeaseLost):
        await store.complete(key, "a", Outcome("approved"))
    with pytest.raises(LeaseLost):
        await store.complete(key, "b", Outcome("approved"))
    record = await store.get(key)
    assert record is not None and record.outcome == Outcome("declined", 200, "ref-1")


async def test_failed_is_terminal(store: DedupeStore) -> None:
    key = _key()
    await _claim(store, key)
    await store.complete(key, "a", Outcome("failed", 422, None, "validation_error"), failed=True)
    claim = await _claim(store, key, owner="b")
    assert claim.status is ClaimStatus.DONE
    assert claim.record.state is State.FAILED


async def test_fingerprint_mismatch_is_conflict_on_every_path(store: DedupeStore) -> None:
    key = _key()
    await _claim(store, key, fp="fp1")
    assert (await _claim(store, key, owner="b", fp="fp2")).status is ClaimStatus.CONFLICT
    await store.complete(key, "a", Outcome("approved"))
    # The shortcut path that returns a stored outcome checks the fingerprint too (powertools #3781).
    assert (await _claim(store, key, owner="b", fp="fp2")).status is ClaimStatus.CONFLICT
    await store.record_conflict(
        key=key, message_id="m", fingerprint="fp2", stored_fingerprint="fp1", source="t/0@5"
    )
    conflicts = await store.conflicts("m")
    assert len(conflicts) == 1 and conflicts[0]["source"] == "t/0@5"


async def test_release_keeps_record_and_allows_reclaim(store: DedupeStore) -> None:
    key = _key()
    await _claim(store, key, owner="a")
    await store.release(key, "a", "retries_exhausted")
    record = await store.get(key)
    assert record is not None
    assert record.state is State.RELEASED and record.last_error == "retries_exhausted"
    claim = await _claim(store, key, owner="b")
    assert claim.status is ClaimStatus.ACQUIRED and claim.record.attempts == 2


async def test_renew_extends_only_own_lease(store: DedupeStore) -> None:
    key = _key()
    await _claim(store, key, owner="a", lease=10)
    store.clock.now += 8  # type: ignore[attr-defined]
    await store.renew(key, "a", 10)
    store.clock.now += 8  # type: ignore[attr-defined]  # 16 s after claim, 8 s after renewal: still live
    assert (await _claim(store, key, owner="b")).status is ClaimStatus.BUSY
    with pytest.raises(LeaseLost):
        await store.renew(key, "b", 10)


async def test_concurrent_claims_have_one_winner(store: DedupeStore) -> None:
    key = _key()
    results: list[ClaimStatus] = []

    async def claim(owner: str) -> None:
        results.append((await _claim(store, key, owner=owner)).status)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(claim, f"o{i}")
    assert results.count(ClaimStatus.ACQUIRED) == 1
    assert results.count(ClaimStatus.BUSY) == 19


async def test_purge_respects_retention_and_in_progress(store: DedupeStore) -> None:
    done, live = _key(), _key()
    await _claim(store, done)
    await store.complete(done, "a", Outcome("approved"))
    await _claim(store, live, lease=1e9)
    store.clock.now += 3601  # type: ignore[attr-defined]
    assert await store.purge_expired() >= 1
    assert await store.get(done) is None
    assert await store.get(live) is not None


async def test_counts(store: DedupeStore) -> None:
    before = await store.counts()
    key = _key()
    await _claim(store, key)
    after = await store.counts()
    assert after["in_progress"] == before["in_progress"] + 1


async def test_returned_records_are_the_stored_rows(store: DedupeStore) -> None:
    """claim/complete answer with the row as stored (the SQLite store builds them without reading back)."""
    key = _key()
    claim = await _claim(store, key)
    assert claim.record == await store.get(key)
    store.clock.now += 5  # type: ignore[attr-defined]
    await store.renew(key, "a", 30.0)
    done = await store.complete(key, "a", Outcome("approved", 200, "ref-1"))
    assert done == await store.get(key)
    assert done.state is State.COMPLETED and done.lease_until is None and done.owner is None
    # A take-over (expired lease) and its completion too.
    key2 = _key()
    await _claim(store, key2, owner="a", lease=1.0)
    store.clock.now += 2  # type: ignore[attr-defined]
    taken = await _claim(store, key2, owner="b")
    assert taken.status is ClaimStatus.ACQUIRED and taken.record == await store.get(key2)
    failed = await store.complete(key2, "b", Outcome("failed", 422, None, "bad_request"), failed=True)
    assert failed == await store.get(key2)


# -- keyed fingerprints: records written with the legacy scheme keep matching ---------------------------

KEY = "contract-fingerprint-key-0123"


def _envelope(full_name: str, message_id: str = "m-legacy") -> Envelope:
    return Envelope(
        message_id=message_id,
        operation="aml_screening",
        subject_id="applicant-1",
        request={"full_name": full_name, "date_of_birth": "1990-01-01", "nationality": "FR"},
    )


async def _claim_envelope(store: DedupeStore, key: str, envelope: Envelope, owner: str = "b") -> Claim:
    fp, legacy = Fingerprinter(KEY).with_legacy(envelope)
    return await store.claim(
        key=key,
        message_id=envelope.message_id,
        operation=envelope.operation,
        fingerprint=fp,
        owner=owner,
        lease_s=30.0,
        retention_s=3600.0,
        legacy_fingerprints=legacy,
    )


@pytest.mark.parametrize("stored_state", ["completed", "released"])
async def test_legacy_plain_sha256_record_is_the_same_request(store: DedupeStore, stored_state: str) -> None:
    same, other = _envelope("Jane Roe"), _envelope("John Doe")
    key = _key()
    # A record written by an earlier build: bare hex, plain SHA-256.
    legacy_fp = fingerprint(same)
    assert len(legacy_fp) == 64 and ":" not in legacy_fp
    await _claim(store, key, owner="a", fp=legacy_fp)
    if stored_state == "completed":
        await store.complete(key, "a", Outcome("approved", 200, "ref-1"))
    else:
        await store.release(key, "a", "retries_exhausted")
    # The same payload from a keyed build: compared in the record's (legacy) scheme → the same request.
    claim = await _claim_envelope(store, key, same)
    expected = ClaimStatus.DONE if stored_state == "completed" else ClaimStatus.ACQUIRED
    assert claim.status is expected
    assert claim.record.fingerprint == legacy_fp
    # A different payload under the same ID is still a conflict.
    conflict = await _claim_envelope(store, key, other, owner="c")
    assert conflict.status is ClaimStatus.CONFLICT


async def test_keyed_fingerprints_are_stored_with_their_scheme(store: DedupeStore) -> None:
    same, other = _envelope("Jane Roe", "m-keyed"), _envelope("John Doe", "m-keyed")
    key = _key()
    claim = await _claim_envelope(store, key, same, owner="a")
    assert claim.status is ClaimStatus.ACQUIRED
    assert claim.record.fingerprint.startswith(HMAC_V1)
    assert claim.record.fingerprint != HMAC_V1 + fingerprint(same)  # keyed, not the plain hash
    await store.complete(key, "a", Outcome("approved"))
    assert (await _claim_envelope(store, key, same)).status is ClaimStatus.DONE
    assert (await _claim_envelope(store, key, other)).status is ClaimStatus.CONFLICT
    # The legacy value alone does not match an h1 record (compared in the stored scheme only).
    assert (await _claim(store, key, owner="b", fp=fingerprint(same))).status is ClaimStatus.CONFLICT
    # A build with another key sees a different request.
    fp2, legacy2 = Fingerprinter("another-key-0123456789").with_legacy(same)
    again = await store.claim(
        key=key, message_id="m-keyed", operation="aml_screening", fingerprint=fp2, owner="b",
        lease_s=30.0, retention_s=3600.0, legacy_fingerprints=legacy2,
    )  # fmt: skip
    assert again.status is ClaimStatus.CONFLICT


# -- the conflict log is purged with its record --------------------------------------------------------


async def test_purge_removes_the_conflicts_of_expired_records(store: DedupeStore) -> None:
    old, young = _key(), _key()
    await _claim(store, old, fp="fp1")
    await store.complete(old, "a", Outcome("approved"))
    await store.record_conflict(
        key=old, message_id="m-old", fingerprint="fp2", stored_fingerprint="fp1", source="t/0@1"
    )
    store.clock.now += 1800  # type: ignore[attr-defined]
    await _claim(store, young, fp="fp1")
    await store.complete(young, "a", Outcome("approved"))
    await store.record_conflict(
        key=young, message_id="m-young", fingerprint="fp2", stored_fingerprint="fp1", source="t/0@2"
    )
    store.clock.now += 1801  # type: ignore[attr-defined]  # `old` past its retention, `young` not
    assert await store.purge_expired() == 1
    assert await store.conflicts("m-old") == []
    assert [c["source"] for c in await store.conflicts("m-young")] == ["t/0@2"]
    store.clock.now += 3600  # type: ignore[attr-defined]
    assert await store.purge_expired() == 1
    assert await store.conflicts() == []


# -- a claim whose answer was lost is re-entrant for its owner -----------------------------------------


async def test_claim_retried_after_a_lost_reply_is_acquired(
    store: DedupeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _key()
    original = store._claim

    async def reply_lost(**kwargs: Any) -> Claim:
        await original(**kwargs)  # the row is committed ...
        raise StoreError("connection lost")  # ... but the answer never arrives

    monkeypatch.setattr(store, "_claim", reply_lost)
    with pytest.raises(StoreError):
        await _claim(store, key, owner="a", lease=30)
    monkeypatch.undo()
    store.clock.now += 5  # type: ignore[attr-defined]
    # The retry by the same owner gets its own lease back at once (renewed), not BUSY for a whole lease.
    claim = await _claim(store, key, owner="a", lease=30)
    assert claim.status is ClaimStatus.ACQUIRED
    assert claim.record.owner == "a" and claim.record.attempts == 1
    assert claim.record.lease_until == store.clock.now + 30  # type: ignore[attr-defined]
    assert claim.record == await store.get(key)
    # Now held: neither a second handler of the same owner nor another owner gets it.
    assert (await _claim(store, key, owner="a")).status is ClaimStatus.BUSY
    assert (await _claim(store, key, owner="b")).status is ClaimStatus.BUSY
    # Another payload is still a conflict, even for the owner.
    assert (await _claim(store, key, owner="a", fp="other")).status is ClaimStatus.CONFLICT
    done = await store.complete(key, "a", Outcome("approved", 200, "ref-1"))
    assert done.state is State.COMPLETED and done.attempts == 1


async def test_a_lost_reply_to_a_take_over_is_re_entrant_too(
    store: DedupeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _key()
    await _claim(store, key, owner="a", lease=10)
    await store.release(key, "a", "abandoned")
    original = store._claim

    async def reply_lost(**kwargs: Any) -> Claim:
        await original(**kwargs)
        raise StoreError("connection lost")

    monkeypatch.setattr(store, "_claim", reply_lost)
    with pytest.raises(StoreError):
        await _claim(store, key, owner="b")
    monkeypatch.undo()
    claim = await _claim(store, key, owner="b")
    assert claim.status is ClaimStatus.ACQUIRED and claim.record.attempts == 2


async def test_same_owner_concurrent_claims_have_one_winner(store: DedupeStore) -> None:
    """Re-entrance never lets two handlers of one process hold a key at once."""
    key = _key()
    results: list[ClaimStatus] = []

    async def claim() -> None:
        results.append((await _claim(store, key, owner="a")).status)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(claim)
    assert results.count(ClaimStatus.ACQUIRED) == 1
    assert results.count(ClaimStatus.BUSY) == 9
    # Once the holder released, the key is free again (RELEASED → take-over).
    await store.release(key, "a", "abandoned")
    assert (await _claim(store, key, owner="a")).status is ClaimStatus.ACQUIRED


async def test_a_failed_intrusion_does_not_end_the_holders_hold(store: DedupeStore) -> None:
    key = _key()
    assert (await _claim(store, key, owner="a")).status is ClaimStatus.ACQUIRED
    with pytest.raises(LeaseLost):
        await store.complete(key, "intruder", Outcome("approved"))
    with pytest.raises(LeaseLost):
        await store.release(key, "intruder", "x")
    with pytest.raises(LeaseLost):
        await store.renew(key, "intruder", 30)
    # "a" still holds the key: a second handler of "a" is not let in.
    assert (await _claim(store, key, owner="a")).status is ClaimStatus.BUSY


# -- the claim rule itself (consumer.store.base.decide_claim), shared by every backend -------------------


def _record(state: State, *, owner: str | None = "a", lease_until: float | None = 1_000_030.0) -> Record:
    if state is not State.IN_PROGRESS:
        owner, lease_until = None, None
    return Record(
        key="k", message_id="m", operation="aml_screening", fingerprint="fp1", state=state, owner=owner,
        lease_until=lease_until, attempts=1, outcome=None, last_error=None, created_at=1_000_000.0,
        updated_at=1_000_000.0, expires_at=1_003_600.0,
    )  # fmt: skip


def _decide(existing: Record | None, *, owner: str = "a", fps: tuple[str, ...] = ("fp1",),
            now: float = 1_000_010.0, reentrant: bool = False) -> Decision:  # fmt: skip
    return decide_claim(existing, fingerprints=fps, owner=owner, now=now, reentrant=reentrant)


def test_rule_new_key_is_acquired() -> None:
    assert _decide(None) is Decision.ACQUIRE_NEW
    assert Decision.ACQUIRE_NEW.status is ClaimStatus.ACQUIRED


@pytest.mark.parametrize("state", list(State))
def test_rule_checks_the_fingerprint_first_on_every_path(state: State) -> None:
    assert _decide(_record(state), fps=("fp2",), reentrant=True) is Decision.CONFLICT
    # A legacy fingerprint of the same request matches.
    assert _decide(_record(state), fps=("h1:new", "fp1")) is not Decision.CONFLICT


@pytest.mark.parametrize("state", [State.COMPLETED, State.FAILED])
def test_rule_terminal_records_are_done(state: State) -> None:
    assert _decide(_record(state), now=9e9, reentrant=True) is Decision.DONE


def test_rule_live_lease_is_busy_unless_our_own_lost_claim() -> None:
    live = _record(State.IN_PROGRESS, owner="a")
    assert _decide(live, owner="b") is Decision.BUSY
    assert _decide(live, owner="b", reentrant=True) is Decision.BUSY
    assert _decide(live, owner="a") is Decision.BUSY  # another handler of ours holds or claims it
    assert _decide(live, owner="a", reentrant=True) is Decision.REENTER


def test_rule_expired_lease_and_released_are_taken_over() -> None:
    expired = _record(State.IN_PROGRESS, owner="a", lease_until=1_000_010.0)  # lease_until <= now
    assert _decide(expired, owner="b") is Decision.TAKE_OVER
    assert _decide(expired, owner="a", reentrant=True) is Decision.TAKE_OVER  # counts a new attempt
    assert _decide(_record(State.RELEASED), owner="b") is Decision.TAKE_OVER
    assert {d.status for d in (Decision.TAKE_OVER, Decision.REENTER)} == {ClaimStatus.ACQUIRED}


def test_rows_map_to_records_in_column_order() -> None:
    record = _record(State.COMPLETED)
    row = [getattr(record, c) for c in COLUMNS]
    row[COLUMNS.index("state")] = "completed"
    row[COLUMNS.index("outcome")] = dump_outcome(Outcome("approved", 200, "ref-1"))
    mapped = record_from_row(row)
    assert mapped.state is State.COMPLETED and mapped.outcome == Outcome("approved", 200, "ref-1")
    assert mapped.key == "k" and mapped.expires_at == record.expires_at
    row[COLUMNS.index("outcome")] = None
    assert record_from_row(row).outcome is None
