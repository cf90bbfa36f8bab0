"""Bad input: a corpus of malformed messages through the real daemon, and hypothesis-generated envelopes.

For every message the daemon must not crash, and must either process it or put it in the dead-letter
topic with the right ``idv-dlq-reason`` and the original key, value and headers unchanged; offsets must
reach the end and the counts must reconcile:

    consumed = completed (+ failed) + skipped duplicates + dead letters

Decisions recorded here (and in docs/dead-letters.md):

* **Duplicate JSON keys** are not detected: orjson keeps the last value, so an envelope that is otherwise
  valid is processed with the last value of each key. The ``idv-message-id`` header, which the publisher
  always sets, is the defence for the one field that matters: when it disagrees with the (last)
  ``message_id`` in the body the message is dead-lettered as ``invalid_envelope``.
* **Headers outside the contract** (anything not ``idv-*``) are carried, never interpreted: a valid
  envelope with a 100 KB custom header is processed; on a dead letter the header is kept byte for byte.
* **Nesting** deeper than orjson decodes (1024 levels) is ``invalid_json``; deeper than it can encode
  again for the fingerprint and the provider call (254 levels) is ``invalid_envelope``.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from consumer.keys import fingerprint, idempotency_key
from consumer.model import DLQ_REASONS, DeadLetter
from producer.envelope import OPERATIONS, Envelope, decode, encode, validate_fields
from producer.errors import EnvelopeError
from tests.conftest import create_topic, random_topic_name
from tests.consumer.conftest import (
    Sandbox,
    committed_offsets,
    daemon_env,
    end_offsets,
    publish_raw,
    read_all,
    start_daemon,
    wait_committed_to_end,
)

SLOW = os.environ.get("IDV_SLOW") == "1"
settings.register_profile(
    "idv-bad-input", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "idv-bad-input-slow", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile("idv-bad-input-slow" if SLOW else "idv-bad-input")

SECRET = "SECRET-PII-4c1d"
DAEMON_MAX_BYTES = 1024 * 1024
Raw = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


def base(message_id: object, /, **changes: Any) -> dict[str, Any]:
    """A valid envelope as a dict, with ``message_id`` and any field replaced (not validated)."""
    env = Envelope(
        message_id="placeholder",
        operation="aml_screening",
        subject_id="subject-bad",
        request={"full_name": SECRET},
    ).to_dict()
    env["message_id"] = message_id
    env.update(changes)
    return env


def nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


def with_request_raw(message_id: str, inner: bytes) -> bytes:
    head = orjson.dumps(base(message_id, request={"full_name": SECRET, "n": 0}))
    return head.replace(b'"n":0', b'"n":' + inner)


@dataclass
class Case:
    name: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    reason: str | None  # None: processed (its key must show one side effect)
    processed_as: str | None = None  # message ID it is processed under


def corpus() -> list[Case]:
    ok = Envelope(message_id="ok-1", operation="aml_screening", subject_id="s", request={"full_name": "A"})
    ok2 = Envelope(
        message_id="ok-2", operation="create_session", subject_id="s", request={"workflow_id": "w"}
    )
    dup_keys = (
        b'{"schema_version":1,"message_id":"dup-first","operation":"aml_screening","subject_id":"s",'
        b'"created_at":"2026-11-28T22:00:00.000Z","request":{"full_name":"A","full_name":"B"},'
        b'"message_id":"dup-last"}'
    )
    huge_header = ("x-blob", b"h" * 100_000)
    cases = [
        Case("good first", ok.key, encode(ok), ok.headers(), None, "ok-1"),
        Case("empty value", b"k", b"", [], "invalid_json"),
        Case("null value", b"k", None, [], "invalid_json"),
        Case("binary garbage", b"k", bytes(range(256)) * 4, [], "invalid_encoding"),
        Case("invalid utf-8 in a string", b"k", b'{"message_id": "\xc3\x28' + SECRET.encode() + b'"}', [],
             "invalid_encoding"),
        Case("json list", b"k", orjson.dumps([base("l-1")]), [], "invalid_envelope"),
        Case("json number", b"k", b"42", [], "invalid_envelope"),
        Case("json string", b"k", b'"' + SECRET.encode() + b'"', [], "invalid_envelope"),
        Case("json null", b"k", b"null", [], "invalid_envelope"),
        Case("duplicate keys, last wins", b"s", dup_keys, [], None, "dup-last"),
        Case("duplicate keys vs header", b"s", dup_keys.replace(b"dup-", b"dh-"),
             [("idv-message-id", b"dh-first")], "invalid_envelope"),
        Case("10,000 levels deep", b"k", with_request_raw("deep-1", nested(10_000)), [], "invalid_json"),
        Case("10,000 levels, top level", b"k", nested(10_000), [], "invalid_json"),
        Case("300 levels (decodes, cannot re-encode)", b"k", with_request_raw("deep-2", nested(300)), [],
             "invalid_envelope"),
        Case("5 MB payload", b"k", orjson.dumps(base("big-1", request={"full_name": "x" * 5 * 1024 * 1024})),
             [], "too_large"),
        Case("100 KB header on a broken message", b"k", b"{broken " + SECRET.encode(), [huge_header],
             "invalid_json"),
        Case("100 KB custom header on a valid message", b"s", orjson.dumps(base("hh-1")), [huge_header], None,
             "hh-1"),
        Case("100 KB idv-message-id header", b"s", orjson.dumps(base("hid-1")),
             [("idv-message-id", b"m" * 100_000)], "invalid_envelope"),
        Case("duplicated idv-message-id headers, different", b"s", orjson.dumps(base("dh2-a")),
             [("idv-message-id", b"dh2-a"), ("idv-message-id", b"dh2-b")], "invalid_envelope"),
        Case("duplicated idv-message-id headers, same", b"s", orjson.dumps(base("dh3-a")),
             [("idv-message-id", b"dh3-a"), ("idv-message-id", b"dh3-a")], None, "dh3-a"),
        Case("duplicated custom headers on a broken message", b"k", b"[",
             [("trace", b"1"), ("trace", b"2"), ("trace", b"1")], "invalid_json"),
        Case("null message ID", b"s", orjson.dumps(base("x", message_id=None)), [], "missing_message_id"),
        Case("empty message ID", b"s", orjson.dumps(base("x", message_id="")), [], "missing_message_id"),
        Case("absent message ID", b"s", orjson.dumps({k: v for k, v in base(0).items() if k != "message_id"}),
             [], "missing_message_id"),
        Case("10,000-character message ID", b"s", orjson.dumps(base("a" * 10_000)), [], "invalid_envelope"),
        Case("message ID with spaces", b"s", orjson.dumps(base("has space")), [], "invalid_envelope"),
        Case("schema_version as string", b"s", orjson.dumps(base("t-1", schema_version="1")), [],
             "invalid_envelope"),
        Case("schema_version true", b"s", orjson.dumps(base("t-2", schema_version=True)), [],
             "invalid_envelope"),
        Case("subject_id number", b"s", orjson.dumps(base("t-3", subject_id=7)), [], "invalid_envelope"),
        Case("request list", b"s", orjson.dumps(base("t-4", request=[SECRET])), [], "invalid_envelope"),
        Case("operation number", b"s", orjson.dumps(base("t-5", operation=5)), [], "invalid_envelope"),
        Case("created_at number", b"s", orjson.dumps(base("t-6", created_at=5)), [], "invalid_envelope"),
        Case("created_at without offset", b"s", orjson.dumps(base("t-7", created_at="2026-11-28T22:00:00")),
             [], "invalid_envelope"),
        Case("required field not a string", b"s", orjson.dumps(base("t-8", request={"full_name": 5})), [],
             "invalid_envelope"),
        Case("unknown schema version", b"s", orjson.dumps(base("v-2", schema_version=2)), [],
             "invalid_envelope"),
        Case("unknown operation", b"s", orjson.dumps(base("u-1", operation="levitate")), [],
             "unknown_operation"),
        Case("header disagrees with body", b"s", orjson.dumps(base("hb-1")), [("idv-message-id", b"hb-2")],
             "invalid_envelope"),
        Case("duplicate of the first", ok.key, encode(ok), ok.headers(), None, "ok-1"),
        Case("good last", ok2.key, encode(ok2), ok2.headers(), None, "ok-2"),
    ]  # fmt: skip
    return cases


def test_corpus_expectations_match_decode() -> None:
    """The corpus's expected reasons are what ``decode`` says (so the end-to-end test checks the daemon)."""
    for case in corpus():
        try:
            env = decode(case.value, case.headers, max_bytes=DAEMON_MAX_BYTES)
        except EnvelopeError as exc:
            assert exc.reason == case.reason, case.name
            assert SECRET not in exc.detail, case.name
        else:
            assert case.reason is None, case.name
            assert env.message_id == case.processed_as, case.name


def stopped_line(log: str) -> dict[str, Any]:
    for line in reversed(log.splitlines()):
        if '"stopped cleanly"' in line:
            return orjson.loads(line)  # type: ignore[no-any-return]
    raise AssertionError("no 'stopped cleanly' line in the daemon log:\n" + log[-3000:])


async def run_daemon_over(
    kafka_bootstrap: str, topic: str, sb: Sandbox, store_url: str, log_path: Path
) -> tuple[str, dict[str, Any]]:
    group = "g-" + uuid.uuid4().hex[:8]
    env = daemon_env(kafka_bootstrap, topic, group, store_url, sb.url, max_message_bytes=DAEMON_MAX_BYTES)
    proc = start_daemon(env, log_path)
    try:
        await wait_committed_to_end(kafka_bootstrap, group, topic, 120)
        assert proc.proc.poll() is None, "daemon crashed on bad input:\n" + proc.log()[-3000:]
        proc.stop_cleanly()
    finally:
        proc.kill()
    log = proc.log()
    assert "Traceback" not in log, log[-3000:]
    assert SECRET not in log
    assert await committed_offsets(kafka_bootstrap, group, topic) == await end_offsets(kafka_bootstrap, topic)
    return group, stopped_line(log)


def split_dlq_headers(headers: list[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], dict[str, bytes]]:
    original = [(k, v) for k, v in headers if not k.startswith("idv-dlq-")]
    return original, {k: v for k, v in headers if k.startswith("idv-dlq-")}


@pytest.mark.anyio
@pytest.mark.kafka
@pytest.mark.timeout(240)
async def test_bad_input_corpus_through_the_daemon(
    kafka_bootstrap: str, sb: Sandbox, sqlite_url: str, tmp_path: Path
) -> None:
    topic = random_topic_name("bad")
    await create_topic(kafka_bootstrap, topic, 2, with_sinks=True, max_message_bytes=8 * 1024 * 1024)
    cases = corpus()
    positions = await publish_raw(
        kafka_bootstrap, topic, [(c.key, c.value, c.headers) for c in cases], partition=1
    )
    by_offset = {offset: case for (_, offset), case in zip(positions, cases, strict=True)}

    _, stopped = await run_daemon_over(kafka_bootstrap, topic, sb, sqlite_url, tmp_path / "daemon.log")

    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    expected_dlq = {off: c for off, c in by_offset.items() if c.reason is not None}
    assert len(letters) == len(expected_dlq)
    for letter in letters:
        original, dlq = split_dlq_headers(list(letter.headers))
        offset = int(dlq["idv-dlq-original-offset"])
        case = expected_dlq.pop(offset)
        assert dlq["idv-dlq-reason"].decode() == case.reason, case.name
        assert dlq["idv-dlq-original-topic"] == topic.encode()
        assert dlq["idv-dlq-original-partition"] == b"1"
        assert letter.key == case.key, case.name
        assert (letter.value or b"") == (case.value or b""), case.name  # bytes unchanged
        assert (letter.value is None) == (case.value is None), case.name
        assert original == case.headers, case.name  # every header kept, in order, duplicates too
        assert SECRET.encode() not in dlq["idv-dlq-detail"]
    assert not expected_dlq

    processed = {c.processed_as for c in cases if c.reason is None and c.processed_as is not None}
    keys = {
        idempotency_key("idv", "create_session" if m == "ok-2" else "aml_screening", m) for m in processed
    }
    effects = sb.side_effects()
    assert {k for k, v in effects.items() if v} == keys
    assert all(effects[k] == 1 for k in keys)
    assert idempotency_key("idv", "aml_screening", "dup-first") not in effects

    stats = stopped["stats"]
    consumed = stopped["consumed"]
    duplicates = sum(1 for c in cases if c.reason is None) - len(processed)
    assert consumed == len(cases)
    assert stats["completed"] == len(processed) and stats["failed"] == 0
    assert stats["duplicate"] == duplicates == 1
    assert stats["invalid"] == len(letters) and stats["conflict"] == stats["set_aside"] == 0
    assert stats.get("error", 0) == 0  # no message met a bug (internal_error)
    assert consumed == stats["completed"] + stats["failed"] + stats["duplicate"] + len(letters)


# -- hypothesis -------------------------------------------------------------------------------------------

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,40}")
ids = st.from_regex(_ID, fullmatch=True)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Every "roll" below takes the valid path at 0, where hypothesis starts and shrinks to, so a fair share of
# the generated envelopes is valid and the invalid ones differ from a valid one in one or two fields.
bad_timestamps = st.sampled_from(["2026-11-28T22:00:00", "yesterday", "", "2026-13-01", "2026-11-28T25:00Z"])
good_timestamps = st.sampled_from(["2026-11-28T22:00:00.123Z", "2026-11-28T22:00:00+01:00"])


@st.composite
def request_bodies(draw: st.DrawFn, operation: str) -> Any:
    op = OPERATIONS.get(operation)
    if op is None or draw(st.integers(0, 9)) == 9:
        return draw(json_values)
    body: dict[str, Any] = {name: draw(st.text(min_size=1, max_size=12)) for name in op.required}
    body.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    return body


@st.composite
def envelope_objects(draw: st.DrawFn, message_ids: st.SearchStrategy[str] = ids) -> Any:
    """Mostly valid envelopes, with each field sometimes absent or replaced by any JSON value."""
    roll = draw(st.integers(0, 9))
    # The operations the sandbox's ietf profile serves (passive_liveness and face_match are Didit-only there).
    served = ("aml_screening", "create_session", "id_verification")
    operation = served[roll % 3] if roll < 8 else "teleport" if roll == 8 else draw(st.text())
    fields: dict[str, Any] = {
        "schema_version": 1,
        "message_id": draw(message_ids),
        "operation": operation,
        "subject_id": draw(ids),
        "created_at": draw(bad_timestamps if draw(st.integers(0, 9)) == 9 else good_timestamps),
        "request": draw(request_bodies(operation)),
    }
    if draw(st.booleans()):
        fields["correlation_id"] = draw(st.text(max_size=10) | json_values)
    for name in list(fields):
        roll = draw(st.integers(0, 24))
        if roll == 24:
            del fields[name]
        elif roll == 23:
            fields[name] = draw(json_values)
    if draw(st.integers(0, 9)) == 9:
        fields.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    return fields


def to_bytes(obj: Any) -> bytes:
    # The standard library writes integers of any size (orjson stops at 64 bits), like other producers.
    return json.dumps(obj, ensure_ascii=False).encode()


header_values = st.binary(max_size=12) | st.sampled_from([b"", b"m-1"])
headers = st.lists(
    st.tuples(st.sampled_from(["idv-message-id", "idv-operation", "trace"]), header_values), max_size=3
)


@st.composite
def raw_messages(
    draw: st.DrawFn, message_ids: st.SearchStrategy[str] = ids
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    kind = draw(st.integers(0, 10))
    hdrs = draw(headers)
    if kind == 10:
        # Nesting around the limits: orjson encodes 254 levels, decodes 1024.
        depth = draw(st.sampled_from([200, 253, 254, 255, 300, 1023, 1024, 1025]) | st.integers(1, 1100))
        return with_request_raw(draw(message_ids), nested(depth)), hdrs
    if kind <= 5:
        obj = draw(envelope_objects(message_ids))
        if kind <= 3 and isinstance(obj.get("message_id"), str):
            # As the publisher does: the header repeats the body's message ID.
            hdrs = [
                ("idv-message-id", obj["message_id"].encode()),
                *[h for h in hdrs if h[0] != "idv-message-id"],
            ]
        return to_bytes(obj), hdrs
    if kind <= 7:
        return to_bytes(draw(json_values)), hdrs
    if kind == 8:
        return draw(st.binary(max_size=64)), hdrs
    return draw(st.sampled_from([None, b"", b"{", b"\xff", b"[]", b"{}"])), hdrs


@pytest.mark.timeout(900 if SLOW else 120)
@PROFILE
@given(raw_messages())
def test_decode_and_keys_never_raise_anything_but_envelope_errors(
    message: tuple[bytes | None, list[tuple[str, bytes]]],
) -> None:
    value, hdrs = message
    try:
        env = decode(value, hdrs, max_bytes=DAEMON_MAX_BYTES)
    except EnvelopeError as exc:
        assert exc.reason in DLQ_REASONS
        DeadLetter(exc.reason, exc.detail)  # a valid dead letter can be made from it
        return
    assert isinstance(env, Envelope)
    validate_fields(env.to_dict())
    assert env.operation in OPERATIONS
    key = idempotency_key("idv", env.operation, env.message_id)
    assert re.fullmatch(r"idv_[0-9a-f]{32}", key)
    assert idempotency_key("idv", env.operation, env.message_id, generation=1) != key
    fp = fingerprint(env)
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    # What the pipeline does next must work too: re-encode (provider call) and key the record.
    again = decode(encode(env, max_bytes=16 * 1024 * 1024))
    assert fingerprint(again) == fp
    assert env.key == env.subject_id.encode()


def _outcome(value: bytes | None, hdrs: list[tuple[str, bytes]]) -> tuple[str, str | None, str | None]:
    """(reason or "", idempotency key, fingerprint) as the daemon will see it."""
    try:
        env = decode(value, hdrs, max_bytes=DAEMON_MAX_BYTES)
    except EnvelopeError as exc:
        return exc.reason, None, None
    return "", idempotency_key("idv", env.operation, env.message_id), fingerprint(env)


def generated_messages(n: int) -> list[tuple[bytes | None, list[tuple[str, bytes]], bytes | None]]:
    """``n`` hypothesis-generated messages (value, headers, Kafka key), mixed valid and invalid.

    One test case holding 200 messages is too large for hypothesis to generate, so a passing inner
    property collects the examples it generates instead; the daemon then sees them all in one run.
    """
    collected: list[tuple[bytes | None, list[tuple[str, bytes]], bytes | None]] = []
    # A small pool of message IDs, so duplicates (same payload) and conflicts (different payload) occur.
    pool = ids | st.sampled_from([f"pool-{i}" for i in range(12)])

    @settings(max_examples=3 * n, phases=[Phase.generate], deadline=None, database=None)
    @given(raw_messages(message_ids=pool), st.binary(max_size=4) | st.none())
    def collect(message: tuple[bytes | None, list[tuple[str, bytes]]], kafka_key: bytes | None) -> None:
        if len(collected) < n:
            collected.append((message[0], message[1], kafka_key))

    collect()
    assert len(collected) == n
    return collected


@pytest.mark.anyio
@pytest.mark.kafka
@pytest.mark.timeout(240)
async def test_generated_messages_through_the_daemon_reconcile(
    kafka_bootstrap: str, sb: Sandbox, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'dedupe.db'}"
    records: list[Raw] = []
    for value, hdrs, kafka_key in generated_messages(200):
        _, key, _ = _outcome(value, hdrs)
        # Valid requests are keyed by subject as the publisher does (per-subject order); the rest anyhow.
        subject = decode(value, hdrs, max_bytes=DAEMON_MAX_BYTES).key if key else kafka_key
        if subject is None and value is None:
            subject = b""  # aiokafka sends nothing without a key or a value
        records.append((subject, value, hdrs))
    outcomes = [_outcome(v, h) for _, v, h in records]
    invalid = Counter(reason for reason, _, _ in outcomes if reason)
    valid = [(k, fp) for reason, k, fp in outcomes if not reason and k is not None]
    distinct = {k for k, _ in valid}

    topic = random_topic_name("gen")
    await create_topic(kafka_bootstrap, topic, 4, with_sinks=True)
    await publish_raw(kafka_bootstrap, topic, records)
    _, stopped = await run_daemon_over(kafka_bootstrap, topic, sb, store_url, tmp_path / "daemon.log")
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    stats, consumed = stopped["stats"], stopped["consumed"]
    reasons = Counter(dict(m.headers)["idv-dlq-reason"].decode() for m in letters)
    conflicts = reasons.pop("idempotency_conflict", 0)

    assert consumed == len(records) == sum((await end_offsets(kafka_bootstrap, topic)).values())
    assert reasons == invalid  # every invalid message dead-lettered under the reason decode gives
    assert stats["invalid"] == sum(invalid.values()) and stats["conflict"] == conflicts
    assert stats["completed"] + stats["failed"] == len(distinct)
    assert stats["duplicate"] + conflicts == len(valid) - len(distinct)
    assert stats["set_aside"] == 0 and stats.get("error", 0) == 0
    assert consumed == stats["completed"] + stats["failed"] + stats["duplicate"] + len(letters)
    effects = sb.side_effects()
    assert {k for k, v in effects.items() if v} == distinct
    assert all(effects[k] == 1 for k in distinct)
