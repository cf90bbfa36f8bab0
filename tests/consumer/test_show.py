"""``idv-consumer show <message-id>`` on the real broker and a SQLite store, after a real daemon run."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import pytest

from consumer.keys import Fingerprinter, idempotency_key, key_hash
from consumer.store import Outcome, open_store
from producer.envelope import Envelope, encode
from tests.consumer.conftest import FINGERPRINT_KEY, Sandbox, publish_raw
from tests.consumer.test_exactly_once import run_until_committed, settings_for
from tests.consumer.test_replay import make_cli

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

SECRET_NAME = "Jane Secretname"


async def test_show_tells_one_requests_story(
    kafka_bootstrap: str, topic: str, sandbox: object, sqlite_url: str, tmp_path: Path
) -> None:
    sb = Sandbox(sandbox.url)  # type: ignore[attr-defined]
    good = Envelope(f"msg-{uuid.uuid4()}", "aml_screening", "subject-1", {"full_name": SECRET_NAME})
    # The same message ID with another payload: a conflict, dead-lettered (with the idv-message-id header).
    clash = Envelope(good.message_id, "aml_screening", "subject-1", {"full_name": SECRET_NAME + " II"})
    # An unknown operation without headers: dead-lettered; found by the message_id in its value.
    orphan_id = f"msg-{uuid.uuid4()}"
    orphan = orjson.dumps(
        {
            "schema_version": 1,
            "message_id": orphan_id,
            "operation": "no_such_operation",
            "subject_id": "subject-2",
            "request": {"full_name": SECRET_NAME},
            "created_at": "2026-12-01T12:00:00Z",
        }
    )
    positions = await publish_raw(
        kafka_bootstrap,
        topic,
        [
            (good.key, encode(good), good.headers()),
            (clash.key, encode(clash), clash.headers()),
            (b"subject-2", orphan, []),
        ],
        partition=2,
    )
    group = "g-" + uuid.uuid4().hex[:8]
    await run_until_committed(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url))

    # A re-verification generation, as `replay --reverify` writes it.
    gen1 = idempotency_key("idv", good.operation, good.message_id, generation=1)
    async with open_store(sqlite_url) as store:
        claim = await store.claim(
            key=gen1,
            message_id=good.message_id,
            operation=good.operation,
            fingerprint=Fingerprinter(FINGERPRINT_KEY)(good),
            owner="test",
            lease_s=30,
            retention_s=3600,
        )
        assert claim.status.value == "acquired"
        await store.complete(gen1, "test", Outcome("declined", 200, "ref-gen1"))

    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path)
    code, story, out, err = await cli("show", good.message_id, "--json")
    assert code == 0, err
    assert story is not None and story["found"]
    assert SECRET_NAME not in out and SECRET_NAME not in err  # never payloads
    base = idempotency_key("idv", good.operation, good.message_id)
    assert base not in out and gen1 not in out  # keys only hashed
    records = story["records"]
    assert [(r["generation"], r["state"], r["key_hash"]) for r in records] == [
        (0, "completed", key_hash(base)),
        (1, "completed", key_hash(gen1)),
    ]
    assert records[0]["attempts"] == 1 and records[0]["outcome_status"] in ("approved", "declined", "review")
    assert records[0]["provider_reference"] and records[0]["created_at"] and records[0]["updated_at"]
    assert records[1]["provider_reference"] == "ref-gen1"
    assert [c["source"] for c in story["conflicts"]] == [f"{topic}/2@{positions[1][1]}"]
    (letter,) = story["dead_letters"]
    assert letter["topic"] == f"{topic}.dlq" and isinstance(letter["offset"], int)
    assert letter["reason"] == "idempotency_conflict"
    assert letter["original"] == f"{topic}/2@{positions[1][1]}"
    (result,) = story["results"]
    assert result["topic"] == f"{topic}.results" and isinstance(result["partition"], int)
    assert result["status"] == records[0]["outcome_status"] and result["key_hash"] == key_hash(base)

    # The text form names the same positions.
    code, _, out, err = await cli("show", good.message_id, "--operation", "aml_screening")
    assert code == 0, err
    assert f"{topic}.dlq/{letter['partition']}@{letter['offset']}" in out
    assert f"{topic}.results/{result['partition']}@{result['offset']}" in out
    assert "gen 1" in out and SECRET_NAME not in out

    # A dead letter without headers, matched by its value's message_id; no record.
    code, story, out, err = await cli("show", orphan_id, "--json")
    assert code == 0, err
    assert story is not None and story["records"] == [] and story["results"] == []
    assert [d["reason"] for d in story["dead_letters"]] == ["unknown_operation"]
    assert story["dead_letters"][0]["original"] == f"{topic}/2@{positions[2][1]}"
    assert SECRET_NAME not in out

    # Unknown IDs: "not found", exit 1.
    code, _, out, err = await cli("show", "msg-never-sent")
    assert code == 1, err
    assert "not found" in out
    code, _, _, err = await cli("show", good.message_id, "--operation", "nope")
    assert code == 2 and "unknown operation" in err
