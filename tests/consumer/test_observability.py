"""Metrics, health and log hygiene of a real daemon process (real broker, sandbox over HTTP)."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import anyio
import httpx
import pytest

from producer.envelope import Envelope
from tests.consumer.conftest import (
    API_KEY,
    Sandbox,
    daemon_env,
    publish,
    run_to_end,
    start_daemon,
    wait_committed_to_end,
)

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def health_url(log_path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r'"health_url":"(http://[^"]+)"', log_path.read_text(errors="replace"))
        if found:
            return found.group(1)
        time.sleep(0.05)
    raise AssertionError("daemon never logged its health URL")


def sample(metrics: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_metrics_and_health_match_the_messages_processed(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path, group: str
) -> None:
    envs = [
        Envelope(
            message_id=f"obs-{i}-{uuid.uuid4().hex[:6]}",
            operation="aml_screening",
            subject_id=f"s{i % 7}",
            request={"full_name": "DECLINE" if i % 5 == 0 else "Fine"},
        )
        for i in range(40)
    ]
    await publish(kafka_bootstrap, topic, [*envs, *envs[:6]])  # 6 duplicates
    from tests.consumer.conftest import publish_raw

    await publish_raw(kafka_bootstrap, topic, [(b"x", b"garbage", [])])
    env = daemon_env(
        bootstrap=kafka_bootstrap, topic=topic, group=group, store_url=sqlite_url, provider_url=sb.url
    )
    proc = start_daemon(env, tmp_path / "d.log")
    try:
        url = health_url(proc.log_path)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.get("/healthz")).status_code == 200
            await wait_committed_to_end(kafka_bootstrap, group, topic, 60)
            await anyio.sleep(1.5)  # one more commit-loop tick updates the gauges
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            text = (await client.get("/metrics")).text
    finally:
        proc.terminate()
        proc.wait(30)
        proc.kill()
    assert sample(text, "idv_messages_consumed_total") == 47
    assert sample(text, "idv_messages_finished_total", disposition="completed") == 40
    assert sample(text, "idv_messages_finished_total", disposition="completed", status="declined") == 8
    assert sample(text, "idv_messages_finished_total", disposition="duplicate") == 6
    assert sample(text, "idv_messages_finished_total", disposition="invalid") == 1
    assert sample(text, "idv_dead_letters_total", reason="invalid_json") == 1
    assert sample(text, "idv_provider_calls_total", status="200") == 40
    assert sample(text, "idv_provider_call_duration_seconds_count") == 40
    assert sample(text, "idv_consumer_lag") == 0
    assert sample(text, "idv_committed_offset") == 47
    assert sample(text, "idv_store_operation_duration_seconds_count", op="claim") == 46
    assert sample(text, "idv_circuit_breaker_state") == 0


async def test_logs_never_contain_the_api_key_or_personal_data(
    kafka_bootstrap: str, topic: str, sb: Sandbox, sqlite_url: str, tmp_path: Path, group: str
) -> None:
    """A full run at DEBUG, with retries, conflicts and bad input: no secret, name or document number."""
    sb.faults(script=["500", "drop", "429:1"])
    name, doc, dob = "Marguerite Oyelaran-Steinfeld", "X9K4471203Z", "1987-03-14"
    envs = [
        Envelope(
            message_id=f"pii-{i}",
            operation="aml_screening",
            subject_id="subject-p",
            request={"full_name": name, "document_number": doc, "date_of_birth": dob},
        )
        for i in range(5)
    ]
    envs.append(
        Envelope(
            message_id="pii-idv",
            operation="id_verification",
            subject_id="subject-p",
            request={"document_type": "passport", "front_image": "aGVsbG8=", "document_number": doc},
        )
    )
    conflict = Envelope(
        message_id="pii-0",
        operation="aml_screening",
        subject_id="subject-p",
        request={"full_name": name + " Jr", "document_number": doc},
    )
    bad = Envelope(
        message_id="pii-bad", operation="aml_screening", subject_id="subject-p", request={"full_name": name}
    ).to_dict()
    bad["schema_version"] = 99
    import orjson

    from tests.consumer.conftest import publish_raw

    await publish(kafka_bootstrap, topic, [*envs, conflict])
    await publish_raw(
        kafka_bootstrap,
        topic,
        [
            (b"subject-p", orjson.dumps(bad), []),
            (b"subject-p", b'{"full_name": "' + name.encode() + b'"', []),
        ],
    )
    env = daemon_env(kafka_bootstrap, topic, group, sqlite_url, sb.url, log_level="DEBUG")
    env.pop("IDV_PROVIDER_API_KEY")
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY)
    env["IDV_PROVIDER_API_KEY_FILE"] = str(key_file)
    proc = await run_to_end(env, tmp_path / "d.log", timeout=60)
    log = proc.log()
    assert "outcome recorded" in log and "dead-lettered" in log  # the run did log its work
    for secret in (API_KEY, name, "Oyelaran", doc, dob, "aGVsbG8="):
        assert secret not in log, f"{secret!r} leaked into the logs"
