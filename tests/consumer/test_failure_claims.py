"""Rows of docs/guarantees.md "Other failures" that had no end-to-end test: the retry ceiling (RELEASED,
``retries_exhausted``, a redrive reusing the key) and a provider 401 in the middle of a stream (the
watermark stays below the message that met it). Real broker, daemon as a real process, sandbox over HTTP.
"""

from __future__ import annotations

import uuid
from pathlib import Path

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
    wait_until,
)
from tests.consumer.test_exactly_once import make_envelopes, run_until_committed, settings_for
from tests.consumer.test_replay import make_cli, records_of
from tests.ledger import assert_ledger_exactly_once

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def _key(env: Envelope) -> str:
    return idempotency_key("idv", env.operation, env.message_id)


async def test_retries_exhausted_releases_the_record_and_a_redrive_reuses_the_key(
    kafka_bootstrap: str, topic: str, sandbox: object, sqlite_url: str, tmp_path: Path
) -> None:
    """The provider acts but every answer is lost: past the ceiling the lease is released (RELEASED,
    ``last_error = retries_exhausted``), the message is dead-lettered with its attempts, at most one side
    effect; the redrive uses the same key and is answered from the provider's stored response."""
    sb = Sandbox(sandbox.url)  # type: ignore[attr-defined]
    doomed, fine = make_envelopes(2, seed=301)
    await publish_raw(kafka_bootstrap, topic, records_of([doomed]), partition=6)
    group = "live-" + uuid.uuid4().hex[:6]
    sb.faults(drop_after_effect_rate=1.0)
    settings = settings_for(
        kafka_bootstrap, topic, group, sqlite_url, sb.url, provider_max_attempts=3, breaker_min_calls=1000
    )
    await run_until_committed(settings)
    async with open_store(sqlite_url) as store:
        record = await store.get(_key(doomed))
    assert record is not None and record.state is State.RELEASED, record
    assert record.last_error == "retries_exhausted" and record.owner is None and record.attempts == 1
    (letter,) = await read_all(kafka_bootstrap, f"{topic}.dlq")
    headers = dict(letter.headers)
    assert headers["idv-dlq-reason"] == b"retries_exhausted" and headers["idv-dlq-attempts"] == b"3"
    ledger = sb.ledger()["keys"][_key(doomed)]
    assert ledger["side_effects"] == 1 and len(ledger["attempts"]) == 3  # one effect, then two replays

    # The partition moved on: a later message on it is processed normally.
    sb.faults(drop_after_effect_rate=0.0)
    await publish_raw(kafka_bootstrap, topic, records_of([fine]), partition=6)
    await run_until_committed(settings)

    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path)
    code, summary, _, err = await cli("dlq", "redrive", "--reason", "retries_exhausted", "--direct", "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"completed": 1}
    async with open_store(sqlite_url) as store:
        record = await store.get(_key(doomed))
    assert record is not None and record.state is State.COMPLETED and record.attempts == 2
    view = assert_ledger_exactly_once(sb.ledger(), keys_for([doomed, fine]))
    assert view.replays[_key(doomed)] == 3  # two during the retries, one for the redrive


async def test_a_401_mid_stream_stops_with_the_watermark_below_the_first_rejected_message(
    kafka_bootstrap: str, topic: str, sandbox: object, sqlite_url: str, tmp_path: Path
) -> None:
    """Some messages succeed, then the provider starts rejecting the API key (revoked): the daemon exits
    3, everything committed has a recorded outcome, and no rejected message is below the committed
    offset of its partition."""
    sb = Sandbox(sandbox.url)  # type: ignore[attr-defined]
    sb.faults(latency_ms=20)
    unique = make_envelopes(200, subjects=200, seed=311)
    await publish_raw(kafka_bootstrap, topic, records_of(unique))
    group = "g-" + uuid.uuid4().hex[:8]
    env = daemon_env(
        bootstrap=kafka_bootstrap,
        topic=topic,
        group=group,
        store_url=sqlite_url,
        provider_url=sb.url,
        max_in_flight=4,
        commit_every=5,
    )
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
