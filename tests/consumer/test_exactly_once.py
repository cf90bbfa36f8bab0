"""Acceptance tests of the foundation, against the real broker and the sandbox provider over HTTP."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from consumer.daemon import Daemon
from consumer.keys import idempotency_key
from consumer.settings import Settings
from consumer.store import Record, State, open_store
from producer.envelope import Envelope, decode, encode
from tests.conftest import random_topic_name
from tests.consumer import conftest
from tests.consumer.conftest import (
    API_KEY,
    FINGERPRINT_KEY,
    Sandbox,
    committed_offsets,
    daemon_args,
    daemon_env,
    end_offsets,
    keys_for,
    kill_line,
    log_records,
    publish,
    publish_raw,
    read_all,
    run_to_end,
    run_until_killed,
    start_daemon,
    wait_assigned,
    wait_committed_to_end,
    wait_until,
)
from tests.ledger import assert_exactly_once

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

OPS = [
    ("aml_screening", {"full_name": "Test Person"}),
    ("id_verification", {"document_type": "passport", "front_image": "aGVsbG8="}),
    ("create_session", {"workflow_id": "wf-1"}),
]


async def publish_new(bootstrap: str, topic: str, n: int, **kw: Any) -> list[Envelope]:
    """:func:`make_envelopes` ``(n, **kw)``, published to ``topic``."""
    unique = make_envelopes(n, **kw)
    await publish(bootstrap, topic, unique)
    return unique


def make_envelopes(n: int, *, subjects: int = 50, seed: int = 1, profile: str = "ietf") -> list[Envelope]:
    """``n`` requests across the three operations. For ``profile="didit"`` each session gets its own
    workflow: Didit hands a subject's unfinished session of the same workflow to the next create (no new
    side effect, another request's session), so one side effect per message ID needs distinct workflows."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        op, req = OPS[i % 3]
        req = dict(req, vendor_data=f"case-{i}")
        if profile == "didit" and op == "create_session":
            req["workflow_id"] = f"wf-{seed}-{i}"
        out.append(
            Envelope(
                message_id=f"msg-{uuid.uuid4()}",
                operation=op,
                subject_id=f"subject-{rng.randrange(subjects)}",
                request=req,
            )
        )
    return out


def with_duplicates(unique: list[Envelope], ratio: float, seed: int = 2) -> list[Envelope]:
    rng = random.Random(seed)
    dups = rng.sample(unique, int(len(unique) * ratio))
    stream = list(unique)
    for d in dups:  # re-insert later in the stream: same ID, same payload (an upstream retry)
        stream.insert(rng.randrange(stream.index(d) + 1, len(stream) + 1), d)
    return stream


def settings_for(
    bootstrap: str, topic: str, group: str, store_url: str, provider_url: str, **kw: object
) -> Settings:
    base: dict[str, object] = dict(
        kafka_bootstrap=bootstrap, topic=topic, group_id=group, store_url=store_url,
        provider_url=provider_url, provider_api_key=API_KEY, fingerprint_key=FINGERPRINT_KEY,
        commit_interval_s=0.2, provider_backoff_base_s=0.05, provider_backoff_max_s=0.5,
        session_timeout_ms=6000, heartbeat_interval_ms=1000, health_port=0,
    )  # fmt: skip
    base.update(kw)
    return Settings.from_env({}, **base)


async def run_until_committed(settings: Settings, timeout: float = 90.0) -> Daemon:
    daemon = Daemon(settings)
    codes: list[int] = []

    async def run() -> None:
        codes.append(await daemon.run())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_committed_to_end(settings.kafka_bootstrap, settings.group_id, settings.topic, timeout)
        daemon.stop()
    assert codes == [0]
    return daemon


async def test_thousand_requests_with_ten_percent_duplicates(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, group: str
) -> None:
    unique = make_envelopes(909)
    stream = with_duplicates(unique, 0.1)
    assert len(stream) == 999
    await publish(kafka_bootstrap, topic, stream)
    daemon = await run_until_committed(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url))
    await assert_exactly_once(sb, sqlite_url, unique)
    assert daemon.stats.consumed == len(stream)
    assert daemon.stats.by_disposition["duplicate"] == len(stream) - len(unique)
    assert await committed_offsets(kafka_bootstrap, group, topic) == await end_offsets(kafka_bootstrap, topic)


async def test_didit_thousand_requests_with_duplicates_and_drops_after_the_effect(
    kafka_bootstrap: str, topic: str, sqlite_url: str, group: str
) -> None:
    """Didit has no idempotency key: 1,000 requests (10 % duplicate IDs) while one mutating call in ten
    acts and then loses its connection. Every lost answer is retried after a lookup that finds the
    session or check by our key: exactly one side effect per unique message ID, none sent twice."""
    from sandbox import SandboxConfig, run_in_thread

    with run_in_thread(SandboxConfig(port=0, api_keys=(API_KEY,), profile="didit")) as handle:
        sb = Sandbox(handle.url)
        sb.faults(drop_after_effect_rate=0.1, seed=7)
        unique = make_envelopes(909, profile="didit")
        stream = with_duplicates(unique, 0.1)
        assert len(stream) == 999
        await publish(kafka_bootstrap, topic, stream)
        daemon = await run_until_committed(
            settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url, provider="didit")
        )
        view = await assert_exactly_once(sb, sqlite_url, unique)
        per_key = sb.effects_per_idv_key()
        assert len(per_key) == len(unique) and set(per_key.values()) == {1}
        drops = sum(n for kind, n in sb.stats()["faults"].items() if "drop" in kind)
        assert drops >= 50, sb.stats()
        metrics = daemon.metrics.render().decode()
        found = next(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith('idv_reconciliations_total{result="found"}')
        )
        # Each dropped answer was followed by a lookup that found the effect, never by a second call.
        assert found == drops, (found, drops)
        assert sum(view.attempts.values()) == len(unique)
    assert daemon.stats.by_disposition["duplicate"] == len(stream) - len(unique)


async def test_didit_take_over_after_the_provider_acted_is_found_not_called_again(
    kafka_bootstrap: str, topic: str, sqlite_url: str, group: str
) -> None:
    """The after_provider_call window on Didit, staged exactly: a process claimed the key, Didit created
    the session under it, the process died before recording. The next owner takes the key over after the
    lease, looks the session up by our key (idv_reconciliations_total{result="found"}), records it, and
    Didit sees no second create: one side effect, one attempt."""
    from consumer.provider import ProviderClient
    from consumer.providers.didit import DiditAdapter
    from producer.envelope import get_operation
    from sandbox import SandboxConfig, run_in_thread
    from tests.consumer.conftest import claim_for

    (other,) = make_envelopes(1, profile="didit", seed=5)
    victim = Envelope(
        message_id=f"victim-{uuid.uuid4()}",
        operation="create_session",
        subject_id="subject-victim",
        request={"workflow_id": "wf-victim"},
    )
    key = idempotency_key("idv", victim.operation, victim.message_id)
    with run_in_thread(SandboxConfig(port=0, api_keys=(API_KEY,), profile="didit")) as handle:
        sb = Sandbox(handle.url)
        async with open_store(sqlite_url) as store:
            claim = await claim_for(store, key, victim, "crashed-process", 0.5)
            since = claim.record.created_at
        async with ProviderClient(sb.url, API_KEY, adapter=DiditAdapter()) as dead:  # its call, then death
            acted = await dead.call_envelope(get_operation(victim.operation), victim, key, since=since)
        await anyio.sleep(0.6)  # the dead process's lease runs out
        await publish(kafka_bootstrap, topic, [victim, other])
        daemon = await run_until_committed(
            settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url, provider="didit")
        )
        assert len(sb.key(key)["attempts"]) == 1  # the dead process's create only
        assert sb.effects_per_idv_key("create_session") == {key: 1}
        metrics = daemon.metrics.render().decode()
        assert 'idv_reconciliations_total{result="found"} 1.0' in metrics, metrics
        await assert_exactly_once(sb, sqlite_url, [victim, other])
    async with open_store(sqlite_url) as store:
        record = await store.get(key)
    assert record is not None and record.attempts == 2 and record.outcome is not None
    assert record.outcome.provider_reference == acted.outcome.provider_reference
    assert record.outcome.detail == "reconciled"


async def test_redelivery_to_a_new_group_is_not_sent_again(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str
) -> None:
    """A new consumer group replays the whole topic; the key ignores group/partition/offset."""
    unique = await publish_new(kafka_bootstrap, topic, 60)
    await run_until_committed(
        settings_for(kafka_bootstrap, topic, "g1-" + uuid.uuid4().hex[:6], sqlite_url, sb.url)
    )
    second = await run_until_committed(
        settings_for(kafka_bootstrap, topic, "g2-" + uuid.uuid4().hex[:6], sqlite_url, sb.url)
    )
    assert second.stats.by_disposition["duplicate"] == 60
    await assert_exactly_once(sb, sqlite_url, unique)


async def test_conflicting_payload_is_not_sent_and_does_not_stall(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, group: str
) -> None:
    original = Envelope(
        message_id="conflict-1",
        operation="aml_screening",
        subject_id="subj-c",
        request={"full_name": "Original Name"},
    )
    changed = Envelope(
        message_id="conflict-1",
        operation="aml_screening",
        subject_id="subj-c",
        request={"full_name": "Different Name"},
    )
    after = [
        Envelope(
            message_id=f"after-{i}",
            operation="aml_screening",
            subject_id="subj-c",
            request={"full_name": "Next"},
        )
        for i in range(5)
    ]
    await publish(kafka_bootstrap, topic, [original, changed, *after])
    daemon = await run_until_committed(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url))
    assert daemon.stats.by_disposition["conflict"] == 1
    effects = sb.side_effects()
    key = idempotency_key("idv", "aml_screening", "conflict-1")
    assert effects[key] == 1
    ledger_key = sb.ledger()["keys"][key]
    assert len(ledger_key["attempts"]) == 1  # the changed payload never reached the provider
    async with open_store(sqlite_url) as store:
        conflicts = await store.conflicts("conflict-1")
        assert len(conflicts) == 1
    (letter,) = await read_all(kafka_bootstrap, f"{topic}.dlq")  # dead-lettered, and only that one
    assert dict(letter.headers)["idv-dlq-reason"] == b"idempotency_conflict"
    assert letter.value == encode(changed)
    await assert_exactly_once(sb, sqlite_url, [original, *after])


async def test_invalid_messages_are_set_aside_without_stalling(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path, group: str
) -> None:
    secret = "SECRET-PAYLOAD-9f8e7d"
    good = Envelope(
        message_id="good-1", operation="aml_screening", subject_id="k", request={"full_name": "A"}
    )
    good2 = Envelope(
        message_id="good-2", operation="aml_screening", subject_id="k", request={"full_name": "B"}
    )
    no_id = dict(good.to_dict(), request={"full_name": secret})
    del no_id["message_id"]
    unknown = dict(good.to_dict(), message_id="u-1", operation="teleport", request={"x": secret})
    import orjson

    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = [
        (b"k", encode(good), good.headers()),
        (b"k", b"{not json " + secret.encode(), []),
        (b"k", orjson.dumps(no_id), []),
        (b"k", orjson.dumps(unknown), []),
        (b"k", b"\xff\xfe" + secret.encode(), []),
        (b"k", b"[1, 2, 3]", []),
        (b"k", None, []),
        (b"k", b'{"pad": "' + b"x" * (200 * 1024) + b'"}', []),
        (b"k", encode(good2), good2.headers()),
    ]
    await publish_raw(kafka_bootstrap, topic, records, partition=3)
    env = daemon_env(kafka_bootstrap, topic, group, sqlite_url, sb.url, max_message_bytes=64 * 1024)
    proc = start_daemon(env, tmp_path / "daemon.log")
    try:
        await wait_committed_to_end(kafka_bootstrap, group, topic, 60)
        assert proc.proc.poll() is None, "daemon crashed on bad input"
        proc.stop_cleanly()
    finally:
        proc.kill()
    log = proc.log()
    assert secret not in log
    for reason in (
        "invalid_json",
        "missing_message_id",
        "unknown_operation",
        "invalid_encoding",
        "invalid_envelope",
        "too_large",
    ):
        assert f'"reason":"{reason}"' in log, reason
    assert '"partition":3' in log and '"offset":1' in log
    await assert_exactly_once(sb, sqlite_url, [good, good2])


async def assert_committed_are_recorded(
    bootstrap: str, group: str, topic: str, store_url: str
) -> dict[int, int]:
    """Every message below a committed offset has a durable outcome (record before commit)."""
    committed = await committed_offsets(bootstrap, group, topic)
    async for msg, record in _committed_records(bootstrap, topic, store_url, committed):
        assert record is not None and record.state in (State.COMPLETED, State.FAILED), (
            f"offset {msg.partition}@{msg.offset} committed without a recorded outcome: {record}"
        )
    return committed


async def _committed_records(
    bootstrap: str, topic: str, store_url: str, committed: dict[int, int]
) -> AsyncIterator[tuple[Any, Record | None]]:
    """Each message of ``topic`` below its partition's ``committed`` offset, with its stored record."""
    messages = await read_all(bootstrap, topic)
    async with open_store(store_url) as store:
        for msg in messages:
            if msg.offset < committed.get(msg.partition, 0):
                env_ = decode(msg.value, msg.headers)
                yield msg, await store.get(idempotency_key("idv", env_.operation, env_.message_id))


def crash_args(
    bootstrap: str, topic: str, group: str, store_url: str, sb: Sandbox, profile: str, **extra: Any
) -> dict[str, object]:
    """The crash tests' daemon: a 3 s lease and a 2 s provider timeout, so the restart takes the dead
    process's claims over soon after it starts."""
    return daemon_args(
        bootstrap, topic, group, store_url, sb.url, provider=profile, lease_s=3, provider_timeout_s=2, **extra
    )


@pytest.mark.parametrize(
    ("point", "nth"),
    [
        ("before_claim", 40),
        ("after_claim", 40),
        ("after_provider_call", 40),
        ("after_record", 40),
        ("in_transaction", 2),
        ("after_commit", 2),
    ],
)
async def test_crash_window_then_restart(
    kafka_bootstrap: str,
    topic: str,
    psb: Sandbox,
    profile: str,
    sqlite_url: str,
    tmp_path: Path,
    point: str,
    nth: int,
    group: str,
) -> None:
    """SIGKILL at a named step, restart: no extra side effect, every message completed.

    Between the kill and the restart the test looks at what the kill left behind for the very message the
    fault point fired on (its log line names partition, offset and message ID), so each parameter proves
    its window was hit; after the restart it checks how that message was finished (taken over, answered
    from the provider's stored response — or, on Didit, which has no idempotency key, found by
    reconciliation without a second call —, skipped as a duplicate, or not redelivered at all).
    """
    sb = psb
    unique = await publish_new(kafka_bootstrap, topic, 120, subjects=40, profile=profile)
    # A commit every 10 finished messages: the 120 can finish within one commit interval, and then "the
    # second commit" would never come.
    common = crash_args(
        kafka_bootstrap, topic, group, sqlite_url, sb, profile, max_in_flight=16, commit_every=10
    )
    if point == "in_transaction":
        common.update(results_transactional="true", instance_id="crash-txn", commit_interval_s=0.3)
    crashed = run_until_killed(daemon_env(**common, fault_kill_at=f"{point}:{nth}"), tmp_path / "crash.log")
    line = kill_line(crashed.log())
    before = sum(sb.side_effects().values())
    assert before < len(unique) or point in ("in_transaction", "after_commit")
    # -- what the kill left behind -------------------------------------------------------------------
    committed = await assert_committed_are_recorded(kafka_bootstrap, group, topic, sqlite_url)
    by_id = {e.message_id: e for e in unique}
    victim = by_id.get(str(line.get("message_id")))
    key = idempotency_key("idv", victim.operation, victim.message_id) if victim else None
    ledger = sb.ledger()["keys"]
    async with open_store(sqlite_url) as store:
        record = await store.get(key) if key else None
    if point in ("before_claim", "after_claim", "after_provider_call", "after_record"):
        assert victim is not None and key is not None, line
        assert line["offset"] >= committed[line["partition"]], "the victim's offset was committed"
    if point == "before_claim":
        assert record is None and key not in ledger, record
    elif point == "after_claim":
        assert record is not None and record.state is State.IN_PROGRESS and record.attempts == 1, record
        assert key not in ledger, "the provider was called before the after_claim kill"
    elif point == "after_provider_call":
        assert record is not None and record.state is State.IN_PROGRESS and record.attempts == 1, record
        assert ledger[key]["side_effects"] == 1, ledger.get(key)
    elif point == "after_record":
        assert record is not None and record.state is State.COMPLETED, record
        assert ledger[key]["side_effects"] == 1 and len(ledger[key]["attempts"]) == 1
    elif point == "in_transaction":
        # Results were sent inside the open transaction; none is visible to read_committed readers
        # beyond what earlier transactions committed, and a recorded message waits above the offsets.
        visible = await conftest.read_results(kafka_bootstrap, f"{topic}.results", "read_committed")
        everything = await conftest.read_results(kafka_bootstrap, f"{topic}.results", "read_uncommitted")
        assert len(everything) > len(visible), "no open transaction at the kill"
        messages = await read_all(kafka_bootstrap, topic)
        below = {orjson.loads(m.value)["message_id"] for m in messages if m.offset < committed[m.partition]}
        assert {orjson.loads(v)["message_id"] for v in visible} <= below
        assert len(below) < len(messages), "the open transaction's offsets were committed"
    elif point == "after_commit":
        assert sum(committed.values()) > 0
    # -- the restart ---------------------------------------------------------------------------------
    restarted = await run_to_end(daemon_env(**common), tmp_path / "restart.log", timeout=90)
    view = await assert_exactly_once(sb, sqlite_url, unique)
    ledger = sb.ledger()["keys"]
    async with open_store(sqlite_url) as store:
        after = await store.get(key) if key else None
    handled = [
        r
        for r in log_records(restarted.log())
        if str(r.get("msg", "")).startswith(("outcome recorded", "duplicate skipped"))
    ]
    if point == "before_claim":
        assert after is not None and after.attempts == 1 and len(ledger[key]["attempts"]) == 1
    elif point == "after_claim":
        assert after is not None and after.attempts == 2, after  # taken over after the lease ran out
        assert len(ledger[key]["attempts"]) == 1  # the one call, by the new owner
    elif point == "after_provider_call" and profile == "didit":
        assert after is not None and after.attempts == 2, after
        # Didit ignores Idempotency-Key: the take-over found the earlier session/check by our key in its
        # metadata and recorded it; the provider was not called a second time.
        assert len(ledger[key]["attempts"]) == 1, ledger[key]
        assert after.outcome is not None and after.outcome.detail == "reconciled", after
        assert any(
            str(r.get("msg", "")).startswith("reconciliation: earlier attempt found")
            and r.get("message_id") == victim.message_id  # type: ignore[union-attr]
            for r in log_records(restarted.log())
        ), "the victim was not reconciled"
    elif point == "after_provider_call":
        assert after is not None and after.attempts == 2, after
        assert view.replays[key] >= 1, ledger[key]  # the take-over was answered from the stored response
    elif point == "after_record":
        assert len(ledger[key]["attempts"]) == 1  # not called again
        assert any(
            r["msg"].startswith("duplicate skipped") and r.get("message_id") == victim.message_id
            for r in handled
        ), "the victim was not redelivered and skipped as a duplicate"  # type: ignore[union-attr]
    elif point == "in_transaction":
        results = await conftest.read_results(kafka_bootstrap, f"{topic}.results", "read_committed")
        ids = [orjson.loads(v)["message_id"] for v in results]
        assert sorted(ids) == sorted(e.message_id for e in unique)  # exactly one visible result each
        # The aborted transaction's messages came back and were skipped as duplicates, not called again.
        assert any(
            r["msg"].startswith("duplicate skipped") and r["offset"] >= committed[r["partition"]]
            for r in handled
        ), "nothing above the committed offsets was redelivered as a duplicate"
    elif point == "after_commit":
        redelivered = [r for r in handled if r["offset"] < committed[r["partition"]]]
        assert not redelivered, f"committed messages processed again: {redelivered[:3]}"
    if point != "after_commit":
        assert view.side_effects and sum(view.side_effects.values()) == len(unique)


async def test_crash_with_many_in_flight(
    kafka_bootstrap: str, topic: str, sqlite_url: str, tmp_path: Path, psb: Sandbox, profile: str, group: str
) -> None:
    """Slow provider, 48 calls in flight when the process dies after one side effect. Each take-over is
    answered from the provider's stored response (ietf) or found by reconciliation, never sent (didit)."""
    sb = psb
    # 1 s per call: the daemon has all 48 slots claimed and at the provider long before the first answer
    # comes back, and the kill comes with that first answer.
    unique = await publish_new(kafka_bootstrap, topic, 300, subjects=300, profile=profile)
    sb.faults(latency_ms=1000)
    common = crash_args(kafka_bootstrap, topic, group, sqlite_url, sb, profile, max_in_flight=48)
    run_until_killed(daemon_env(**common, fault_kill_at="after_provider_call:1"), tmp_path / "c.log")
    # The sandbox finishes the requests the dead process left behind: they act, nobody records them.
    await wait_until(lambda: sb.ledger()["totals"]["in_flight"] == 0, "the sandbox to finish", timeout=30)
    await assert_committed_are_recorded(kafka_bootstrap, group, topic, sqlite_url)
    ledger = sb.ledger()["keys"]
    async with open_store(sqlite_url) as store:
        pending = [
            r
            for e in unique
            if (r := await store.get(idempotency_key("idv", e.operation, e.message_id))) is not None
            and r.state is State.IN_PROGRESS
        ]
    # All 48 slots were busy at the kill: the first call had returned, the 47 others were at the provider.
    # Each of them acted after the kill, and the restart must take each over and get the stored response.
    acted = [r.key for r in pending if ledger.get(r.key, {}).get("side_effects") == 1]
    assert len(pending) == 48, f"{len(pending)} records in progress at the kill, not 48"
    assert len(acted) == 48, f"only {len(acted)} of the 48 in-progress records had acted"
    sb.faults(latency_ms=0)
    await run_to_end(daemon_env(**common), tmp_path / "r.log", timeout=120)
    view = await assert_exactly_once(sb, sqlite_url, unique)
    if profile == "didit":
        resent = [k for k in acted if view.attempts[k] != 1]
        assert not resent, f"{len(resent)} take-overs called Didit again instead of reconciling"
        return
    replayed = [k for k in acted if view.replays.get(k, 0) >= 1]
    assert len(replayed) == len(acted), f"{len(acted) - len(replayed)} take-overs were not replays"


async def test_sigterm_drains_and_never_commits_past_unrecorded(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path, group: str
) -> None:
    sb.faults(latency_ms=200)
    unique = await publish_new(kafka_bootstrap, topic, 400, subjects=400)
    env = daemon_env(kafka_bootstrap, topic, group, sqlite_url, sb.url, max_in_flight=32, drain_timeout_s=10)
    proc = start_daemon(env, tmp_path / "d.log")
    try:
        await wait_until(lambda: sum(sb.side_effects().values()) >= 60, "60 side effects", timeout=60)
        at_term = sum(sb.side_effects().values())
        t0 = time.monotonic()
        proc.terminate()
        code = proc.wait(30)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    assert code == 0, proc.log()[-2000:]
    assert elapsed < 10 + 5
    # Only the calls running at SIGTERM (at most 32) finish; the rest of the buffer (up to 1,024 fetched
    # messages, here ~340) is left for the next owner instead of being worked through during the drain.
    started_after = sum(sb.side_effects().values()) - at_term
    assert started_after <= 32 + 2, f"{started_after} side effects after SIGTERM: the buffer was drained"
    committed = await committed_offsets(kafka_bootstrap, group, topic)
    assert sum(committed.values()) > 0
    # Every message below a committed offset has a durable outcome.
    async for msg, record in _committed_records(kafka_bootstrap, topic, sqlite_url, committed):
        assert record is not None and record.state is State.COMPLETED, (msg.partition, msg.offset)
    sb.faults(latency_ms=0)
    # What was left is done by the next run, once.
    await run_to_end(env, tmp_path / "restart.log", timeout=90)
    await assert_exactly_once(sb, sqlite_url, unique)


async def test_wrong_api_key_stops_the_daemon_and_commits_nothing(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path, group: str
) -> None:
    unique = await publish_new(kafka_bootstrap, topic, 20)
    env = daemon_env(
        bootstrap=kafka_bootstrap, topic=topic, group=group, store_url=sqlite_url, provider_url=sb.url
    )
    env["IDV_PROVIDER_API_KEY"] = "wrong-key-123"
    proc = start_daemon(env, tmp_path / "d.log")
    try:
        code = proc.wait(60)
    finally:
        proc.kill()
    assert code == 3
    log = proc.log()
    assert "API key" in log and "wrong-key-123" not in log
    assert sum((await committed_offsets(kafka_bootstrap, group, topic)).values()) == 0
    effects = sb.side_effects()
    assert all(effects.get(k, 0) == 0 for k in keys_for(unique))


async def test_missing_topic_is_a_clear_error(
    kafka_bootstrap: str, sandbox: object, sqlite_url: str, tmp_path: Path
) -> None:
    env = daemon_env(kafka_bootstrap, random_topic_name("missing"), "g", sqlite_url, sandbox.url)  # type: ignore[attr-defined]
    proc = start_daemon(env, tmp_path / "d.log")
    try:
        assert proc.wait(60) == 6  # TopicMissing
    finally:
        proc.kill()
    assert "do not exist" in proc.log()
    assert "Traceback" not in proc.log()


async def test_rebalance_mid_stream_causes_no_duplicate_side_effects(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    """A second daemon joins the group while the first has calls in flight, then the first leaves.

    Each rebalance revokes partitions with work in flight: the daemon drains it, commits, then lets go, and
    the leases plus the provider key stop the new owner from repeating anything.
    """
    sb.faults(latency_ms=100)
    unique = await publish_new(kafka_bootstrap, topic, 400, subjects=200)
    group = "g-" + uuid.uuid4().hex[:8]
    common = daemon_args(
        kafka_bootstrap, topic, group, sqlite_url, sb.url,
        max_in_flight=16, rebalance_drain_s=5, lease_s=10, provider_timeout_s=5,
    )  # fmt: skip
    first = start_daemon(daemon_env(**common, instance_id="first"), tmp_path / "first.log")
    second = None
    try:
        await wait_until(lambda: sum(sb.side_effects().values()) >= 50, "50 side effects", timeout=60)
        second = start_daemon(daemon_env(**common, instance_id="second"), tmp_path / "second.log")
        # The join's rebalance is complete once the newcomer has partitions (the first revoked its own).
        await wait_assigned(second)
        await wait_until(lambda: sum(sb.side_effects().values()) >= 200, "200 side effects", timeout=60)
        first.terminate()  # leaves the group: another rebalance with work in flight
        assert first.wait(30) == 0
        sb.faults(latency_ms=0)
        await wait_committed_to_end(kafka_bootstrap, group, topic, 90)
        second.stop_cleanly()
    finally:
        conftest.kill_all(first, second)
    assert "partitions revoked" in first.log()
    assert "partitions assigned" in second.log()
    assert "outcome recorded" in second.log()  # the newcomer really took work over
    await assert_exactly_once(sb, sqlite_url, unique)


async def test_per_key_order_holds_under_concurrency(
    kafka_bootstrap: str, topic: str, sqlite_url: str, sb: Sandbox, group: str
) -> None:
    """Different keys run concurrently, the same key strictly in offset order.

    The sandbox answers with random latency (5-45 ms), so if two messages of one subject ever ran at once
    the later one would often reach the provider first; the ledger's arrival times would show it.
    """
    sb.faults(latency_ms=5, latency_jitter_ms=40, seed=7)
    subjects = [f"applicant-{i}" for i in range(12)]
    envelopes = [
        Envelope(
            message_id=f"ord-{s}-{n}-{uuid.uuid4().hex[:6]}",
            operation="aml_screening",
            subject_id=s,
            request={"full_name": "Ordered", "vendor_data": str(n)},
        )
        for n in range(25)
        for s in subjects
    ]
    await publish(kafka_bootstrap, topic, envelopes)
    daemon = await run_until_committed(
        settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url, max_in_flight=48)
    )
    ledger = sb.ledger()["keys"]
    messages = await read_all(kafka_bootstrap, topic)
    by_subject: dict[bytes, list[tuple[int, str]]] = {}
    for m in messages:
        by_subject.setdefault(m.key, []).append((m.offset, __import__("orjson").loads(m.value)["message_id"]))
    overlaps = 0
    for subject, items in by_subject.items():
        items.sort()
        keys = [idempotency_key("idv", "aml_screening", mid) for _, mid in items]
        arrivals = [ledger[k]["attempts"][0]["at"] for k in keys]
        assert arrivals == sorted(arrivals), f"{subject!r}: requests reached the provider out of order"
        overlaps += 1
    assert overlaps == len(subjects)
    # Concurrency really happened: one message at a time would space arrivals by at least the 5 ms minimum
    # latency; concurrent lanes put many arrivals closer together than that.
    arr = sorted(v["attempts"][0]["at"] for v in ledger.values())
    close = sum(1 for a, b in zip(arr, arr[1:], strict=False) if b - a < 0.004)
    assert close > len(arr) // 4, f"only {close} close arrivals: messages were processed one at a time"
    assert daemon.stats.by_disposition["completed"] == len(envelopes)


async def test_a_partition_with_one_busy_key_does_not_starve_the_others(
    kafka_bootstrap: str, sb: Sandbox, sqlite_url: str, group: str
) -> None:
    """Partition 0 holds 40 messages of one subject (they must run one at a time), partition 1 gets 40
    messages of 40 subjects once partition 0's fill the buffer (8). Without a per-partition share,
    partition 1 would wait until nearly all of partition 0 is dispatched; with it, it runs alongside and
    finishes first."""
    from tests.conftest import create_topic

    name = await create_topic(kafka_bootstrap, random_topic_name("share"), partitions=2, with_sinks=True)
    sb.faults(latency_ms=30)

    def env(subject: str, n: int) -> Envelope:
        return Envelope(
            message_id=f"share-{subject}-{n}-{uuid.uuid4().hex[:6]}",
            operation="aml_screening",
            subject_id=subject,
            request={"full_name": "Share Test", "vendor_data": str(n)},
        )

    hot = [env("hot-subject", n) for n in range(40)]
    spread = [env(f"subject-{n}", n) for n in range(40)]
    await publish_raw(kafka_bootstrap, name, [(e.key, encode(e), e.headers()) for e in hot], partition=0)
    settings = settings_for(kafka_bootstrap, name, group, sqlite_url, sb.url, max_in_flight=8, max_buffered=8)
    daemon = Daemon(settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        # Partition 1's messages arrive once partition 0's are fetched and the buffer is full of them.
        with anyio.fail_after(30):
            while not sb.side_effects():
                await anyio.sleep(0.01)
        await publish_raw(
            kafka_bootstrap, name, [(e.key, encode(e), e.headers()) for e in spread], partition=1
        )
        await wait_committed_to_end(kafka_bootstrap, group, name, 60)
        daemon.stop()
    ledger = sb.ledger()["keys"]

    def first_arrivals(envs: list[Envelope]) -> list[float]:
        keys = [idempotency_key("idv", e.operation, e.message_id) for e in envs]
        return sorted(ledger[k]["attempts"][0]["at"] for k in keys)

    hot_at, spread_at = first_arrivals(hot), first_arrivals(spread)
    hot_before = sum(1 for t in hot_at if t < spread_at[-1])
    assert hot_before < len(hot) // 2, (
        f"partition 1 finished only after {hot_before} of partition 0's 40 one-at-a-time messages"
    )


async def test_the_reaper_purges_records_past_retention(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, group: str
) -> None:
    await publish_new(kafka_bootstrap, topic, 20)
    settings = settings_for(
        kafka_bootstrap, topic, group, sqlite_url, sb.url,
        lease_s=2, provider_timeout_s=1, retention_s=3, purge_interval_s=1,
    )  # fmt: skip
    daemon = Daemon(settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await wait_committed_to_end(kafka_bootstrap, group, topic, 60)
        async with open_store(sqlite_url) as store:
            assert (await store.counts())["completed"] == 20
            with anyio.fail_after(15):
                while (await store.counts())["completed"]:
                    await anyio.sleep(0.5)
        daemon.stop()


@pytest.mark.parametrize(
    ("override", "code", "fragment"),
    [
        ({"IDV_KAFKA_BOOTSTRAP": "127.0.0.1:1"}, 4, "127.0.0.1:1"),
        ({"IDV_MAX_IN_FLIGHT": "lots"}, 2, "IDV_MAX_IN_FLIGHT"),
        ({"IDV_STORE_URL": "sqlite:////proc/nope/dedupe.db"}, 5, "dedupe store"),
    ],
)
async def test_start_up_failures_are_one_line_with_a_distinct_exit_code(
    kafka_bootstrap: str,
    topic: str,
    sandbox: object,
    sqlite_url: str,
    tmp_path: Path,
    override: dict[str, str],
    code: int,
    fragment: str,
) -> None:
    env = daemon_env(kafka_bootstrap, topic, "g-" + uuid.uuid4().hex[:8], sqlite_url, sandbox.url)  # type: ignore[attr-defined]
    env.update(override)
    proc = start_daemon(env, tmp_path / "d.log")
    try:
        assert proc.wait(60) == code, proc.log()[-2000:]
    finally:
        proc.kill()
    log = proc.log()
    assert fragment in log and "Traceback" not in log
    assert sum((await committed_offsets(kafka_bootstrap, env["IDV_GROUP_ID"], topic)).values()) == 0


async def test_same_message_republished_in_another_key_order_is_one_request_at_the_provider(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, group: str
) -> None:
    """The first copy reaches the provider (side effect performed) but its answer is lost; the message is
    re-published with the same content in another JSON key order. The fingerprint canonicalises key order,
    so the store sees the same request and the second copy takes the key over; the provider fingerprints
    the raw body, so the body must be those same canonical bytes. Before: the original key order was sent,
    the second copy got 422 idempotency_key_reused and was recorded FAILED although the provider acted."""
    sb.faults(script=["drop"])  # the first call is performed, its answer never arrives
    first = Envelope(
        message_id=f"order-{uuid.uuid4()}",
        operation="aml_screening",
        subject_id="subject-order",
        request={
            "full_name": "Order Person",
            "vendor_data": "case-order",
            "address": {"zip": "1", "city": "X"},
        },
    )
    second = Envelope(
        message_id=first.message_id,
        operation="aml_screening",
        subject_id="subject-order",
        request={
            "address": {"city": "X", "zip": "1"},
            "vendor_data": "case-order",
            "full_name": "Order Person",
        },
    )
    assert encode(first) != encode(second)
    await publish_raw(
        kafka_bootstrap, topic, [(e.key, encode(e), e.headers()) for e in (first, second)], partition=2
    )
    settings = settings_for(
        kafka_bootstrap, topic, group, sqlite_url, sb.url,
        provider_max_attempts=1, lease_s=2, provider_timeout_s=1,
    )  # fmt: skip
    daemon = await run_until_committed(settings)
    key = idempotency_key("idv", first.operation, first.message_id)
    entry = sb.ledger()["keys"][key]
    assert entry["side_effects"] == 1
    assert 422 not in [a["status"] for a in entry["attempts"]], entry["attempts"]
    assert daemon.stats.by_disposition["failed"] == 0
    assert daemon.stats.by_disposition["completed"] == 1
    async with open_store(sqlite_url) as store:
        record = await store.get(key)
    assert record is not None and record.state is State.COMPLETED
    assert record.outcome is not None and record.outcome.status == "approved"
