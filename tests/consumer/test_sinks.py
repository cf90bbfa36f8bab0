"""Dead-letter topic, results topic and the circuit breaker, on the real broker with the sandbox."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from pathlib import Path

import anyio
import orjson
import pytest

from consumer.keys import idempotency_key
from producer.envelope import Envelope, encode
from tests.conftest import create_topic, random_topic_name
from tests.consumer.conftest import (
    Sandbox,
    committed_offsets,
    daemon_env,
    keys_for,
    kill_all,
    publish,
    publish_raw,
    read_all,
    read_results,
    run_to_end,
    run_until_killed,
    start_daemon,
    wait_committed_to_end,
    wait_until,
)
from tests.consumer.test_exactly_once import (
    assert_exactly_once,
    make_envelopes,
    publish_new,
    run_until_committed,
    settings_for,
)

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def headers_of(msg: object) -> dict[str, bytes]:
    return dict(msg.headers or ())  # type: ignore[attr-defined]


async def test_results_topic_has_one_event_per_message_and_duplicates_reemit_the_same_content(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, group: str
) -> None:
    unique = make_envelopes(30)
    unique[0] = Envelope(
        message_id="declined-1",
        operation="aml_screening",
        subject_id="s-d",
        request={"full_name": "DECLINE me"},
    )
    unique[1] = Envelope(
        message_id="review-1",
        operation="id_verification",
        subject_id="s-r",
        request={"document_type": "passport", "front_image": "x", "vendor_data": "REVIEW"},
    )
    unique[2] = Envelope(
        message_id="bad-1",
        operation="aml_screening",
        subject_id="s-b",
        request={"full_name": "x", "date_of_birth": 5},
    )
    stream = unique + unique[:5]
    await publish(kafka_bootstrap, topic, stream)
    await run_until_committed(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url))
    events = await read_all(kafka_bootstrap, f"{topic}.results")
    assert len(events) == len(stream)
    by_id: dict[str, list[bytes]] = defaultdict(list)
    for ev in events:
        by_id[orjson.loads(ev.value)["message_id"]].append(ev.value)
        assert ev.key == orjson.loads(ev.value)["subject_id"].encode()  # keyed like the request
    assert set(by_id) == {e.message_id for e in unique}
    for mid, values in by_id.items():
        assert len(set(values)) == 1, f"{mid}: redelivery changed the event content"
    statuses = {mid: orjson.loads(v[0])["status"] for mid, v in by_id.items()}
    assert statuses["declined-1"] == "declined"
    assert statuses["review-1"] == "review"
    first = orjson.loads(by_id[unique[3].message_id][0])
    assert first["idempotency_key"] == idempotency_key("idv", unique[3].operation, unique[3].message_id)
    assert first["provider_reference"]
    raw = b"".join(ev.value for ev in events)
    assert b"full_name" not in raw and b"front_image" not in raw  # no request data in results


async def test_every_dead_letter_reason_with_original_bytes_and_headers(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path, group: str
) -> None:
    good = Envelope(message_id="ok-1", operation="aml_screening", subject_id="k", request={"full_name": "A"})
    conflict = Envelope(
        message_id="ok-1", operation="aml_screening", subject_id="k", request={"full_name": "B"}
    )
    doomed = Envelope(
        message_id="doomed-1", operation="aml_screening", subject_id="k", request={"full_name": "C"}
    )
    base = good.to_dict()
    cases: dict[str, tuple[bytes | None, list[tuple[str, bytes]]]] = {
        "invalid_json": (b'{"message_id": ', [("trace", b"t-1")]),
        "invalid_encoding": (b"\xc3\x28\xff", [("trace", b"t-2"), ("trace", b"t-2b")]),
        "invalid_envelope": (orjson.dumps(dict(base, message_id="e-1", subject_id=7)), []),
        "missing_message_id": (orjson.dumps({k: v for k, v in base.items() if k != "message_id"}), []),
        "unknown_operation": (orjson.dumps(dict(base, message_id="u-1", operation="levitate")), []),
        "too_large": (b'{"x": "' + b"y" * 70_000 + b'"}', []),
    }
    # Same key, one partition: strictly in order. The first message meets the scripted 500, 500 and, with
    # two attempts allowed, exhausts its retries; the rest find the provider healthy.
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = [
        (b"k", encode(doomed), doomed.headers()),
        (b"k", encode(good), good.headers()),
    ]
    records += [(b"k", value, hdrs) for value, hdrs in cases.values()]
    records += [(b"k", encode(conflict), conflict.headers())]
    positions = await publish_raw(kafka_bootstrap, topic, records, partition=2)
    sb.faults(script=["500", "500"])
    env = daemon_env(
        kafka_bootstrap, topic, group, sqlite_url, sb.url,
        max_message_bytes=64 * 1024, provider_max_attempts=2, max_in_flight=1,
    )  # fmt: skip
    proc = await run_to_end(env, tmp_path / "d.log", timeout=60)
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    by_reason = {headers_of(m)["idv-dlq-reason"].decode(): m for m in letters}
    expected = {*cases, "idempotency_conflict", "retries_exhausted"}
    assert set(by_reason) == expected, proc.log()[-3000:]
    for i, reason in enumerate(cases, start=2):
        m = by_reason[reason]
        value, hdrs = cases[reason]
        assert m.value == value  # original bytes unchanged
        assert m.key == b"k"
        h = list(m.headers)
        assert h[: len(hdrs)] == hdrs  # original headers first, unchanged, duplicates kept
        hd = headers_of(m)
        assert hd["idv-dlq-original-topic"] == topic.encode()
        assert hd["idv-dlq-original-partition"] == b"2"
        assert hd["idv-dlq-original-offset"] == str(positions[i][1]).encode()
        assert hd["idv-dlq-consumer-group"] == group.encode()
        assert hd["idv-dlq-detail"] and b"y" * 100 not in hd["idv-dlq-detail"]
        assert hd["idv-dlq-first-failure-at"].endswith(b"Z")
    assert headers_of(by_reason["retries_exhausted"])["idv-dlq-attempts"] == b"2"
    assert by_reason["idempotency_conflict"].value == encode(conflict)
    effects = sb.side_effects()
    assert effects[idempotency_key("idv", "aml_screening", "ok-1")] == 1
    assert effects.get(idempotency_key("idv", "aml_screening", "doomed-1"), 0) == 0


async def test_unwritable_dead_letter_topic_holds_the_partition(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path, group: str
) -> None:
    """If the DLQ cannot be written, nothing is committed past the unhandled message; it resumes later."""
    from aiokafka.admin import AIOKafkaAdminClient

    from tests.conftest import create_topic

    env = daemon_env(
        bootstrap=kafka_bootstrap, topic=topic, group=group, store_url=sqlite_url, provider_url=sb.url
    )
    proc = start_daemon(env, tmp_path / "d.log")
    try:
        await publish_raw(kafka_bootstrap, topic, [(b"k", encode(make_envelopes(1)[0]), [])], partition=5)
        await wait_committed_to_end(kafka_bootstrap, group, topic, 60)
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([f"{topic}.dlq"])

            async def dlq_gone() -> bool:
                return f"{topic}.dlq" not in await admin.list_topics()

            # Deletion is asynchronous: a write racing it can still land in the old topic.
            await wait_until(dlq_gone, "the dead-letter topic to be deleted", timeout=30)
        finally:
            await admin.close()
        after = make_envelopes(3)
        await publish_raw(
            kafka_bootstrap,
            topic,
            # Later messages under other keys finish while the dead letter cannot be written.
            [
                (b"k", b"not json", []),
                *[(f"k{i}".encode(), encode(e), e.headers()) for i, e in enumerate(after)],
            ],
            partition=5,
        )

        def attempts(since: int) -> int:
            # Dead-letter writes being attempted: the daemon's retry lines, or the producer's own complaints
            # about the missing topic while it waits for metadata (about ten a second).
            return proc.log()[since:].count(f"{topic}.dlq")

        await wait_until(
            lambda: all(sb.side_effects().get(k) == 1 for k in keys_for(after)), "the later messages done"
        )
        mark = len(proc.log())
        # Then several commit intervals (0.2 s) of failed attempts, in which a commit past the poison
        # message would have happened.
        await wait_until(lambda: attempts(mark) >= 10, "ten more failed dead-letter attempts", timeout=60)
        assert "dead-lettered:" not in proc.log(), "the dead letter was written: the topic was not gone"
        assert proc.proc.poll() is None
        committed = await committed_offsets(kafka_bootstrap, group, topic)
        assert committed[5] == 1, committed  # stuck at the poison message, not past it
        assert proc.proc.poll() is None
        await create_topic(kafka_bootstrap, f"{topic}.dlq", 8)
        await wait_committed_to_end(kafka_bootstrap, group, topic, 120)
        proc.stop_cleanly()
    finally:
        proc.kill()
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    assert [m.value for m in letters] == [b"not json"]


async def test_provider_outage_pauses_instead_of_flooding_the_dead_letter_topic(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path, group: str
) -> None:
    sb.faults(error_rate=1.0)
    unique = await publish_new(kafka_bootstrap, topic, 200, subjects=200)
    env = daemon_env(
        kafka_bootstrap, topic, group, sqlite_url, sb.url,
        provider_max_attempts=4, breaker_min_calls=10, breaker_open_s=1, max_in_flight=16,
    )  # fmt: skip
    proc = start_daemon(env, tmp_path / "d.log")
    try:
        started = time.monotonic()
        await wait_until(lambda: "circuit breaker open" in proc.log(), "the breaker to open", timeout=30)
        await anyio.sleep(max(0.0, started + 8 - time.monotonic()))  # an 8-second outage
        dead_during_outage = len(await read_all(kafka_bootstrap, f"{topic}.dlq"))
        sb.faults(error_rate=0.0)
        await wait_committed_to_end(kafka_bootstrap, group, topic, 90)
        proc.stop_cleanly()
    finally:
        proc.kill()
    log = proc.log()
    assert "circuit breaker open" in log
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    # Without the breaker all 200 would exhaust their 4 attempts within the outage.
    assert dead_during_outage <= 16, dead_during_outage
    assert len(letters) == dead_during_outage
    dead_ids = {orjson.loads(m.value)["message_id"] for m in letters}
    await assert_exactly_once(
        sb,
        sqlite_url,
        [e for e in unique if e.message_id not in dead_ids],
        at_most_once=[e for e in unique if e.message_id in dead_ids],
    )


async def test_transactional_results_survive_sigkill_between_results_and_commit(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    """Results and offsets commit atomically: a kill inside the transaction leaves no visible result without
    its commit, and after the restart every message has exactly one visible result."""
    sb.faults(latency_ms=50)  # ~2 s of work at 8 in flight: several transactions
    unique = await publish_new(kafka_bootstrap, topic, 300, subjects=300)
    group = "g-" + uuid.uuid4().hex[:8]
    common = dict(
        max_in_flight=8,
        bootstrap=kafka_bootstrap,
        topic=topic,
        group=group,
        store_url=sqlite_url,
        provider_url=sb.url,
        results_transactional="true",
        instance_id="txn-1",
        commit_interval_s=0.3,
        lease_s=3,
        provider_timeout_s=2,
    )
    run_until_killed(daemon_env(**common, fault_kill_at="in_transaction:2"), tmp_path / "c.log")
    committed_before = await committed_offsets(kafka_bootstrap, group, topic)
    visible = await read_results(kafka_bootstrap, f"{topic}.results", "read_committed")
    # Every visible result belongs to a message below a committed offset (no result without its commit).
    messages = await read_all(kafka_bootstrap, topic)
    below = {
        orjson.loads(m.value)["message_id"] for m in messages if m.offset < committed_before[m.partition]
    }
    assert {orjson.loads(v)["message_id"] for v in visible} <= below
    await run_to_end(daemon_env(**common), tmp_path / "r.log", timeout=90)
    committed_results = await read_results(kafka_bootstrap, f"{topic}.results", "read_committed")
    ids = [orjson.loads(v)["message_id"] for v in committed_results]
    assert sorted(ids) == sorted(e.message_id for e in unique)  # one each: none lost, none doubled
    everything = await read_results(kafka_bootstrap, f"{topic}.results", "read_uncommitted")
    assert len(everything) > len(committed_results)  # the killed transaction's events exist, aborted
    await assert_exactly_once(sb, sqlite_url, unique)


async def test_an_unexpected_error_on_one_message_dead_letters_it_and_the_daemon_goes_on(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, group: str
) -> None:
    from consumer.daemon import Daemon

    unique = await publish_new(kafka_bootstrap, topic, 30, subjects=3)
    settings = settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url)
    daemon = Daemon(settings)
    real = daemon.processor.handle
    victim = unique[7].message_id

    async def buggy(msg: object, **kwargs: int) -> object:
        if victim.encode() in msg.value:  # type: ignore[attr-defined]
            raise RuntimeError("simulated bug")
        return await real(msg, **kwargs)  # type: ignore[arg-type]

    daemon.processor.handle = buggy  # type: ignore[method-assign]

    async with anyio.create_task_group() as tg:
        codes: list[int] = []

        async def run() -> None:
            codes.append(await daemon.run())

        tg.start_soon(run)
        await wait_committed_to_end(kafka_bootstrap, group, topic, 60)
        daemon.stop()
    assert codes == [0]
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    assert [headers_of(m)["idv-dlq-reason"] for m in letters] == [b"internal_error"]
    assert orjson.loads(letters[0].value)["message_id"] == victim
    await assert_exactly_once(sb, sqlite_url, [e for e in unique if e.message_id != victim])


async def test_dead_letter_topic_none_is_refused_at_start(
    kafka_bootstrap: str, topic: str, sqlite_url: str
) -> None:
    """Without a DLQ, messages set aside (retries_exhausted, invalid) would be committed past silently."""
    from consumer.daemon import Daemon
    from consumer.errors import ConfigurationError

    settings = settings_for(
        kafka_bootstrap, topic, "g-none", sqlite_url, "http://127.0.0.1:1", dlq_topic="none"
    )
    with pytest.raises(ConfigurationError, match="IDV_DLQ_TOPIC"):
        Daemon(settings)


async def test_transactional_failures_turn_readiness_red_and_bound_pending_results(
    kafka_bootstrap: str, topic: str, sqlite_url: str
) -> None:
    from consumer.daemon import Daemon

    settings = settings_for(
        kafka_bootstrap, topic, "g-ready", sqlite_url, "http://127.0.0.1:1", results_transactional=True
    )
    daemon = Daemon(settings)
    daemon.partitions = {("t", 0): object()}  # type: ignore[dict-item]  # one assigned partition
    assert daemon.readiness()[0]
    daemon.sinks.txn_failures = 3
    ready, details = daemon.readiness()
    assert not ready and "Kafka broker unreachable" in str(details)
    assert not daemon._results_backlogged()
    daemon.sinks._pending_count = 2 * max(settings.max_buffered, settings.commit_every)
    assert daemon._results_backlogged()  # the fetch loop pauses every partition
    await daemon.sinks.start()  # (only so that the producers are closed cleanly)
    await daemon.sinks.stop()


async def test_two_instances_with_one_transactional_id_stop_with_a_clear_error(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path, group: str
) -> None:
    """The same IDV_INSTANCE_ID twice: the fenced instance exits 2 saying so, instead of crash-looping on an
    AssertionError; the other one goes on and finishes the topic."""
    env = daemon_env(
        kafka_bootstrap, topic, group, sqlite_url, sb.url,
        results_transactional="true", instance_id="same-" + uuid.uuid4().hex[:6],
    )  # fmt: skip
    await publish(kafka_bootstrap, topic, make_envelopes(40, subjects=40))
    first = start_daemon(env, tmp_path / "first.log")
    second = None
    try:
        await wait_committed_to_end(kafka_bootstrap, group, topic, 60)
        second = start_daemon(env, tmp_path / "second.log")  # takes the transactional id: fences the first
        while "partitions assigned" not in second.log():
            assert second.proc.poll() is None, second.log()[-2000:]
            await anyio.sleep(0.1)
        await publish(kafka_bootstrap, topic, make_envelopes(80, subjects=80))
        code = first.wait(60)
        assert code == 2, first.log()[-3000:]
        assert "set IDV_INSTANCE_ID uniquely" in first.log()
        # aiokafka's own sender futures are logged by asyncio when fenced; nothing else may fail.
        ours = [line for line in first.log().splitlines() if '"logger":"asyncio"' not in line]
        assert not [line for line in ours if "Traceback" in line or "AssertionError" in line]
        await wait_committed_to_end(kafka_bootstrap, group, topic, 90)
        assert second.proc.poll() is None, second.log()[-2000:]
        second.stop_cleanly()
    finally:
        kill_all(first, second)


async def test_a_dead_letter_that_can_never_be_written_becomes_a_stub_or_is_counted_lost(
    kafka_bootstrap: str, topic: str
) -> None:
    """Non-retriable write errors are not retried forever: the original becomes a stub; if the stub is
    refused too, the letter is counted lost and the caller moves on. Retriable ones are retried."""
    from consumer.sinks import Sinks

    sinks = Sinks(bootstrap=kafka_bootstrap, dlq_topic=f"{topic}.dlq", results_topic=None, group_id="g")
    counted: list[tuple[str, str]] = []
    sinks.on_unwritable = lambda sink, outcome: counted.append((sink, outcome))
    written: list[tuple[bytes | None, bytes | None, dict[str, bytes]]] = []
    script: list[Exception | None] = []

    async def send_once(topic_: str, value: bytes | None, key: bytes | None, headers: object) -> object:
        failure = script.pop(0)
        if failure is None:
            written.append((key, value, dict(headers)))  # type: ignore[call-overload]
        return failure

    sinks._send_once = send_once  # type: ignore[method-assign]
    sinks._send_alone = send_once  # type: ignore[method-assign]  # the lone write after a refused batch
    await sinks.start()  # real producers: a refused batch replaces them (see Sinks._replace_producer)
    try:
        await _stub_or_lost(sinks, topic, script, written, counted)
    finally:
        await sinks.stop()


async def _stub_or_lost(
    sinks: object,
    topic: str,
    script: list[Exception | None],
    written: list[tuple[bytes | None, bytes | None, dict[str, bytes]]],
    counted: list[tuple[str, str]],
) -> None:
    from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, TopicAuthorizationFailedError
    from aiokafka.structs import ConsumerRecord

    from consumer.sinks import DeadLetter, Sinks

    assert isinstance(sinks, Sinks)
    msg = ConsumerRecord(topic, 3, 42, 1700000000000, 0, b"k", b"v" * 10, None, 1, 10, (("h", b"x"),))
    letter = DeadLetter("invalid_json", "message value is not valid JSON")

    script[:] = [KafkaConnectionError(), None]  # retriable, then accepted: the original
    assert await sinks.dead_letter(msg, letter, 0.0) == "written"
    assert written[-1][:2] == (b"k", b"v" * 10)

    script[:] = [MessageSizeTooLargeError(), MessageSizeTooLargeError(), None]  # refused alone too: a stub
    assert await sinks.dead_letter(msg, letter, 0.0) == "stub"
    key, value, headers = written[-1]
    assert (key, value, "h" in headers) == (None, b"", False)
    assert headers["idv-dlq-reason"] == b"invalid_json" and headers["idv-dlq-original-offset"] == b"42"
    assert headers["idv-dlq-detail"].startswith(b"stub: original record too large for the dead-letter topic")

    script[:] = [TopicAuthorizationFailedError()] * 4  # in a batch and alone; not even the stub
    assert await sinks.dead_letter(msg, letter, 0.0) == "lost"
    assert counted == [("dead_letter", "stub"), ("dead_letter", "lost")]
    assert (sinks.stubs, sinks.lost) == (1, 1)


@pytest.mark.parametrize("transactional", [False, True], ids=["plain", "transactional"])
async def test_a_result_the_topic_refuses_does_not_take_its_batch_neighbours_down(
    kafka_bootstrap: str, sb: Sandbox, sqlite_url: str, group: str, tmp_path: Path, transactional: bool
) -> None:
    """The broker refuses a whole produce batch when it is over the topic's ``max.message.bytes``, and
    every record in it gets the same error. A results topic that takes 4 KB: batches of results are
    refused, each result alone fits but one (its key is 5 KB). Only that message is dead-lettered; every
    other result is written once, none of them dead-lettered."""
    topic = random_topic_name()
    await create_topic(kafka_bootstrap, topic, 1)
    await create_topic(kafka_bootstrap, f"{topic}.dlq", 1)
    await create_topic(kafka_bootstrap, f"{topic}.results", 1, max_message_bytes=4096)
    *valid, big = make_envelopes(81, seed=11)
    raw = [(env.key, encode(env), env.headers()) for env in valid]
    raw.insert(40, (b"s" * 5000, encode(big), big.headers()))
    await publish_raw(kafka_bootstrap, topic, raw, partition=0)

    extra = (
        {"results_transactional": "true", "instance_id": f"i-{uuid.uuid4().hex[:8]}"} if transactional else {}
    )
    env = daemon_env(kafka_bootstrap, topic, group, sqlite_url, sb.url, **extra)
    proc = await run_to_end(env, tmp_path / "daemon.log")
    assert "Traceback" not in proc.log(), proc.log()[-3000:]

    effects = sb.side_effects()
    assert {k: effects.get(k) for k in keys_for([*valid, big])} == dict.fromkeys(keys_for([*valid, big]), 1)
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    reasons = [(headers_of(m)["idv-dlq-original-offset"], headers_of(m)["idv-dlq-reason"]) for m in letters]
    assert reasons == [(b"40", b"internal_error")]
    results = await read_results(kafka_bootstrap, f"{topic}.results", "read_committed")
    ids = [orjson.loads(v)["message_id"] for v in results]
    assert sorted(ids) == sorted(env.message_id for env in valid)
