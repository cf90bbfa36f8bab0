"""Records no well-behaved producer writes, written with an independent client (kcat), through the real
daemon process: none may crash it or stall its partition.

Every hostile record sits between two valid requests in one partition (valid → hostile → valid → …). The
daemon must keep running (no traceback), dead-letter the hostile record with the documented reason (or
process it, where it is a valid request with odd headers), complete every valid request (sandbox ledger),
and commit to the end of the topic. Everything runs twice: plain and with transactional results.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from producer.envelope import Envelope, encode
from tests.conftest import create_topic, random_topic_name, service_missing
from tests.consumer.conftest import (
    DaemonProcess,
    Sandbox,
    committed_offsets,
    daemon_env,
    end_offsets,
    keys_for,
    read_all,
    start_daemon,
)
from tests.consumer.test_exactly_once import make_envelopes

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

REQUEST_TOPIC_MAX = 2 * 1024 * 1024  # the request topic takes 2 MB records; the DLQ keeps its 1 MB default


def kcat() -> str:
    path = shutil.which("kcat")
    if path is None:
        service_missing("kcat", "apt-get install kcat")
    assert path is not None
    return path


@dataclass
class Hostile:
    name: str
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[bytes, bytes | None]] = ()
    reason: str | None = None  # expected dead-letter reason; None: a valid request that must complete
    stub: bool = False  # the dead letter is a stub (no original key, value or headers)
    envelope: Envelope | None = field(default=None, repr=False)


def hostile_cases() -> list[Hostile]:
    ok_header_value, many_headers, big_key, null_header = make_envelopes(4, seed=7)
    return [
        Hostile("null key and null value", None, None, reason="invalid_json"),
        Hostile("empty value", b"k-empty", b"", reason="invalid_json"),
        Hostile(
            "header key not UTF-8",
            b"k-bad-header",
            b'{"not": "read"}',
            [(b"\xff\xfeh", b"x"), (b"ok", b"y")],
            reason="undecodable_record",
            stub=True,
        ),
        Hostile(
            "header value not UTF-8 (valid request)",
            ok_header_value.key,
            encode(ok_header_value),
            [*((k.encode(), v) for k, v in ok_header_value.headers()), (b"x-binary", b"\xff\xfe\x80\xc0")],
            envelope=ok_header_value,
        ),
        Hostile(
            "header with a null value (valid request)",
            null_header.key,
            encode(null_header),
            [*((k.encode(), v) for k, v in null_header.headers()), (b"x-null", None)],
            envelope=null_header,
        ),
        Hostile(
            "header with a null value (invalid)",
            b"k-null",
            b"[1]",
            [(b"x-null", None)],
            reason="invalid_envelope",
        ),
        Hostile(
            "10,000 headers (valid request)",
            many_headers.key,
            encode(many_headers),
            [
                *((k.encode(), v) for k, v in many_headers.headers()),
                *((f"x-h{i}".encode(), b"v") for i in range(10_000)),
            ],
            envelope=many_headers,
        ),
        Hostile(
            "10,000 headers (invalid)",
            b"k-many",
            b"not json",
            [(f"x-h{i}".encode(), b"v") for i in range(10_000)],
            reason="invalid_json",
        ),
        Hostile(
            "key larger than the results topic accepts (valid request)",
            b"s" * (1100 * 1024),
            encode(big_key),
            [(k.encode(), v) for k, v in big_key.headers()],
            reason="internal_error",
            stub=True,
            envelope=big_key,
        ),
        Hostile(
            "larger than the dead-letter topic accepts",
            b"k-big",
            b"x" * (1536 * 1024),
            [(b"x-note", b"1.5 MB")],
            reason="too_large",
            stub=True,
        ),
    ]


def kcat_produce(
    bootstrap: str,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[bytes, bytes | None]],
) -> None:
    """One record to partition 0 with kcat, in line mode on stdin (keys and values of any size; none of
    the cases has a tab or newline in them). Null key and value: ``-Z`` with an empty key and value."""
    args: list[str | bytes] = [kcat(), "-b", bootstrap, "-P", "-t", topic, "-p", "0"]
    args += ["-X", "message.max.bytes=4000000"]
    for k, v in headers:
        args += ["-H", k if v is None else k + b"=" + v]  # no "=": a null value
    if key is None and value is None:
        args += ["-K", "\t", "-Z"]
        line = b"\t"
    elif key is None:
        assert value
        line = value
    else:
        args += ["-K", "\t"]
        line = key + b"\t" + (value or b"")
    assert b"\n" not in line
    subprocess.run(args, input=line + b"\n", check=True, timeout=30, capture_output=True)


async def wait_alive_and_committed(
    proc: DaemonProcess, bootstrap: str, group: str, topic: str, timeout: float
) -> None:
    """Until the group committed to the end of ``topic``; fails at once if the daemon dies."""
    ends = await end_offsets(bootstrap, topic)
    deadline = time.monotonic() + timeout
    while True:
        assert proc.proc.poll() is None, (
            f"the daemon died (exit {proc.proc.returncode}):\n{proc.log()[-3000:]}"
        )
        committed = await committed_offsets(bootstrap, group, topic)
        if all(committed.get(p, 0) >= end for p, end in ends.items()):
            return
        assert time.monotonic() < deadline, (
            f"not committed to the end: {committed} / {ends}\n{proc.log()[-2000:]}"
        )
        await anyio.sleep(0.5)


def kcat_envelope(bootstrap: str, topic: str, env: Envelope) -> None:
    kcat_produce(bootstrap, topic, env.key, encode(env), [(k.encode(), v) for k, v in env.headers()])


CASE_NAMES = [c.name for c in hostile_cases()]


@pytest.mark.parametrize("transactional", [False, True], ids=["plain", "transactional"])
async def test_all_hostile_records_in_one_partition(
    kafka_bootstrap: str, sandbox: object, sqlite_url: str, tmp_path: Path, transactional: bool
) -> None:
    """Every case in one partition, each between two valid requests."""
    await run_cases(kafka_bootstrap, sandbox, sqlite_url, tmp_path, transactional, hostile_cases())


@pytest.mark.parametrize("transactional", [False, True], ids=["plain", "transactional"])
@pytest.mark.parametrize("name", CASE_NAMES)
async def test_one_hostile_record(
    kafka_bootstrap: str, sandbox: object, sqlite_url: str, tmp_path: Path, transactional: bool, name: str
) -> None:
    """One case alone (valid → hostile → valid), so a regression names its case."""
    cases = [c for c in hostile_cases() if c.name == name]
    await run_cases(kafka_bootstrap, sandbox, sqlite_url, tmp_path, transactional, cases)


async def run_cases(
    kafka_bootstrap: str,
    sandbox: object,
    sqlite_url: str,
    tmp_path: Path,
    transactional: bool,
    cases: list[Hostile],
) -> None:
    sb = Sandbox(sandbox.url)  # type: ignore[attr-defined]
    topic = random_topic_name()
    await create_topic(kafka_bootstrap, topic, 1, max_message_bytes=REQUEST_TOPIC_MAX)
    await create_topic(kafka_bootstrap, f"{topic}.dlq", 1)
    await create_topic(kafka_bootstrap, f"{topic}.results", 1)
    valid = make_envelopes(len(cases) + 1)
    for i, case in enumerate(cases):
        kcat_envelope(kafka_bootstrap, topic, valid[i])
        kcat_produce(kafka_bootstrap, topic, case.key, case.value, case.headers)
    kcat_envelope(kafka_bootstrap, topic, valid[-1])

    group = "g-" + uuid.uuid4().hex[:8]
    extra = (
        {"results_transactional": "true", "instance_id": f"i-{uuid.uuid4().hex[:8]}"} if transactional else {}
    )
    env = daemon_env(kafka_bootstrap, topic, group, sqlite_url, sb.url, **extra)
    proc = start_daemon(env, tmp_path / "daemon.log")
    try:
        await wait_alive_and_committed(proc, kafka_bootstrap, group, topic, 90)
        assert proc.proc.poll() is None, proc.log()[-3000:]
        proc.stop_cleanly()
    finally:
        proc.kill()
    log = proc.log()
    assert "Traceback" not in log, log[-3000:]

    # Valid requests, and the hostile ones that are valid requests, completed exactly once.
    completes = [*valid, *(c.envelope for c in cases if c.envelope is not None)]
    effects = sb.side_effects()
    assert {k: effects.get(k) for k in keys_for(completes)} == dict.fromkeys(keys_for(completes), 1)

    # Each hostile record that is not a request: one dead letter with its reason and original position.
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    by_offset = {int(dict(m.headers)["idv-dlq-original-offset"]): m for m in letters}
    assert len(by_offset) == len(letters), "a record was dead-lettered twice"
    expected = {2 * i + 1: c for i, c in enumerate(cases) if c.reason is not None}
    assert sorted(by_offset) == sorted(expected), [
        (o, dict(m.headers)["idv-dlq-reason"]) for o, m in by_offset.items()
    ]
    for offset, case in expected.items():
        msg = by_offset[offset]
        headers = dict(msg.headers)
        assert headers["idv-dlq-reason"] == case.reason.encode(), (case.name, headers["idv-dlq-reason"])
        assert headers["idv-dlq-original-topic"] == topic.encode()
        assert headers["idv-dlq-original-partition"] == b"0"
        for h in ("idv-dlq-detail", "idv-dlq-consumer-group", "idv-dlq-first-failure-at", "idv-dlq-attempts"):
            assert h in headers, (case.name, h)
        if case.stub:
            assert msg.key is None and msg.value == b"", case.name
            assert headers["idv-dlq-detail"].startswith(b"stub: ") or case.reason == "undecodable_record"
            assert not [k for k, _ in msg.headers if not k.startswith("idv-dlq-")], case.name
        else:
            assert msg.key == case.key, case.name
            assert msg.value == (case.value if case.value is not None else b""), case.name
            assert [(k.encode(), v) for k, v in msg.headers if not k.startswith("idv-dlq-")] == list(
                case.headers
            ), case.name
    for offset, msg in by_offset.items():
        detail = dict(msg.headers)["idv-dlq-detail"]
        if expected[offset].name.startswith("larger"):
            assert b"too large for the dead-letter topic" in detail
        if expected[offset].name.startswith("key larger"):
            assert b"result event could not be written" in detail, detail
