"""Rows of docs/guarantees.md "Other failures" that had no end-to-end test: the retry ceiling (RELEASED,
``retries_exhausted``, a redrive reusing the key) and a provider 401 in the middle of a stream (the
watermark stays below the message that met it). Real broker, daemon as a real process, sandbox over HTTP.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import anyio
import pytest

from consumer.keys import idempotency_key
from consumer.store import State, open_store
from producer.envelope import Envelope, decode
from tests.consumer.conftest import (
    Sandbox,
    committed_offsets,
    daemon_env,
    keys_for,
    publish_raw,
    read_all,
    start_daemon,
    wait_committed_to_end,
    wait_until,
)
from tests.consumer.test_exactly_once import make_envelopes, run_until_committed, settings_for
from tests.consumer.test_replay import make_cli, records_of
from tests.ledger import assert_ledger_exactly_once

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def _key(env: Envelope) -> str:
    return idempotency_key("idv", env.operation, env.message_id)


async def test_retries_exhausted_releases_the_record_and_a_redrive_reuses_the_key(
    kafka_bootstrap: str, topic: str, psb: Sandbox, profile: str, sqlite_url: str, tmp_path: Path
) -> None:
    """The provider answers 500 to every attempt: past the ceiling the lease is released (RELEASED,
    ``last_error = retries_exhausted``) because every request got its answer, the message is dead-lettered
    with its attempts, no side effect; the redrive uses the same key and performs it once. On Didit each
    retry after a 500 and the redrive (a record claimed before) look up first, find nothing, and send."""
    sb = psb
    doomed, fine = make_envelopes(2, seed=301, profile=profile)
    await publish_raw(kafka_bootstrap, topic, records_of([doomed]), partition=6)
    group = "live-" + uuid.uuid4().hex[:6]
    sb.faults(error_rate=1.0)
    settings = settings_for(
        kafka_bootstrap, topic, group, sqlite_url, sb.url, provider_max_attempts=3, breaker_min_calls=1000,
        provider=profile,
    )  # fmt: skip
    await run_until_committed(settings)
    async with open_store(sqlite_url) as store:
        record = await store.get(_key(doomed))
    assert record is not None and record.state is State.RELEASED, record
    assert record.last_error == "retries_exhausted" and record.owner is None and record.attempts == 1
    (letter,) = await read_all(kafka_bootstrap, f"{topic}.dlq")
    headers = dict(letter.headers)
    assert headers["idv-dlq-reason"] == b"retries_exhausted" and headers["idv-dlq-attempts"] == b"3"
    assert sb.side_effects().get(_key(doomed), 0) == 0

    # The partition moved on: a later message on it is processed normally.
    sb.faults(error_rate=0.0)
    await publish_raw(kafka_bootstrap, topic, records_of([fine]), partition=6)
    await run_until_committed(settings)

    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path, provider=profile)
    code, summary, _, err = await cli("dlq", "redrive", "--reason", "retries_exhausted", "--direct", "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"completed": 1}
    async with open_store(sqlite_url) as store:
        record = await store.get(_key(doomed))
    assert record is not None and record.state is State.COMPLETED and record.attempts == 2
    assert_ledger_exactly_once(sb.ledger(), keys_for([doomed, fine]))


async def test_lost_answers_on_didit_are_recovered_by_reconciliation_not_dead_lettered(
    kafka_bootstrap: str, topic: str, sqlite_url: str
) -> None:
    """Didit acts and every answer is lost: the retry's lookup finds the check or session by our key,
    so the message completes with one attempt and one side effect, where the ietf profile (above) needs
    replays and, past the ceiling, a dead letter."""
    from sandbox import SandboxConfig, run_in_thread
    from tests.consumer.conftest import API_KEY

    with run_in_thread(SandboxConfig(port=0, api_keys=(API_KEY,), profile="didit")) as handle:
        sb = Sandbox(handle.url)
        lost = make_envelopes(3, seed=303, profile="didit")  # one of each operation
        await publish_raw(kafka_bootstrap, topic, records_of(lost), partition=6)
        sb.faults(drop_after_effect_rate=1.0)
        settings = settings_for(
            kafka_bootstrap, topic, "live-" + uuid.uuid4().hex[:6], sqlite_url, sb.url, provider="didit",
            provider_max_attempts=3, breaker_min_calls=1000, lease_s=3, provider_timeout_s=1,
        )  # fmt: skip
        daemon = await run_until_committed(settings)
        assert daemon.stats.by_disposition["completed"] == 3
        view = assert_ledger_exactly_once(sb.ledger(), keys_for(lost))
        assert set(view.attempts.values()) == {1}  # each acted once, its answer lost, never resent
    assert await read_all(kafka_bootstrap, f"{topic}.dlq") == []
    async with open_store(sqlite_url) as store:
        for env in lost:
            record = await store.get(_key(env))
            assert record is not None and record.state is State.COMPLETED, record
            assert record.outcome is not None and record.outcome.detail == "reconciled"


async def test_lost_answers_keep_the_key_until_its_lease_expires_and_a_redrive_is_answered_by_the_provider(
    kafka_bootstrap: str, topic: str, sandbox: object, sqlite_url: str, tmp_path: Path
) -> None:
    """The provider acts but every answer is lost: past the ceiling the message is dead-lettered, but its
    key is not released (the last request may be at the provider): it stays IN_PROGRESS until the lease
    expires, with one side effect. The redrive after that uses the same key and is answered from the
    provider's stored response."""
    sb = Sandbox(sandbox.url)  # type: ignore[attr-defined]
    (doomed,) = make_envelopes(1, seed=302)
    await publish_raw(kafka_bootstrap, topic, records_of([doomed]), partition=6)
    group = "live-" + uuid.uuid4().hex[:6]
    sb.faults(drop_after_effect_rate=1.0)
    settings = settings_for(
        kafka_bootstrap, topic, group, sqlite_url, sb.url, provider_max_attempts=3, breaker_min_calls=1000,
        lease_s=3, provider_timeout_s=1,
    )  # fmt: skip
    await run_until_committed(settings)
    async with open_store(sqlite_url) as store:
        record = await store.get(_key(doomed))
    assert record is not None and record.state is State.IN_PROGRESS and record.attempts == 1, record
    (letter,) = await read_all(kafka_bootstrap, f"{topic}.dlq")
    headers = dict(letter.headers)
    assert headers["idv-dlq-reason"] == b"retries_exhausted" and headers["idv-dlq-attempts"] == b"3"
    ledger = sb.ledger()["keys"][_key(doomed)]
    assert ledger["side_effects"] == 1 and len(ledger["attempts"]) == 3  # one effect, then two replays

    sb.faults(drop_after_effect_rate=0.0)
    assert record.lease_until is not None
    await anyio.sleep(max(0.0, record.lease_until - time.time()) + 0.2)  # the kept lease runs out
    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path)
    code, summary, _, err = await cli("dlq", "redrive", "--reason", "retries_exhausted", "--direct", "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"completed": 1}
    async with open_store(sqlite_url) as store:
        record = await store.get(_key(doomed))
    assert record is not None and record.state is State.COMPLETED and record.attempts == 2
    view = assert_ledger_exactly_once(sb.ledger(), keys_for([doomed]))
    assert view.replays[_key(doomed)] == 3  # two during the retries, one for the redrive


async def test_a_401_mid_stream_stops_with_the_watermark_below_the_first_rejected_message(
    kafka_bootstrap: str,
    topic: str,
    sandbox: object,
    sqlite_url: str,
    tmp_path: Path,
    sb: Sandbox,
    group: str,
) -> None:
    """Some messages succeed, then the provider starts rejecting the API key (revoked): the daemon exits
    3, everything committed has a recorded outcome, and no rejected message is below the committed
    offset of its partition."""
    sb.faults(latency_ms=20)
    unique = make_envelopes(200, subjects=200, seed=311)
    await publish_raw(kafka_bootstrap, topic, records_of(unique))
    env = daemon_env(kafka_bootstrap, topic, group, sqlite_url, sb.url, max_in_flight=4, commit_every=5)
    proc = start_daemon(env, tmp_path / "d.log")
    try:

        async def committed_at_least(n: int) -> bool:
            return sum((await committed_offsets(kafka_bootstrap, group, topic)).values()) >= n

        await wait_until(lambda: committed_at_least(30), "30 committed messages", timeout=60)
        sandbox.call(lambda app: app._api_keys.clear())  # type: ignore[attr-defined]  # the key is revoked
        code = proc.wait(60)
    finally:
        proc.kill()
    assert code == 3, proc.log()[-2000:]
    committed = await committed_offsets(kafka_bootstrap, group, topic)
    messages = await read_all(kafka_bootstrap, topic)
    ledger = sb.ledger()["keys"]
    rejected = {k for k, v in ledger.items() if any(a["status"] == 401 for a in v["attempts"])}
    assert rejected, "no request met the 401"
    below = 0
    async with open_store(sqlite_url) as store:
        for msg in messages:
            envelope = decode(msg.value, msg.headers)
            key = _key(envelope)
            if msg.offset < committed[msg.partition]:
                below += 1
                record = await store.get(key)
                assert record is not None and record.state is State.COMPLETED, (msg.partition, msg.offset)
                assert key not in rejected, f"{msg.partition}@{msg.offset} met the 401 but was committed"
    assert below >= 30, f"only {below} messages committed before the 401: the claim is vacuous"
    assert below < len(unique)
    assert_ledger_exactly_once(
        sb.ledger(), {k for k, v in ledger.items() if v["side_effects"]}, at_most_once=rejected
    )


async def test_a_provider_outage_pauses_every_partition_and_resumes_after_it(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str
) -> None:
    """During an outage the breaker opens, attempts wait instead of spending their retry budget, the buffer
    fills and every assigned partition is paused (the consumer keeps polling: it stays in the group);
    when the provider is back the partitions resume and everything completes exactly once."""
    import anyio

    from consumer.daemon import Daemon

    sb.faults(error_rate=1.0)
    unique = make_envelopes(120, subjects=120, seed=321)
    await publish_raw(kafka_bootstrap, topic, records_of(unique))
    group = "g-" + uuid.uuid4().hex[:8]
    settings = settings_for(
        kafka_bootstrap, topic, group, sqlite_url, sb.url,
        provider_max_attempts=4, breaker_min_calls=10, breaker_open_s=1, max_in_flight=8, max_buffered=16,
    )  # fmt: skip
    daemon = Daemon(settings)
    codes: list[int] = []

    def all_paused() -> bool:
        consumer = daemon.consumer
        if consumer is None:
            return False
        assigned = consumer.assignment()
        return bool(assigned) and consumer.paused() == assigned

    async def run() -> None:
        codes.append(await daemon.run())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_until(all_paused, "every assigned partition paused during the outage", timeout=30)
        assert daemon.consumer is not None
        assigned = set(daemon.consumer.assignment())
        assert len(assigned) == 8
        dead = len(await read_all(kafka_bootstrap, f"{topic}.dlq"))
        assert dead <= 16, f"{dead} dead letters: the outage spent retry budgets instead of waiting"
        sb.faults(error_rate=0.0)
        await wait_until(lambda: not daemon.consumer.paused(), "the partitions to resume", timeout=30)  # type: ignore[union-attr]
        await wait_committed_to_end(kafka_bootstrap, group, topic, 90)
        assert set(daemon.consumer.assignment()) == assigned  # type: ignore[union-attr]  # no rebalance
        daemon.stop()
    assert codes == [0]
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    dead_ids = {decode(m.value, m.headers).message_id for m in letters}
    assert_ledger_exactly_once(
        sb.ledger(),
        keys_for([e for e in unique if e.message_id not in dead_ids]),
        at_most_once=keys_for([e for e in unique if e.message_id in dead_ids]),
    )
