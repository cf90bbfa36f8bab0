"""The replay tool (``idv-consumer replay`` / ``idv-consumer dlq``) as a real process, on the real broker,
with the sandbox provider over HTTP: one test per mode, plus the safety rules (retention, live group)."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from consumer.keys import idempotency_key
from consumer.store import State, open_store
from consumer.tools.dlq import strip_dead_letter
from producer.envelope import Envelope, encode
from tests.conftest import ROOT
from tests.consumer.conftest import (
    Sandbox,
    claim_for,
    committed_offsets,
    daemon_env,
    end_offsets,
    keys_for,
    publish_raw,
    read_all,
)
from tests.consumer.test_exactly_once import make_envelopes, run_until_committed, settings_for
from tests.consumer.test_fetch_unreadable import kcat_unreadable
from tests.ledger import assert_ledger_exactly_once

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


class Cli:
    """Runs ``python -m consumer ...`` with the environment of one deployment."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd

    async def __call__(
        self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any] | None, str, str]:
        # cwd is the test's directory (for relative paths like the default audit file); the code under
        # test is this checkout's, whatever else is installed.
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")]))
        with anyio.fail_after(90):  # a hung tool fails the test (and is killed) instead of hanging it
            result = await anyio.run_process(
                [sys.executable, "-m", "consumer", *args],
                env={**self.env, "PYTHONPATH": pythonpath, **(env or {})},
                input=input,
                check=False,
                cwd=self.cwd,
            )
        out = result.stdout.decode()
        err = result.stderr.decode()
        summary = None
        if "--json" in args and out.strip():
            summary = orjson.loads(out.strip().splitlines()[-1])
        return result.returncode, summary, out, err


def records_of(envs: list[Envelope]) -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    return [(e.key, encode(e), e.headers()) for e in envs]


async def process_live(
    kafka_bootstrap: str, topic: str, sqlite_url: str, sb: Sandbox, envs: list[Envelope], **publish: Any
) -> tuple[str, Any]:
    """Publish ``envs`` and run a live daemon (a fresh ``live-`` group) until it committed them all.

    Returns the group and what :func:`publish_raw` returned (the records' positions).
    """
    positions = await publish_raw(kafka_bootstrap, topic, records_of(envs), **publish)
    group = "live-" + uuid.uuid4().hex[:6]
    await run_until_committed(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url))
    return group, positions


def make_cli(
    kafka_bootstrap: str, topic: str, group: str, sqlite_url: str, url: str, tmp_path: Path, **extra: Any
) -> Cli:
    env = daemon_env(kafka_bootstrap, topic, group, sqlite_url, url, breaker_min_calls=1000, **extra)
    return Cli(env, tmp_path)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def store_counts(url: str) -> dict[str, int]:
    async with open_store(url) as store:
        return await store.counts()


def effects_for(sb: Sandbox, keys: set[str]) -> dict[str, int]:
    effects = sb.side_effects()
    return {k: effects.get(k, 0) for k in keys}


async def test_offset_range_replays_exactly_that_range(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    p0 = make_envelopes(12, seed=11)
    p1 = make_envelopes(6, seed=12)
    await publish_raw(kafka_bootstrap, topic, records_of(p0), partition=0)
    await publish_raw(kafka_bootstrap, topic, records_of(p1), partition=1)
    cli = make_cli(kafka_bootstrap, topic, "live-" + uuid.uuid4().hex[:6], sqlite_url, sb.url, tmp_path)

    code, summary, _, err = await cli(
        "replay", "--partition", "0", "--from-offset", "5", "--to-offset", "9", "--json"
    )
    assert code == 0, err
    assert summary is not None
    assert summary["counts"] == {"completed": 5} and summary["planned"] == 5
    effects = sb.side_effects()
    assert {k for k, v in effects.items() if v} == keys_for(p0[5:10])

    # Per-partition ranges, paired in order; a range reaching past the end stops at the end.
    code, summary, _, err = await cli(
        "replay",
        "--partition", "0", "--partition", "1",
        "--from-offset", "0", "--from-offset", "4",
        "--to-offset", "1", "--to-offset", "99",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"completed": 4}
    assert any("past the end" in note for note in summary["notes"])
    sent = keys_for(p0[5:10] + p0[0:2] + p1[4:6])
    effects = sb.side_effects()
    assert {k for k, v in effects.items() if v} == sent
    assert all(effects[k] == 1 for k in sent)

    # Mismatched pairing is refused before anything is read.
    code, _, _, err = await cli("replay", "--partition", "0", "--partition", "1", "--from-offset", "1",
                                "--from-offset", "2", "--from-offset", "3")  # fmt: skip
    assert code == 2 and "once per --partition" in err


async def test_time_range_replays_messages_between_since_and_until(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    before, during, after = make_envelopes(5, seed=21), make_envelopes(7, seed=22), make_envelopes(4, seed=23)
    await publish_raw(kafka_bootstrap, topic, records_of(before))
    await anyio.sleep(0.3)
    since = time.time()
    await anyio.sleep(0.3)
    await publish_raw(kafka_bootstrap, topic, records_of(during))
    await anyio.sleep(0.3)
    until = time.time()
    await anyio.sleep(0.3)
    await publish_raw(kafka_bootstrap, topic, records_of(after))
    cli = make_cli(kafka_bootstrap, topic, "live-" + uuid.uuid4().hex[:6], sqlite_url, sb.url, tmp_path)

    code, summary, _, err = await cli("replay", "--since", iso(since), "--until", iso(until), "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"completed": 7}
    effects = sb.side_effects()
    assert {k for k, v in effects.items() if v} == keys_for(during)


async def test_completed_keys_are_not_sent_again(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    unique = make_envelopes(40, seed=31)
    group, _ = await process_live(kafka_bootstrap, topic, sqlite_url, sb, unique)
    ledger_before = sb.ledger()["keys"]
    results_before = await end_offsets(kafka_bootstrap, f"{topic}.results")

    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path)
    code, summary, out, err = await cli("replay", "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"duplicate (not sent)": 40}
    # Not even an attempt reached the provider: the store answered every one.
    ledger_after = sb.ledger()["keys"]
    for key in keys_for(unique):
        assert ledger_after[key]["side_effects"] == 1
        assert len(ledger_after[key]["attempts"]) == len(ledger_before[key]["attempts"])
    # Without --emit-results, duplicates publish nothing.
    assert await end_offsets(kafka_bootstrap, f"{topic}.results") == results_before

    code, _, out, err = await cli("replay")
    assert code == 0 and "duplicate (not sent)" in out and "exit code 0" in out, err


async def test_emit_results_republishes_identical_result_events(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    unique = make_envelopes(15, seed=41)
    group, _ = await process_live(kafka_bootstrap, topic, sqlite_url, sb, unique)
    first = await read_all(kafka_bootstrap, f"{topic}.results")
    assert len(first) == 15

    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path)
    code, summary, _, err = await cli("replay", "--emit-results", "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"duplicate (not sent)": 15}
    events = await read_all(kafka_bootstrap, f"{topic}.results")
    assert len(events) == 30
    by_id: dict[str, list[bytes]] = {}
    for ev in events:
        by_id.setdefault(orjson.loads(ev.value)["message_id"], []).append(ev.value)
        assert ev.key == orjson.loads(ev.value)["subject_id"].encode()
    assert set(by_id) == {e.message_id for e in unique}
    assert all(len(v) == 2 and v[0] == v[1] for v in by_id.values())  # byte-identical re-emission
    assert sum(sb.side_effects().values()) == 15


async def _dead_letter_while_failing(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str
) -> tuple[str, list[Envelope], list[tuple[int, int]]]:
    """Three requests meet a provider answering 500 to everything: all three end in the DLQ as
    retries_exhausted (plus one invalid message as invalid_json)."""
    doomed = make_envelopes(3, seed=51)
    sb.faults(error_rate=1.0)
    records = records_of(doomed)
    records[0] = (records[0][0], records[0][1], [*records[0][2], ("trace-id", b"t-0")])
    records.append((b"bad", b"{not json", [("trace-id", b"t-bad")]))
    positions = await publish_raw(kafka_bootstrap, topic, records, partition=4)
    group = "live-" + uuid.uuid4().hex[:6]
    await run_until_committed(
        settings_for(
            kafka_bootstrap, topic, group, sqlite_url, sb.url, provider_max_attempts=2, breaker_min_calls=1000
        )
    )
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    reasons = sorted(dict(m.headers)["idv-dlq-reason"].decode() for m in letters)
    assert reasons == ["invalid_json", "retries_exhausted", "retries_exhausted", "retries_exhausted"]
    assert sum(sb.side_effects().values()) == 0
    return group, doomed, positions


async def dead_lettered_then_fixed(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path, **cli_env: Any
) -> tuple[str, list[Envelope], Cli]:
    """:func:`_dead_letter_while_failing`, then the provider is healthy again.

    Returns the group, the dead-lettered envelopes and a CLI for the same settings (plus ``cli_env``).
    """
    group, doomed, _ = await _dead_letter_while_failing(kafka_bootstrap, topic, sb, sqlite_url)
    sb.faults(error_rate=0.0)
    return group, doomed, make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path, **cli_env)


async def test_dlq_list_and_direct_redrive_after_the_fault_is_fixed(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    group, doomed, positions = await _dead_letter_while_failing(kafka_bootstrap, topic, sb, sqlite_url)
    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path, provider_max_attempts=2)

    code, _, out, err = await cli("dlq", "list")
    assert code == 0, err
    assert out.count("retries_exhausted") == 3 and out.count("invalid_json") == 1
    assert f"{topic}/4@0" in out and "4 shown of 4" in out
    assert "Test Person" not in out and "not json" not in out  # never payloads
    code, _, out, _ = await cli("dlq", "list", "--reason", "invalid_json")
    assert "1 shown of 1" in out and "retries_exhausted" not in out

    # Still failing: each goes back to the DLQ with the same reason, the first failure time kept, the
    # attempts counted on, the original position and headers unchanged.
    first_letters = {
        dict(m.headers)["idv-dlq-original-offset"]: m for m in await read_all(kafka_bootstrap, f"{topic}.dlq")
    }
    code, summary, _, err = await cli("dlq", "redrive", "--reason", "retries_exhausted", "--direct", "--json")
    assert code == 1, err
    assert summary is not None and summary["counts"] == {"set aside (retries exhausted)": 3}
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    assert len(letters) == 7
    newest = {}
    for m in sorted(letters, key=lambda m: m.timestamp):
        newest[dict(m.headers)["idv-dlq-original-offset"]] = m
    for off in (b"0", b"1", b"2"):
        old, new = first_letters[off], newest[off]
        assert new is not old and new.value == old.value and new.key == old.key
        oh, nh = dict(old.headers), dict(new.headers)
        assert nh["idv-dlq-reason"] == b"retries_exhausted"
        assert nh["idv-dlq-first-failure-at"] == oh["idv-dlq-first-failure-at"]
        assert int(nh["idv-dlq-attempts"]) == int(oh["idv-dlq-attempts"]) + 2
        assert nh["idv-dlq-original-topic"] == topic.encode()
        assert nh["idv-dlq-original-partition"] == b"4"
        strip = [(k, v) for k, v in new.headers if not k.startswith("idv-dlq-")]
        assert strip == [(k, v) for k, v in old.headers if not k.startswith("idv-dlq-")]
    assert dict(newest[b"0"].headers)["trace-id"] == b"t-0"

    # Fixed: the redrive completes each exactly once and publishes its result.
    sb.faults(error_rate=0.0)
    code, summary, _, err = await cli("dlq", "redrive", "--reason", "retries_exhausted", "--direct", "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"completed": 3}
    assert_ledger_exactly_once(sb.ledger(), keys_for(doomed))  # and nothing under any other key
    async with open_store(sqlite_url) as store:
        for env in doomed:
            record = await store.get(idempotency_key("idv", env.operation, env.message_id))
            assert record is not None and record.state is State.COMPLETED
    results = await read_all(kafka_bootstrap, f"{topic}.results")
    assert {orjson.loads(r.value)["message_id"] for r in results} == {e.message_id for e in doomed}

    # A second redrive finds them done: nothing sent again.
    code, summary, _, err = await cli("dlq", "redrive", "--reason", "retries_exhausted", "--direct", "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"duplicate (not sent)": 3}
    assert sum(sb.side_effects().values()) == 3

    # An invalid message redriven as it is fails again (exit 1), back in the DLQ under its reason.
    code, summary, _, _ = await cli("dlq", "redrive", "--reason", "invalid_json", "--direct", "--json")
    assert code == 1 and summary is not None
    assert summary["counts"] == {"dead-lettered again": 1}
    assert summary["invalid_reasons"] == {"invalid_json": 1}
    assert positions[3] == (4, 3)


async def test_dlq_redrive_republish_goes_back_through_the_daemon(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    group, doomed, cli = await dead_lettered_then_fixed(kafka_bootstrap, topic, sb, sqlite_url, tmp_path)
    ends_before = await end_offsets(kafka_bootstrap, topic)

    code, summary, _, err = await cli(
        "dlq", "redrive", "--reason", "retries_exhausted", "--republish", "--json"
    )
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"republished": 3}
    ends = await end_offsets(kafka_bootstrap, topic)
    assert sum(ends.values()) == sum(ends_before.values()) + 3
    messages = [m for m in await read_all(kafka_bootstrap, topic) if m.offset >= ends_before[m.partition]]
    assert len(messages) == 3
    originals = {e.message_id: e for e in doomed}
    for msg in messages:
        assert not any(k.startswith("idv-dlq-") for k, _ in msg.headers)
        mid = dict(msg.headers)["idv-message-id"].decode()
        assert msg.value == encode(originals[mid]) or orjson.loads(msg.value)["message_id"] == mid
        assert msg.key == originals[mid].key
    assert sum(sb.side_effects().values()) == 0  # republishing alone calls nothing

    # The live daemon (same group) picks them up: one side effect each.
    await run_until_committed(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url))
    assert_ledger_exactly_once(sb.ledger(), keys_for(doomed))  # and nothing under any other key


async def test_dry_run_classifies_and_writes_nothing(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    done = make_envelopes(10, seed=61)
    group, _ = await process_live(kafka_bootstrap, topic, sqlite_url, sb, done)
    fresh = make_envelopes(4, seed=62)
    busy = make_envelopes(1, seed=63)[0]
    clash = Envelope(
        message_id=done[0].message_id,
        operation=done[0].operation,
        subject_id=done[0].subject_id,
        request={**done[0].request, "vendor_data": "changed"},
    )
    async with open_store(sqlite_url) as store:
        busy_key = idempotency_key("idv", busy.operation, busy.message_id)
        await claim_for(store, busy_key, busy, "someone-else", 600)
    await publish_raw(
        kafka_bootstrap,
        topic,
        [*records_of([*fresh, busy, clash]), (b"x", b"\xff\xfe garbage", []), (b"x", b"[1]", [])],
    )
    counts_before = await store_counts(sqlite_url)
    ledger_before = sb.ledger()
    sinks_before = [await end_offsets(kafka_bootstrap, f"{topic}{s}") for s in (".dlq", ".results")]

    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path)
    no_key = {"IDV_PROVIDER_API_KEY": ""}  # a dry run needs no provider at all
    code, summary, _, err = await cli("replay", "--dry-run", "--json", env=no_key)
    assert code == 0, err
    assert summary is not None
    assert summary["counts"] == {"completed": 10, "new": 4, "in progress": 1, "conflict": 1, "invalid": 2}
    assert summary["invalid_reasons"] == {"invalid_encoding": 1, "invalid_envelope": 1}
    code, _, out, _ = await cli("replay", "--dry-run", env=no_key)
    assert code == 0 and "new" in out and "in progress" in out

    assert await store_counts(sqlite_url) == counts_before
    assert sb.ledger() == ledger_before
    assert [await end_offsets(kafka_bootstrap, f"{topic}{s}") for s in (".dlq", ".results")] == sinks_before

    # On a store that does not exist yet, everything valid is new, and the file is not created.
    missing = tmp_path / "nowhere" / "dedupe.db"
    code, summary, _, err = await cli(
        "replay", "--dry-run", "--json", env={**no_key, "IDV_STORE_URL": f"sqlite:///{missing}"}
    )
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"new": 16, "invalid": 2}
    assert not missing.exists()


async def test_reverify_runs_again_under_a_new_generation_with_an_audit_line(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    unique = make_envelopes(6, seed=71)
    group, positions = await process_live(kafka_bootstrap, topic, sqlite_url, sb, unique, partition=5)
    target = unique[2]
    _, offset = positions[2]
    base = idempotency_key("idv", target.operation, target.message_id)
    gen1 = idempotency_key("idv", target.operation, target.message_id, generation=1)
    gen2 = idempotency_key("idv", target.operation, target.message_id, generation=2)
    audit = tmp_path / "audit.jsonl"
    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path)
    cli.env["USER"] = "alice"
    where = ["--partition", "5", "--from-offset", str(offset), "--to-offset", str(offset)]

    # A reason is required; without --yes the operator must confirm, and "no" sends nothing.
    code, _, _, err = await cli("replay", "--reverify", *where, "--yes")
    assert code == 2 and "--reason" in err
    code, _, _, err = await cli(
        "replay", "--reverify", "--reason", "dispute", *where, "--audit-file", str(audit), input=b"n\n"
    )
    assert code == 2 and "not confirmed" in err, err
    assert gen1 not in sb.side_effects() and not audit.exists()

    code, summary, _, err = await cli(
        "replay", "--reverify", "--reason", "customer dispute #42", *where, "--audit-file", str(audit),
        "--json", input=b"y\n",
    )  # fmt: skip
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"reverified": 1}
    effects = sb.side_effects()
    assert effects[base] == 1 and effects[gen1] == 1
    assert sum(effects.values()) == 7  # six originals plus one deliberate re-verification
    (line,) = audit.read_text().splitlines()
    entry = orjson.loads(line)
    assert entry["operator"] == "alice" and entry["reason"] == "customer dispute #42"
    assert entry["message_id"] == target.message_id
    assert entry["generation"] == 1 and entry["key"] == gen1
    assert datetime.fromisoformat(entry["time"]).tzinfo is not None
    async with open_store(sqlite_url) as store:
        record = await store.get(gen1)
        assert record is not None and record.state is State.COMPLETED
        assert record.last_error is None  # the reason lives in the audit file, not in the record
        original = await store.get(base)
        assert original is not None and original.state is State.COMPLETED

    # Again: generation 2. Messages that never completed are skipped, not sent.
    fresh = make_envelopes(1, seed=72)
    (pos,) = await publish_raw(kafka_bootstrap, topic, records_of(fresh), partition=5)
    code, summary, _, err = await cli(
        "replay", "--reverify", "--reason", "second look", "--partition", "5",
        "--from-offset", str(offset), "--to-offset", str(pos[1]), "--yes", "--audit-file", str(audit),
        "--json",
    )  # fmt: skip
    assert code == 0, err
    assert summary is not None
    assert summary["counts"] == {"reverified": 4, "not completed (skipped)": 1}
    effects = sb.side_effects()
    assert effects[gen2] == 1 and effects[gen1] == 1 and effects[base] == 1
    assert idempotency_key("idv", fresh[0].operation, fresh[0].message_id) not in effects
    lines = [orjson.loads(x) for x in audit.read_text().splitlines()]
    assert len(lines) == 5 and {x["generation"] for x in lines} == {1, 2}


async def test_refuses_messages_older_than_the_dedupe_retention_unless_forced(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    old = make_envelopes(3, seed=81)
    await publish_raw(kafka_bootstrap, topic, records_of(old), partition=6)
    cli = make_cli(
        kafka_bootstrap, topic, "live-" + uuid.uuid4().hex[:6], sqlite_url, sb.url, tmp_path,
        retention_s=12, lease_s=2, provider_timeout_s=1,
    )  # fmt: skip
    # 12 s: the recent messages must stay inside retention through two CLI runs on a loaded machine.
    await anyio.sleep(12.5)
    recent = make_envelopes(2, seed=82)
    await publish_raw(kafka_bootstrap, topic, records_of(recent), partition=6)

    code, _, _, err = await cli("replay", "--partition", "6")
    assert code == 2
    assert "older than the dedupe retention" in err and "offsets 0..2" in err and "--force" in err
    assert sum(sb.side_effects().values()) == 0

    # The recent part alone is fine; a dry run reports instead of refusing.
    code, summary, _, err = await cli("replay", "--partition", "6", "--from-offset", "3", "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"completed": 2}
    code, summary, _, err = await cli("replay", "--partition", "6", "--dry-run", "--json")
    assert code == 0 and summary is not None
    assert any("older than the dedupe retention" in n for n in summary["notes"])

    code, summary, _, err = await cli("replay", "--partition", "6", "--to-offset", "2", "--force", "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"completed": 3}
    assert any("--force" in n for n in summary["notes"])
    assert_ledger_exactly_once(sb.ledger(), keys_for(old + recent))  # and nothing under any other key


async def test_replay_never_moves_the_live_groups_offsets(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    first = make_envelopes(20, seed=91)
    group, _ = await process_live(kafka_bootstrap, topic, sqlite_url, sb, first)
    committed = await committed_offsets(kafka_bootstrap, group, topic)
    assert sum(committed.values()) == 20
    later = make_envelopes(8, seed=92)
    await publish_raw(kafka_bootstrap, topic, records_of(later))
    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path)

    code, _, _, err = await cli("replay", "--group", group)
    assert code == 2 and "live consumer group" in err

    own = "replay-" + uuid.uuid4().hex[:6]
    code, summary, _, err = await cli("replay", "--group", own, "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"completed": 8, "duplicate (not sent)": 20}
    assert await committed_offsets(kafka_bootstrap, group, topic) == committed
    assert await committed_offsets(kafka_bootstrap, own, topic) == await end_offsets(kafka_bootstrap, topic)

    code, _, _, err = await cli("replay", "--dry-run")
    assert code == 0, err
    assert await committed_offsets(kafka_bootstrap, group, topic) == committed


async def test_rejected_api_key_stops_the_replay_with_exit_3(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    unique = make_envelopes(5, seed=101)
    await publish_raw(kafka_bootstrap, topic, records_of(unique))
    cli = make_cli(kafka_bootstrap, topic, "live-" + uuid.uuid4().hex[:6], sqlite_url, sb.url, tmp_path)
    code, summary, _, err = await cli("replay", "--json", env={"IDV_PROVIDER_API_KEY": "wrong-key-77"})
    assert code == 3, err
    assert summary is not None and summary["fatal"] and "API key" in summary["fatal"]
    assert "wrong-key-77" not in err
    assert sum(sb.side_effects().values()) == 0


def test_strip_dead_letter_restores_the_original_record() -> None:
    from aiokafka.structs import ConsumerRecord

    from consumer.tools.dlq import entry_of

    headers = [
        ("trace", b"1"),
        ("idv-dlq-reason", b"invalid_json"),
        ("idv-dlq-original-topic", b"idv.requests"),
        ("idv-dlq-original-partition", b"3"),
        ("idv-dlq-original-offset", b"17"),
        ("idv-dlq-original-timestamp", b"1700000000000"),
        ("idv-dlq-attempts", b"0"),
        ("trace", b"2"),
    ]
    msg = ConsumerRecord("idv.requests.dlq", 0, 5, 1800000000000, 0, b"k", b"v", None, 1, 1, headers)
    entry = entry_of(msg)
    original = strip_dead_letter(msg, entry)
    assert (original.topic, original.partition, original.offset) == ("idv.requests", 3, 17)
    assert original.timestamp == 1700000000000
    assert original.key == b"k" and original.value == b"v"
    assert list(original.headers) == [("trace", b"1"), ("trace", b"2")]


async def test_interrupt_stops_cleanly_keeps_keys_of_calls_in_flight_and_exits_1(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    sb.faults(latency_ms=300)
    unique = make_envelopes(60, subjects=60, seed=111)
    await publish_raw(kafka_bootstrap, topic, records_of(unique))
    cli = make_cli(kafka_bootstrap, topic, "live-" + uuid.uuid4().hex[:6], sqlite_url, sb.url, tmp_path)
    env = {**cli.env, "PYTHONPATH": str(ROOT)}
    async with await anyio.open_process(
        [sys.executable, "-m", "consumer", "replay", "--concurrency", "4", "--json"], env=env, cwd=tmp_path
    ) as proc:
        with anyio.fail_after(60):
            while sum(sb.side_effects().values()) < 4:
                await anyio.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            code = await proc.wait()
        assert proc.stdout is not None
        out = (await proc.stdout.receive()).decode()
    sb.faults(latency_ms=0)
    assert code == 1
    summary = orjson.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] and summary["counts"]["not reached"] > 0
    await anyio.sleep(0.6)  # requests already at the sandbox finish there (its 300-ms latency comes first)
    effects = sb.side_effects()
    async with open_store(sqlite_url) as store:
        counts = await store.counts()
        records = {k: await store.get(k) for k in keys_for(unique)}
    # Calls cancelled while their request was at the provider keep the key until its lease runs out
    # (another owner must not call while the provider may still be working): never released early. A key
    # claimed but not yet sent when the interrupt came is released (how many depends on the timing).
    states = {k: (r.state if r is not None else None) for k, r in records.items()}
    reached_and_released = [k for k, state in states.items() if state is State.RELEASED and effects.get(k)]
    assert reached_and_released == [], counts
    # A request the provider acted on without its answer recorded: its key is still held.
    unfinished = {k: states.get(k) for k in effects if states.get(k) is not State.COMPLETED}
    assert all(state is State.IN_PROGRESS for state in unfinished.values()), (counts, unfinished)
    assert counts.get("in_progress", 0) <= 4, counts  # at most the calls running (--concurrency 4)
    assert all(v == 1 for v in effects.values())


async def test_a_record_the_client_cannot_read_is_dead_lettered_and_the_replay_goes_on(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    """A record aiokafka cannot read (a non-UTF-8 header key, written with kcat) inside the range: the tool
    must not die with a traceback (it did), nor lose the readable records around it; the record is
    dead-lettered as ``undecodable_record``, which counts as handled (like any invalid message)."""
    envs = make_envelopes(6, seed=71)
    await publish_raw(kafka_bootstrap, topic, records_of(envs[:3]), partition=0)
    kcat_unreadable(kafka_bootstrap, topic, 0)
    await publish_raw(kafka_bootstrap, topic, records_of(envs[3:]), partition=0)
    cli = make_cli(kafka_bootstrap, topic, "live-" + uuid.uuid4().hex[:6], sqlite_url, sb.url, tmp_path)

    code, summary, _, err = await cli("replay", "--partition", "0", "--dry-run", "--json")
    assert code == 0 and "Traceback" not in err, err
    assert summary is not None and summary["counts"] == {"new": 6, "invalid": 1}
    assert summary["invalid_reasons"] == {"undecodable_record": 1}

    code, summary, _, err = await cli("replay", "--partition", "0", "--json")
    assert code == 0 and "Traceback" not in err, err
    assert summary is not None and summary["counts"] == {"completed": 6, "invalid": 1}
    assert effects_for(sb, keys_for(envs)) == dict.fromkeys(keys_for(envs), 1)
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    assert [
        (dict(m.headers)["idv-dlq-reason"], dict(m.headers)["idv-dlq-original-offset"]) for m in letters
    ] == [(b"undecodable_record", b"3")]
