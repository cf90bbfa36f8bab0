"""``idv-publish`` against the real local broker: output, line reports, exit codes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from click.testing import CliRunner, Result

from producer.cli import main
from producer.envelope import HEADER_MESSAGE_ID, decode
from producer.samples import sample_envelopes

ROOT = Path(__file__).resolve().parents[2]
# Looks like personal data; it must never appear in the CLI's output.
SECRET_NAME = "Jane Secret Doe"

ReadSync = Callable[[str, int], list[ConsumerRecord[bytes, bytes]]]


@pytest.fixture(autouse=True)
def _restore_logger_levels() -> Iterator[None]:
    # The CLI quiets aiokafka's logger; keep that from leaking into other tests.
    names = ("aiokafka", "producer")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def run(kafka_bootstrap: str) -> Callable[..., Result]:
    def invoke(*args: str, input: bytes | str | None = None, env: dict[str, str] | None = None) -> Result:
        full_env = {"IDV_KAFKA_BOOTSTRAP": kafka_bootstrap, **(env or {})}
        return CliRunner().invoke(main, list(args), input=input, env=full_env, catch_exceptions=False)

    return invoke


def summary(result: Result) -> dict[str, Any]:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    data = orjson.loads(lines[0])
    assert isinstance(data, dict)
    return data


def jsonl(*objects: object) -> bytes:
    return b"".join(orjson.dumps(obj) + b"\n" for obj in objects)


def line(n: int, subject: str = "applicant-1", **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "operation": "aml_screening",
        "subject_id": subject,
        "request": {"full_name": f"{SECRET_NAME} {n}"},
        "message_id": f"line-{n:03d}",
    }
    obj.update(extra)
    return obj


# ------------------------------------------------------------------------------------------ one


@pytest.mark.kafka
def test_one_publishes_and_prints_json(
    run: Callable[..., Result], topic: str, read_topic_sync: ReadSync
) -> None:
    result = run(
        "one",
        "--topic",
        topic,
        "--operation",
        "create_session",
        "--subject",
        "applicant-9",
        "--request",
        '{"workflow_id": "wf-1"}',
        "--correlation-id",
        "checkout-3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = summary(result)
    assert data["published"] == 1
    assert (data["invalid"], data["duplicate_ids"], data["topic"]) == (0, 0, topic)
    [record] = read_topic_sync(topic, 1)
    assert (record.partition, record.offset) == (data["partition"], data["offset"])
    assert record.key == b"applicant-9"
    env = decode(record.value, list(record.headers))
    assert env.message_id == data["message_id"]
    assert (env.operation, env.correlation_id, env.request) == (
        "create_session",
        "checkout-3",
        {"workflow_id": "wf-1"},
    )
    assert result.stderr == ""


@pytest.mark.kafka
def test_one_with_a_message_id_reuses_it(
    run: Callable[..., Result], topic: str, read_topic_sync: ReadSync
) -> None:
    args = ["one", "--topic", topic, "--operation", "aml_screening", "--subject", "s-1"]
    args += ["--request", '{"full_name": "x"}', "--message-id", "order-77"]
    for _ in range(2):
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert result.stdout == ""
        assert result.stderr.startswith(f"published order-77 to {topic}[")
        assert "published 1, invalid 0, duplicate IDs in input 0" in result.stderr
    records = read_topic_sync(topic, 2)
    assert [dict(r.headers)[HEADER_MESSAGE_ID] for r in records] == [b"order-77", b"order-77"]


@pytest.mark.kafka
def test_one_with_an_invalid_envelope_exits_1_without_publishing(
    run: Callable[..., Result], topic: str, read_topic_sync: ReadSync
) -> None:
    result = run(
        "one", "--topic", topic, "--operation", "aml_screening", "--subject", SECRET_NAME,
        "--request", '{"full_name": "x"}',
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (
        "invalid: invalid_envelope: "
        "subject_id has characters outside [A-Za-z0-9._:@/+=-] or starts with a symbol"
    )
    assert SECRET_NAME not in result.output
    assert read_topic_sync(topic, 0) == []


@pytest.mark.parametrize(
    ("request_json", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object")],
)
def test_one_with_a_malformed_request_option_is_a_usage_error(request_json: str, message: str) -> None:
    result = CliRunner().invoke(
        main, ["one", "--operation", "aml_screening", "--subject", "s", "--request", request_json]
    )
    assert result.exit_code == 2
    assert "--request" in result.stderr
    assert message in result.stderr


def test_one_with_an_unknown_operation_is_a_usage_error() -> None:
    result = CliRunner().invoke(
        main, ["one", "--operation", "credit_check", "--subject", "s", "--request", "{}"]
    )
    assert result.exit_code == 2
    assert "credit_check" in result.stderr


# ----------------------------------------------------------------------------------------- file


@pytest.mark.kafka
def test_file_reports_invalid_lines_by_number_and_publishes_the_rest(
    run: Callable[..., Result], topic: str, read_topic_sync: ReadSync, tmp_path: Path
) -> None:
    path = tmp_path / "requests.jsonl"
    content = (
        jsonl(line(1), [SECRET_NAME])
        + b"\n"  # line 3: blank, skipped
        + jsonl(line(4, operation="credit_check"), line(5, subject="applicant-2"))
        + b'{"full_name": "' + SECRET_NAME.encode() + b'"\n'  # line 6: broken JSON
        + jsonl(line(7, request={"date_of_birth": "1990-01-01"}))
        + b"\xff\xfe" + SECRET_NAME.encode("utf-16-le") + b"\n"  # line 8: not UTF-8
        + jsonl(line(1), line(10, message_id=None), line(11))  # 9 repeats line 1's ID
    )  # fmt: skip
    path.write_bytes(content)
    result = run("file", str(path), "--topic", topic, "--json")
    assert result.exit_code == 1, result.output
    reports = result.stderr.splitlines()
    assert reports[0] == "line 2: invalid_envelope: envelope must be a JSON object, got list"
    assert reports[1] == "line 4: unknown_operation: unknown operation 'credit_check'"
    assert reports[2].startswith("line 6: invalid_json: line is not valid JSON (")
    assert reports[3] == (
        "line 7: invalid_envelope: "
        "request.full_name is required for aml_screening and must be a non-empty string"
    )
    assert reports[4] == "line 8: invalid_encoding: line is not valid UTF-8"
    assert reports[5] == "line 10: missing_message_id: message_id is missing or empty"
    assert len(reports) == 6
    assert SECRET_NAME not in result.output
    data = summary(result)
    assert (data["published"], data["invalid"], data["duplicate_ids"]) == (4, 6, 1)
    assert data["elapsed_s"] >= 0 and data["msg_per_s"] >= 0

    records = read_topic_sync(topic, 4)
    ids = [decode(r.value).message_id for r in records if r.key == b"applicant-1"]
    assert ids == ["line-001", "line-001", "line-011"]  # in file order within the subject's partition
    assert [decode(r.value).message_id for r in records if r.key == b"applicant-2"] == ["line-005"]


@pytest.mark.kafka
def test_file_fail_fast_stops_at_the_first_invalid_line(
    run: Callable[..., Result], topic: str, read_topic_sync: ReadSync, tmp_path: Path
) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl(line(1), line(2), {"operation": "aml_screening"}, line(4), [5]))
    result = run("file", str(path), "--topic", topic, "--fail-fast", "--json")
    assert result.exit_code == 1
    # Line 5 is invalid too, but never read.
    assert result.stderr.splitlines() == ["line 3: invalid_envelope: subject_id is missing or empty"]
    assert (summary(result)["published"], summary(result)["invalid"]) == (2, 1)
    records = read_topic_sync(topic, 2)
    assert sorted(decode(r.value).message_id for r in records) == ["line-001", "line-002"]


@pytest.mark.kafka
def test_file_from_stdin_with_bom_crlf_and_generated_ids(
    run: Callable[..., Result], topic: str, read_topic_sync: ReadSync
) -> None:
    first = line(1)
    del first["message_id"]
    content = b"\xef\xbb\xbf" + orjson.dumps(first) + b"\r\n" + orjson.dumps(line(2)) + b"\r\n\r\n"
    result = run("file", "-", "--topic", topic, input=content)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("published 2, invalid 0, duplicate IDs in input 0, ")
    assert result.stderr.rstrip().endswith("msg/s")
    records = read_topic_sync(topic, 2)
    ids = {decode(r.value).message_id for r in records}
    assert "line-002" in ids
    [generated] = ids - {"line-002"}
    assert len(generated) == 36  # a UUIDv7


def test_file_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["file", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2
    assert "No such file" in result.stderr


def test_unreachable_broker_exits_2_with_the_error(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl(line(1)))
    result = CliRunner().invoke(main, ["file", str(path), "--bootstrap", "127.0.0.1:1", "--json"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot start producer for topic 'idv.requests': ")
    assert "(published 0 before the failure)" in result.stderr
    data = summary(result)
    assert data["published"] == 0
    assert "Unable to bootstrap" in data["error"]


# -------------------------------------------------------------------------------------- samples


@pytest.mark.kafka
def test_samples_publishes_the_seeded_list_with_duplicates(
    run: Callable[..., Result], topic: str, read_topic_sync: ReadSync
) -> None:
    result = run(
        "samples", "--count", "300", "--duplicates", "0.1", "--seed", "5", "--topic", topic, "--json"
    )
    assert result.exit_code == 0, result.output
    data = summary(result)
    assert (data["published"], data["invalid"], data["duplicate_ids"], data["seed"]) == (300, 0, 30, 5)
    records = read_topic_sync(topic, 300)
    assert len(records) == 300
    published = sorted(decode(r.value, list(r.headers)).message_id for r in records)
    expected = sorted(e.message_id for e in sample_envelopes(300, seed=5, duplicate_ratio=0.1))
    assert published == expected
    assert len(set(published)) == 270


@pytest.mark.kafka
def test_samples_without_a_seed_reports_the_one_it_chose(run: Callable[..., Result], topic: str) -> None:
    result = run("samples", "--count", "5", "--topic", topic)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    [summary_line] = result.stderr.splitlines()
    assert summary_line.startswith("published 5, invalid 0, duplicate IDs in input 0, ")
    assert " (seed " in summary_line


@pytest.mark.kafka
def test_environment_chooses_broker_and_topic(
    kafka_bootstrap: str, topic: str, read_topic_sync: ReadSync
) -> None:
    result = CliRunner().invoke(
        main,
        ["samples", "--count", "3", "--json"],
        env={"IDV_KAFKA_BOOTSTRAP": kafka_bootstrap, "IDV_TOPIC": topic},
    )
    assert result.exit_code == 0, result.output
    assert summary(result)["topic"] == topic
    assert len(read_topic_sync(topic, 3)) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--count", "-1"], "--count"), (["--count", "1", "--duplicates", "1"], "--duplicates")],
)
def test_samples_rejects_bad_numbers(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["samples", *args])
    assert result.exit_code == 2
    assert message in result.stderr


def test_unreadable_password_file_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["samples", "--count", "1"],
        env={"IDV_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "missing")},
    )
    assert result.exit_code == 2
    assert "IDV_KAFKA_SASL_PASSWORD_FILE: cannot read" in result.stderr


def test_help_lists_the_commands_and_exit_codes() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for word in ("one", "file", "samples", "Exit status"):
        assert word in result.stdout
    for command in ("one", "file", "samples"):
        assert CliRunner().invoke(main, [command, "--help"]).exit_code == 0


# ---------------------------------------------------------------------------------- real process


@pytest.mark.kafka
def test_real_process_exit_code_streams_and_no_warnings(kafka_bootstrap: str, topic: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IDV_KAFKA_BOOTSTRAP": kafka_bootstrap, "IDV_TOPIC": topic}
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "producer.cli", "file", "-", "--json"],
        input=jsonl(line(1), {"operation": "aml_screening"}, line(3)),
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.decode().splitlines() == ["line 2: invalid_envelope: subject_id is missing or empty"]
    data = orjson.loads(proc.stdout)
    assert (data["published"], data["invalid"]) == (2, 1)
