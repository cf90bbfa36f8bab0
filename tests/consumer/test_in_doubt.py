"""In-doubt calls are recorded as in doubt, never as a wrong outcome; misconfiguration stops the daemon
instead of burning the backlog; FAILED records can be retried deliberately. Real broker, the sandbox
provider over HTTP, the daemon in-process and the tools as real processes."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import httpx
import orjson
import pytest

from consumer.daemon import Daemon
from consumer.keys import idempotency_key
from consumer.store import State, open_store
from consumer.store.base import Outcome
from producer.envelope import OPERATIONS, Envelope
from tests.consumer.conftest import API_KEY, Sandbox, claim_for, committed_offsets, publish_raw, read_all
from tests.consumer.test_exactly_once import run_until_committed, settings_for
from tests.consumer.test_replay import make_cli, records_of

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def envelope(tag: str, **request: str) -> Envelope:
    return Envelope(
        message_id=f"{tag}-{uuid.uuid4()}",
        operation="aml_screening",
        subject_id=f"subject-{tag}",
        request={"full_name": "Doubt Person", **request},
    )


async def dead_letter_reasons(bootstrap: str, topic: str) -> list[str]:
    return [dict(m.headers)["idv-dlq-reason"].decode() for m in await read_all(bootstrap, f"{topic}.dlq")]


def metric(daemon: Daemon, name: str) -> float:
    for line in daemon.metrics.render().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_key_reused_for_another_body_is_dead_lettered_in_doubt_never_failed(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, group: str
) -> None:
    """The provider already holds our key for a different body (e.g. the dedupe record was purged and
    the message ID reused): it answers 422 idempotency_key_reused. It may have acted; we do not know what
    it did, so the message is in doubt — not FAILED, which would claim the request was rejected."""
    env = envelope("reused")
    key = idempotency_key("idv", env.operation, env.message_id)
    async with httpx.AsyncClient() as http:
        seeded = await http.post(
            sb.url + OPERATIONS["aml_screening"].path,
            content=orjson.dumps({"full_name": "Someone Else"}),
            headers={"x-api-key": API_KEY, "idempotency-key": key, "content-type": "application/json"},
            timeout=10,
        )
    assert seeded.status_code == 200
    await publish_raw(kafka_bootstrap, topic, records_of([env]), partition=0)
    daemon = await run_until_committed(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url))
    assert daemon.stats.by_disposition["in_doubt"] == 1 and daemon.stats.by_disposition["failed"] == 0
    assert await dead_letter_reasons(kafka_bootstrap, topic) == ["in_doubt"]
    assert metric(daemon, "idv_in_doubt_total") == 1
    async with open_store(sqlite_url) as store:
        record = await store.get(key)
    assert record is not None and record.state is State.RELEASED and record.last_error == "in_doubt"
    assert record.outcome is None
    assert [a["status"] for a in sb.ledger()["keys"][key]["attempts"]] == [200, 422]


async def test_unfinished_record_older_than_the_provider_key_retention_is_in_doubt_until_forced(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path, group: str
) -> None:
    """A process claimed the key (and may have sent it) and died; the record is older than the
    provider keeps keys. Sending again could act twice: dead-lettered in_doubt, provider not called.
    A redrive does the same, unless --force, which sends it and says what it risks."""
    env = envelope("stale")
    key = idempotency_key("idv", env.operation, env.message_id)
    async with open_store(sqlite_url) as store:
        claim = await claim_for(store, key, env, "crashed-process", 0.2)
        assert claim.record.attempts == 1
    await anyio.sleep(1.2)
    await publish_raw(kafka_bootstrap, topic, records_of([env]), partition=0)
    settings = settings_for(
        kafka_bootstrap,
        topic,
        group,
        sqlite_url,
        sb.url,
        provider_key_retention_s=1.0,
        provider_retention_check="warn",  # a 1 s retention is refused at start otherwise
    )
    daemon = await run_until_committed(settings)
    assert daemon.stats.by_disposition["in_doubt"] == 1
    assert await dead_letter_reasons(kafka_bootstrap, topic) == ["in_doubt"]
    assert key not in sb.ledger()["keys"]  # not sent
    async with open_store(sqlite_url) as store:
        record = await store.get(key)
    assert record is not None and record.state is State.RELEASED and record.last_error == "in_doubt"

    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path, provider_key_retention_s=1.0)
    code, summary, _, err = await cli("dlq", "redrive", "--reason", "in_doubt", "--direct", "--json")
    assert code == 1, err
    assert summary is not None and summary["counts"] == {"dead-lettered again": 1}, summary
    assert key not in sb.ledger()["keys"]

    code, summary, _, err = await cli(
        "dlq", "redrive", "--reason", "in_doubt", "--direct", "--force", "--json"
    )
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"completed": 1}, summary
    assert any("second side effect" in note for note in summary["notes"]), summary["notes"]
    assert sb.side_effects()[key] == 1
    async with open_store(sqlite_url) as store:
        record = await store.get(key)
    assert record is not None and record.state is State.COMPLETED


@pytest.mark.parametrize("path", ["/v2", "/api/v3"])
async def test_a_404_for_the_route_stops_the_daemon_and_commits_nothing(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, path: str, group: str
) -> None:
    """IDV_PROVIDER_URL points at the wrong place: every request would be recorded FAILED with 404 and
    the whole backlog committed. Instead the daemon stops like for a rejected key (exit code 3)."""
    envs = [envelope(f"route{i}") for i in range(3)]
    await publish_raw(kafka_bootstrap, topic, records_of(envs), partition=0)
    daemon = Daemon(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url + path))
    with anyio.fail_after(60):
        code = await daemon.run()
    assert code == 3
    assert set((await committed_offsets(kafka_bootstrap, group, topic)).values()) == {0}
    assert daemon.stats.by_disposition["failed"] == 0
    assert sb.ledger()["totals"]["side_effects"] == 0
    async with open_store(sqlite_url) as store:
        counts = await store.counts()
    assert counts.get("failed", 0) == 0 and counts.get("completed", 0) == 0


async def test_retry_failed_runs_failed_records_again_under_a_new_key_generation(
    kafka_bootstrap: str, topic: str, sqlite_url: str, tmp_path: Path, sb: Sandbox, group: str
) -> None:
    """A request recorded FAILED (the provider rejected it; seeded here, the sandbox rejects nothing a
    valid envelope carries) is run again on purpose: a reason, an audit line, a NEW key generation (the
    old key would only replay the stored rejection). Completed ones are left alone."""
    failed, done = envelope("failed"), envelope("done")
    positions = await publish_raw(kafka_bootstrap, topic, records_of([failed, done]), partition=3)
    base = idempotency_key("idv", failed.operation, failed.message_id)
    gen1 = idempotency_key("idv", failed.operation, failed.message_id, generation=1)
    async with open_store(sqlite_url) as store:
        await claim_for(store, base, failed, "earlier", 30)
        await store.complete(base, "earlier", Outcome("failed", 422, None, "validation_error"), failed=True)
    await run_until_committed(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url))
    assert base not in sb.ledger()["keys"]  # FAILED is final for the daemon: never sent again

    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path)
    cli.env["USER"] = "bob"
    audit = tmp_path / "audit.jsonl"
    where = ["--partition", "3", "--from-offset", str(positions[0][1]), "--to-offset", str(positions[1][1])]
    code, _, _, err = await cli("replay", "--retry-failed", *where, "--yes")
    assert code == 2 and "--reason" in err
    code, _, _, err = await cli("replay", "--retry-failed", "--reverify", "--reason", "x", *where, "--yes")
    assert code == 2
    code, summary, _, err = await cli(
        "replay", "--retry-failed", "--reason", "provider fixed its validation", *where,
        "--audit-file", str(audit), "--yes", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"retried": 1, "not failed (skipped)": 1}, summary
    effects = sb.side_effects()
    assert effects[gen1] == 1 and base not in effects
    assert idempotency_key("idv", done.operation, done.message_id) in effects  # from the daemon, once
    assert sum(effects.values()) == 2
    (line,) = audit.read_text().splitlines()
    entry = orjson.loads(line)
    assert entry["mode"] == "retry_failed" and entry["operator"] == "bob" and entry["key"] == gen1
    async with open_store(sqlite_url) as store:
        original, retried = await store.get(base), await store.get(gen1)
    assert original is not None and original.state is State.FAILED  # history kept
    assert retried is not None and retried.state is State.COMPLETED

    # Again: the latest generation is COMPLETED now, so nothing is sent.
    code, summary, _, err = await cli(
        "replay", "--retry-failed", "--reason", "again", *where, "--audit-file", str(audit), "--yes", "--json"
    )
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"not failed (skipped)": 2}, summary
    assert sum(sb.side_effects().values()) == 2


async def test_a_redirect_stops_the_daemon_and_commits_nothing(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, group: str
) -> None:
    """A proxy in front of the provider answers 302: a configuration problem, not a per-message
    failure. Exit code 3, nothing committed, nothing recorded FAILED, the key handed back."""
    sb.faults(script=["302"])
    env = envelope("redirect")
    key = idempotency_key("idv", env.operation, env.message_id)
    await publish_raw(kafka_bootstrap, topic, records_of([env]), partition=1)
    daemon = Daemon(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url))
    with anyio.fail_after(60):
        code = await daemon.run()
    assert code == 3
    assert set((await committed_offsets(kafka_bootstrap, group, topic)).values()) == {0}
    assert [a["status"] for a in sb.ledger()["keys"][key]["attempts"]] == [302]
    async with open_store(sqlite_url) as store:
        record = await store.get(key)
    assert record is not None and record.state is State.RELEASED and record.last_error == "provider_config"
