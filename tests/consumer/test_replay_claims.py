"""Claims of docs/replay.md and docs/dead-letters.md that had no test, each against the real broker, the
replay tool as a real process and the sandbox provider over HTTP.

Each test checks the sentence it is named after, and the ledger strictly (no request under a key the
test did not expect), so a replay or redrive that sent a new key would fail here too.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import anyio
import orjson
import pytest

from consumer.keys import idempotency_key
from consumer.store import Outcome, State, open_store
from producer.envelope import Envelope
from tests.conftest import ROOT
from tests.consumer.conftest import Sandbox, claim_for, end_offsets, keys_for, publish_raw, read_all
from tests.consumer.test_exactly_once import make_envelopes, run_until_committed, settings_for
from tests.consumer.test_replay import (
    _dead_letter_while_failing,
    dead_lettered_then_fixed,
    iso,
    make_cli,
    process_live,
    records_of,
    store_counts,
)
from tests.ledger import assert_ledger_exactly_once

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def _key(env: Envelope, generation: int = 0) -> str:
    return idempotency_key("idv", env.operation, env.message_id, generation=generation)


async def _state(url: str, key: str) -> tuple[State | None, int, str | None]:
    async with open_store(url) as store:
        record = await store.get(key)
    return (None, 0, None) if record is None else (record.state, record.attempts, record.last_error)


# -- re-verification -----------------------------------------------------------------------------------


async def test_reverify_reuses_an_unfinished_generation(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    """An unfinished highest generation is reused, not skipped: after failures where the provider had in
    fact acted (no answer came back, so the key is kept until its lease expires; the next call is answered
    from the provider's stored response, no second side effect), and after a crash (taken over once its
    lease ran out)."""
    unique = make_envelopes(2, seed=201)
    group, positions = await process_live(kafka_bootstrap, topic, sqlite_url, sb, unique, partition=1)
    acted, crashed = unique
    audit = tmp_path / "audit.jsonl"
    cli = make_cli(
        kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path,
        provider_max_attempts=2, lease_s=2, provider_timeout_s=1,
    )  # fmt: skip
    first, last = positions[0][1], positions[1][1]
    where = ["--partition", "1", "--from-offset", str(first), "--to-offset", str(first)]
    args = ["replay", "--reverify", "--reason", "dispute", "--yes", "--audit-file", str(audit), "--json"]

    # Generation 1 of `acted`: the provider performs it, but every answer is lost on the way back.
    sb.faults(drop_after_effect_rate=1.0)
    code, summary, _, err = await cli(*args, *where)
    assert code == 1, err
    assert summary is not None and summary["counts"] == {"set aside (retries exhausted)": 1}
    # The last request got no answer: it may be at the provider, so its key is not released (it stays
    # IN_PROGRESS until the lease runs out, docs/guarantees.md "One live owner per key").
    assert (await _state(sqlite_url, _key(acted, 1)))[0] is State.IN_PROGRESS
    assert sb.side_effects()[_key(acted, 1)] == 1
    sb.faults(drop_after_effect_rate=0.0)

    # Generation 1 of `crashed`: claimed by a run that died before it finished (its lease runs out).
    async with open_store(sqlite_url) as store:
        await claim_for(store, _key(crashed, 1), crashed, "replay:dead", 1)
    await anyio.sleep(1.1)  # the dead run's lease is over (a live one would be waited for)

    # Re-running the same command resumes both under generation 1.
    code, summary, _, err = await cli(
        *args, "--partition", "1", "--from-offset", str(first), "--to-offset", str(last)
    )
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"reverified": 2}
    for env in unique:
        state, attempts, _ = await _state(sqlite_url, _key(env, 1))
        assert state is State.COMPLETED and attempts == 2, (env.message_id, state, attempts)
    view = assert_ledger_exactly_once(sb.ledger(), keys_for(unique) | {_key(acted, 1), _key(crashed, 1)})
    assert view.replays[_key(acted, 1)] >= 1  # answered from the provider's stored response
    assert view.replays[_key(crashed, 1)] == 0 and view.attempts[_key(crashed, 1)] == 1
    generations = [orjson.loads(line)["generation"] for line in audit.read_text().splitlines()]
    assert generations == [1, 1, 1]  # the failed attempt, then both resumed: never generation 2


async def test_an_id_listed_twice_is_reverified_once(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    twice, other = make_envelopes(2, seed=211)
    group, positions = await process_live(
        kafka_bootstrap, topic, sqlite_url, sb, [twice, other, twice], partition=2
    )
    audit = tmp_path / "audit.jsonl"
    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path)
    code, summary, _, err = await cli(
        "replay", "--reverify", "--reason", "incident", "--yes", "--audit-file", str(audit), "--json",
        "--partition", "2", "--from-offset", str(positions[0][1]), "--to-offset", str(positions[2][1]),
    )  # fmt: skip
    assert code == 0, err
    assert summary is not None
    assert summary["counts"] == {"reverified": 2, "duplicate in range (skipped)": 1}
    assert_ledger_exactly_once(sb.ledger(), {_key(twice), _key(other), _key(twice, 1), _key(other, 1)})
    assert len(audit.read_text().splitlines()) == 2


# -- replay --------------------------------------------------------------------------------------------


async def test_no_dead_letters_skips_writing_invalid_messages_again(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    good = make_envelopes(2, seed=221)
    await publish_raw(kafka_bootstrap, topic, [*records_of(good), (b"x", b"{not json", [])], partition=3)
    group = "live-" + uuid.uuid4().hex[:6]
    await run_until_committed(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url))
    assert len(await read_all(kafka_bootstrap, f"{topic}.dlq")) == 1
    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path)

    code, summary, _, err = await cli("replay", "--no-dead-letters", "--json")
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"duplicate (not sent)": 2, "invalid": 1}
    assert summary["invalid_reasons"] == {"invalid_json": 1}
    assert len(await read_all(kafka_bootstrap, f"{topic}.dlq")) == 1  # not written again

    code, summary, _, err = await cli("replay", "--json")
    assert code == 0, err
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    assert len(letters) == 2 and letters[1].value == b"{not json"  # without the flag it is
    assert_ledger_exactly_once(sb.ledger(), keys_for(good))


async def test_replay_waits_for_a_live_lease_then_skips(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    """A message in progress under someone else's live lease is neither called nor taken over: the replay
    waits, and when the holder records the outcome the replay skips it as a duplicate."""
    busy, fresh = make_envelopes(2, seed=231)
    await publish_raw(kafka_bootstrap, topic, records_of([busy, fresh]), partition=4)
    async with open_store(sqlite_url) as store:
        claim = await claim_for(store, _key(busy), busy, "daemon-elsewhere", 60)
    assert claim.record.owner == "daemon-elsewhere"
    cli = make_cli(kafka_bootstrap, topic, "live-" + uuid.uuid4().hex[:6], sqlite_url, sb.url, tmp_path)
    env = {**cli.env, "PYTHONPATH": str(ROOT)}
    async with await anyio.open_process(
        [sys.executable, "-m", "consumer", "replay", "--partition", "4", "--json", "--no-progress"],
        env=env,
        cwd=tmp_path,
    ) as proc:
        with anyio.fail_after(60):
            # The replay has reached the range (the other message is done) while `busy` is held.
            while _key(fresh) not in sb.side_effects():
                await anyio.sleep(0.05)
            await anyio.sleep(1.0)  # it keeps waiting on the live lease...
            assert proc.returncode is None, "the replay did not wait for the live lease"
            assert (await _state(sqlite_url, _key(busy)))[:2] == (State.IN_PROGRESS, 1)
            async with open_store(sqlite_url) as store:  # ...until the holder records the outcome
                await store.complete(_key(busy), "daemon-elsewhere", Outcome("approved", 200, "ref-x"))
            code = await proc.wait()
        assert proc.stdout is not None
        out = (await proc.stdout.receive()).decode()
    assert code == 0
    summary = orjson.loads(out.strip().splitlines()[-1])
    assert summary["counts"] == {"completed": 1, "duplicate (not sent)": 1}
    assert _key(busy) not in sb.ledger()["keys"]  # never sent, never taken over
    assert_ledger_exactly_once(sb.ledger(), {_key(fresh)})


# -- dead letters --------------------------------------------------------------------------------------


async def test_dlq_list_selects_by_dead_letter_time_with_since_and_until(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    group = "live-" + uuid.uuid4().hex[:6]
    settings = settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url)
    await publish_raw(kafka_bootstrap, topic, [(b"a", b"{early", [])], partition=0)
    await run_until_committed(settings)
    await anyio.sleep(1.1)
    between = time.time()
    await anyio.sleep(1.1)
    await publish_raw(kafka_bootstrap, topic, [(b"b", b"[1]", [])], partition=0)
    await run_until_committed(settings)
    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path)

    code, _, out, err = await cli("dlq", "list")
    assert code == 0 and "2 shown of 2" in out, err
    code, _, out, err = await cli("dlq", "list", "--since", iso(between))
    assert code == 0, err
    assert "1 shown of 1" in out and "invalid_envelope" in out and "invalid_json" not in out
    code, _, out, err = await cli("dlq", "list", "--until", iso(between))
    assert code == 0, err
    assert "1 shown of 1" in out and "invalid_json" in out and "invalid_envelope" not in out
    code, _, out, _ = await cli("dlq", "list", "--since", iso(between - 3600), "--until", iso(between - 1800))
    assert code == 0 and "0 shown of 0" in out


async def test_redrive_dry_run_classifies_and_writes_nothing(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    group, doomed, cli = await dead_lettered_then_fixed(kafka_bootstrap, topic, sb, sqlite_url, tmp_path)
    before = (
        await store_counts(sqlite_url),
        sb.ledger(),
        [await end_offsets(kafka_bootstrap, f"{topic}{s}") for s in ("", ".dlq", ".results")],
    )
    code, summary, _, err = await cli(
        "dlq", "redrive", "--reason", "retries_exhausted", "--direct", "--dry-run", "--json",
        env={"IDV_PROVIDER_API_KEY": ""},
    )  # fmt: skip
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"released (will be retried)": 3}
    after = (
        await store_counts(sqlite_url),
        sb.ledger(),
        [await end_offsets(kafka_bootstrap, f"{topic}{s}") for s in ("", ".dlq", ".results")],
    )
    assert after == before
    for e in doomed:
        assert (await _state(sqlite_url, _key(e)))[0] is State.RELEASED


async def test_redrive_refuses_originals_older_than_the_retention_unless_forced(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    group, doomed, cli = await dead_lettered_then_fixed(
        kafka_bootstrap, topic, sb, sqlite_url, tmp_path, retention_s=4, lease_s=2, provider_timeout_s=1
    )
    async with open_store(sqlite_url) as store:
        records = [await store.get(_key(e)) for e in doomed]
    oldest = min(r.created_at for r in records if r is not None)
    await anyio.sleep(max(0.0, oldest + 4.5 - time.time()))  # the originals are now past the retention
    code, _, _, err = await cli("dlq", "redrive", "--reason", "retries_exhausted", "--direct", "--json")
    assert code == 2, err
    assert "older than the dedupe retention" in err and "--force" in err
    assert sum(sb.side_effects().values()) == 0

    code, summary, _, err = await cli(
        "dlq", "redrive", "--reason", "retries_exhausted", "--direct", "--force", "--json"
    )
    assert code == 0, err
    assert summary is not None and summary["counts"] == {"completed": 3}
    assert_ledger_exactly_once(sb.ledger(), keys_for(doomed))


async def test_redrive_emit_results_republishes_results_of_completed_messages(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    group, doomed, cli = await dead_lettered_then_fixed(kafka_bootstrap, topic, sb, sqlite_url, tmp_path)
    redrive = ["dlq", "redrive", "--reason", "retries_exhausted", "--direct", "--json"]
    code, summary, _, err = await cli(*redrive)
    assert code == 0 and summary is not None and summary["counts"] == {"completed": 3}, err
    first = await read_all(kafka_bootstrap, f"{topic}.results")
    assert len(first) == 3

    code, summary, _, err = await cli(*redrive)  # already completed: no result without the flag
    assert code == 0 and summary is not None and summary["counts"] == {"duplicate (not sent)": 3}, err
    assert len(await read_all(kafka_bootstrap, f"{topic}.results")) == 3

    code, summary, _, err = await cli(*redrive, "--emit-results")
    assert code == 0 and summary is not None and summary["counts"] == {"duplicate (not sent)": 3}, err
    events = await read_all(kafka_bootstrap, f"{topic}.results")
    assert len(events) == 6
    by_id: dict[str, set[bytes]] = {}
    for ev in events:
        by_id.setdefault(orjson.loads(ev.value)["message_id"], set()).add(ev.value)
    assert set(by_id) == {e.message_id for e in doomed}
    assert all(len(v) == 1 for v in by_id.values())  # the re-published events are byte-identical
    assert_ledger_exactly_once(sb.ledger(), keys_for(doomed))


async def test_redrive_exit_codes(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    """0 handled, 1 failed again, 2 refused or misconfigured, 3 the provider rejected the API key."""
    group, doomed, _ = await _dead_letter_while_failing(kafka_bootstrap, topic, sb, sqlite_url)
    cli = make_cli(kafka_bootstrap, topic, group, sqlite_url, sb.url, tmp_path, provider_max_attempts=2)
    redrive = ["dlq", "redrive", "--reason", "retries_exhausted", "--direct", "--json"]

    code, _, _, err = await cli(*redrive)  # the provider still fails
    assert code == 1, err
    code, _, _, err = await cli(*redrive, env={"IDV_DLQ_TOPIC": "none"})
    assert code == 2 and "dead letters are disabled" in err, err
    code, _, _, err = await cli(*redrive, "--group", group)
    assert code == 2 and "live consumer group" in err, err
    code, _, _, err = await cli("dlq", "redrive", "--reason", "retries_exhausted", "--json")
    assert code == 2, err  # neither --direct nor --republish
    sb.faults(error_rate=0.0)
    code, summary, _, err = await cli(*redrive, env={"IDV_PROVIDER_API_KEY": "wrong-key-99"})
    assert code == 3, err
    assert "wrong-key-99" not in err
    assert sum(sb.side_effects().values()) == 0
    code, _, _, err = await cli(*redrive)
    assert code == 0, err
    assert_ledger_exactly_once(sb.ledger(), keys_for(doomed))
