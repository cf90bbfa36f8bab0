"""The webhook intake over real HTTP against the real broker.

What reached Kafka is read back with an independent client (kcat), never with the intake's own producer:
an accepted delivery is on the topic exactly as sent; a rejected one is not there at all; a broker that
cannot acknowledge gets the provider a 503, never a 2xx; duplicates pass through.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from consumer.webhooks import (
    EventPublisher,
    Intake,
    WebhookMetrics,
    WebhookService,
    WebhookSettings,
    WebhookVerifier,
    sign_raw,
    sign_v2,
)
from tests.conftest import create_topic, random_topic_name, service_missing
from tests.loopback import serve

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

SECRET = "intake-test-secret-3f9a0c"
PREVIOUS = "intake-test-previous-81d2"


def kcat_read(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every record of ``topic``, read from the beginning to the end by kcat (JSON envelope per line)."""
    kcat = shutil.which("kcat")
    if kcat is None:
        service_missing("kcat", "apt-get install kcat")
        raise AssertionError  # unreachable: service_missing fails or skips
    out = subprocess.run(
        [kcat, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q", "-J"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    for r in records:
        flat = r.get("headers") or []
        r["headers"] = dict(zip(flat[::2], flat[1::2], strict=True))
    return records


def delivery(
    *,
    session_id: str | None = None,
    webhook_type: str = "status.updated",
    status: str = "Approved",
    secret: str = SECRET,
    ts: int | None = None,
    signatures: tuple[str, ...] = ("v2", "raw"),
    **extra: Any,
) -> tuple[bytes, dict[str, str]]:
    """A delivery as Didit sends one; the body is deliberately not canonical (order, spaces, UTF-8) so
    any re-serialisation on the way to Kafka would show."""
    ts = int(time.time()) if ts is None else ts
    payload: dict[str, Any] = {
        "webhook_type": webhook_type,
        "status": status,
        "timestamp": ts,
        "created_at": ts - 3,
        "workflow_id": "wf-intake",
        "vendor_data": "applicant-intake",
        "metadata": {"idv_key": "idv_" + "0" * 32},
        "decision": {"status": status, "id_verifications": [{"first_name": "Zoë", "score": 97.0}]},
        **extra,
    }
    if session_id is not None:
        payload["session_id"] = session_id
    body = json.dumps(payload, ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json", "X-Timestamp": str(ts), "User-Agent": "DiditWebhook/2.0"}
    if "v2" in signatures:
        headers["X-Signature-V2"] = sign_v2(secret, json.loads(body))
    if "raw" in signatures:
        headers["X-Signature"] = sign_raw(secret, body)
    return body, headers


@pytest.fixture
async def events_topic(kafka_bootstrap: str) -> str:
    return await create_topic(kafka_bootstrap, random_topic_name("wh"), 4)


def settings_for(bootstrap: str, topic: str, **overrides: Any) -> WebhookSettings:
    values: dict[str, Any] = dict(
        kafka_bootstrap=bootstrap,
        events_topic=topic,
        webhook_port=0,
        webhook_secret=SECRET,
        webhook_secret_previous=PREVIOUS,
        webhook_publish_timeout_s=5.0,
    )
    values.update(overrides)
    return WebhookSettings(**values)


@asynccontextmanager
async def serving_intake(
    publisher: EventPublisher, **options: Any
) -> AsyncIterator[tuple[str, WebhookMetrics]]:
    """An intake that verifies with ``SECRET`` and publishes through ``publisher`` (``options`` go to
    ``Intake``), alone on a loopback port (no start-up checks); yields the webhook URL and its metrics."""
    metrics = WebhookMetrics(process_metrics=False)
    intake = Intake(WebhookVerifier([SECRET]), publisher, metrics, **options)
    try:
        async with serve(intake.app(), access_log=None, lingering_time=1.0) as base:  # as the service
            yield base + intake.path, metrics
    finally:
        await intake.publisher.stop()


async def timed_post(client: httpx.AsyncClient, url: str) -> tuple[httpx.Response, float]:
    """A fresh signed delivery posted to ``url``: the answer, and how long it took."""
    body, headers = delivery(session_id=str(uuid.uuid4()))
    started = time.monotonic()
    response = await client.post(url, content=body, headers=headers)
    return response, time.monotonic() - started


@asynccontextmanager
async def serving(settings: WebhookSettings) -> AsyncIterator[tuple[WebhookService, httpx.AsyncClient]]:
    async with WebhookService(settings) as service, httpx.AsyncClient(timeout=30) as client:
        yield service, client


async def test_an_accepted_webhook_lands_on_the_topic_exactly_as_sent(
    kafka_bootstrap: str, events_topic: str
) -> None:
    session = str(uuid.uuid4())
    body, headers = delivery(session_id=session)
    async with serving(settings_for(kafka_bootstrap, events_topic)) as (service, client):
        before_ms = int(time.time() * 1000)
        response = await client.post(service.url, content=body, headers=headers)
        after_ms = int(time.time() * 1000)
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "accepted"}
        assert service.intake.metrics.count("accepted") == 1

    (record,) = kcat_read(kafka_bootstrap, events_topic)
    assert record["key"] == session
    assert record["payload"].encode("utf-8") == body  # not re-serialised: the bytes as received
    headers_seen = record["headers"]
    assert headers_seen.keys() == {"idv-provider", "idv-event-type", "idv-received-at"}
    assert headers_seen["idv-provider"] == "didit"
    assert headers_seen["idv-event-type"] == "status.updated"
    assert before_ms <= int(headers_seen["idv-received-at"]) <= after_ms


async def test_a_bad_signature_never_reaches_kafka(kafka_bootstrap: str, events_topic: str) -> None:
    session = str(uuid.uuid4())
    good_body, good_headers = delivery(session_id=session)
    tampered = good_body.replace(b'"Approved"', b'"Declined"', 1)
    _, unknown_secret = delivery(session_id=session, secret="not-the-secret")
    stale_body, stale_headers = delivery(session_id=session, ts=int(time.time()) - 3600)
    simple_only = {k: v for k, v in good_headers.items() if not k.startswith("X-Signature")}
    simple_only["X-Signature-Simple"] = "0" * 64
    non_json = b"definitely { not json"
    non_json_headers = {**good_headers, "X-Signature": sign_raw(SECRET, non_json)}
    del non_json_headers["X-Signature-V2"]
    attempts = [
        (tampered, good_headers, 401, "bad_signature"),
        (good_body, unknown_secret, 401, "bad_signature"),
        (stale_body, stale_headers, 401, "stale_timestamp"),
        (good_body, {k: v for k, v in good_headers.items() if k != "X-Timestamp"}, 401, "missing_timestamp"),
        (good_body, simple_only, 401, "missing_signature"),
        (non_json, non_json_headers, 400, "invalid_json"),  # signed, but not JSON: still never published
    ]
    async with serving(settings_for(kafka_bootstrap, events_topic)) as (service, client):
        for body, headers, status, reason in attempts:
            response = await client.post(service.url, content=body, headers=headers)
            assert (response.status_code, response.json()) == (status, {"error": reason})
        metrics = service.intake.metrics
        assert metrics.count("bad_signature") == 2 and metrics.count("accepted") == 0
        # A marker the reader must find: proves it reads the topic, so finding nothing else means something.
        marker_body, marker_headers = delivery(session_id="marker-" + session)
        assert (
            await client.post(service.url, content=marker_body, headers=marker_headers)
        ).status_code == 200

    records = kcat_read(kafka_bootstrap, events_topic)
    assert [r["key"] for r in records] == ["marker-" + session]


async def test_an_unreachable_broker_is_a_503_within_the_timeout_and_nothing_acknowledged() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    publisher = EventPublisher(dead, "idv.provider-events", timeout_s=2.0)
    async with serving_intake(publisher) as (url, metrics), httpx.AsyncClient(timeout=30) as client:
        response, elapsed = await timed_post(client, url)
        ready = await client.get(url.replace("/webhooks/didit", "/readyz"))
    assert response.status_code == 503 and response.json() == {"error": "not_durable"}
    assert elapsed < 2.0 + 3.0  # the timeout, plus slack for a loaded test machine
    assert (metrics.count("not_durable"), metrics.count("accepted")) == (1, 0)
    assert ready.status_code == 503


async def test_no_acknowledgement_in_time_is_a_503(kafka_bootstrap: str) -> None:
    # The broker is up but cannot acknowledge: the topic is not there (auto-creation is off).
    missing = random_topic_name("wh-missing")
    publisher = EventPublisher(kafka_bootstrap, missing, timeout_s=2.0)
    await publisher.start()
    async with serving_intake(publisher) as (url, metrics), httpx.AsyncClient(timeout=30) as client:
        response, elapsed = await timed_post(client, url)
    assert response.status_code == 503
    assert 1.5 < elapsed < 2.0 + 3.0
    assert metrics.count("accepted") == 0


async def test_duplicate_deliveries_are_passed_through(kafka_bootstrap: str, events_topic: str) -> None:
    session = str(uuid.uuid4())
    body, headers = delivery(session_id=session)
    async with serving(settings_for(kafka_bootstrap, events_topic)) as (service, client):
        for _ in range(3):
            assert (await client.post(service.url, content=body, headers=headers)).status_code == 200
    records = kcat_read(kafka_bootstrap, events_topic)
    assert len(records) == 3
    assert {r["key"] for r in records} == {session}
    assert {r["payload"].encode() for r in records} == {body}
    assert len({r["partition"] for r in records}) == 1  # keyed by session: one partition, in order
    assert [r["offset"] for r in records] == sorted(r["offset"] for r in records)


async def test_a_delivery_signed_with_the_previous_secret_is_accepted(
    kafka_bootstrap: str, events_topic: str
) -> None:
    session = str(uuid.uuid4())
    body, headers = delivery(session_id=session, secret=PREVIOUS, signatures=("v2",))
    async with serving(settings_for(kafka_bootstrap, events_topic)) as (service, client):
        assert (await client.post(service.url, content=body, headers=headers)).status_code == 200
        metrics = (await client.get(service.url.rsplit("/webhooks", 1)[0] + "/metrics")).text
    assert "idv_webhooks_previous_secret_total 1.0" in metrics
    assert [r["key"] for r in kcat_read(kafka_bootstrap, events_topic)] == [session]


async def test_http_checks_before_the_signature(kafka_bootstrap: str, events_topic: str) -> None:
    settings = settings_for(kafka_bootstrap, events_topic, webhook_max_body_bytes=4096)
    session = str(uuid.uuid4())
    big_body, big_headers = delivery(session_id=session, padding="x" * 5000)
    body, headers = delivery(session_id=session)
    no_session_body, no_session_headers = delivery(webhook_type="user.status.updated")
    async with serving(settings) as (service, client):
        assert (await client.post(service.url, content=big_body, headers=big_headers)).status_code == 413

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies while reading
            for i in range(0, len(big_body), 1000):
                yield big_body[i : i + 1000]

        streamed = await client.post(service.url, content=chunks(), headers=big_headers)
        assert streamed.status_code == 413
        text_plain = {**headers, "Content-Type": "text/plain"}
        assert (await client.post(service.url, content=body, headers=text_plain)).status_code == 415
        assert (await client.get(service.url)).status_code == 405
        ignored = await client.post(service.url, content=no_session_body, headers=no_session_headers)
        assert (ignored.status_code, ignored.json()) == (200, {"status": "ignored"})
        base = service.url.rsplit("/webhooks", 1)[0]
        assert (await client.get(base + "/healthz")).status_code == 200
        assert (await client.get(base + "/readyz")).json() == {"ready": True, "reasons": []}
        metrics = (await client.get(base + "/metrics")).text
    for line in (
        'idv_webhooks_received_total{result="too_large"} 2.0',
        'idv_webhooks_received_total{result="unsupported_media_type"} 1.0',
        'idv_webhooks_received_total{result="ignored"} 1.0',
        'idv_webhooks_received_total{result="accepted"} 0.0',
    ):
        assert line in metrics
    assert kcat_read(kafka_bootstrap, events_topic) == []


async def test_a_drain_finishes_the_request_in_flight_then_closes(
    kafka_bootstrap: str, events_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM's order: stop accepting, let the request already received finish its produce and get its
    2xx, then close the producer."""
    session = str(uuid.uuid4())
    body, headers = delivery(session_id=session)
    service = WebhookService(settings_for(kafka_bootstrap, events_topic))
    await service.start()
    inside, release = anyio.Event(), anyio.Event()
    real_publish = service.publisher.publish

    async def slow_publish(*args: Any) -> tuple[int, int]:
        inside.set()
        await release.wait()
        return await real_publish(*args)

    monkeypatch.setattr(service.publisher, "publish", slow_publish)
    url, port = service.url, service.port
    results: dict[str, Any] = {}

    async def post() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            results["response"] = await client.post(url, content=body, headers=headers)

    async with anyio.create_task_group() as tg:
        tg.start_soon(post)
        await inside.wait()
        tg.start_soon(service.stop)
        await anyio.sleep(0.3)
        # Draining: no new connections, and the producer is still open for the request in flight.
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        assert service.intake.draining and service.publisher.ready
        release.set()
    assert results["response"].status_code == 200
    assert not service.publisher.ready
    assert [r["key"] for r in kcat_read(kafka_bootstrap, events_topic)] == [session]


async def _topic_with(bootstrap: str, configs: dict[str, str]) -> str:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    name = random_topic_name("wh-cfg")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs=configs)])
    finally:
        await admin.close()
    return name


async def test_2xx_only_after_the_broker_acknowledged(kafka_bootstrap: str) -> None:
    # The broker refuses the record after the producer queued it (larger than the topic takes, smaller
    # than the producer's own limit): an answer sent on "queued" instead of "acknowledged" would be a 2xx.
    topic = await _topic_with(kafka_bootstrap, {"max.message.bytes": "1024"})
    body, headers = delivery(session_id=str(uuid.uuid4()), padding="p" * 2048)
    settings = settings_for(kafka_bootstrap, topic, webhook_publish_timeout_s=3.0)
    async with serving(settings) as (service, client):
        response = await client.post(service.url, content=body, headers=headers)
        assert response.status_code == 503
        assert service.intake.metrics.count("accepted") == 0
    assert kcat_read(kafka_bootstrap, topic) == []


def test_the_events_producer_waits_for_every_in_sync_replica() -> None:
    # Not observable on a one-broker test cluster: Kafka 4.x caps min.insync.replicas at the replication
    # factor (KIP-966), so acks=1 and acks=all both succeed there. The settings themselves are the check.
    options = EventPublisher("127.0.0.1:9092", "t")._options
    assert (options["acks"], options["enable_idempotence"]) == ("all", True)


async def test_a_trickling_body_is_cut_off_with_408() -> None:
    async with serving_intake(EventPublisher("127.0.0.1:1", "t"), read_timeout_s=0.5) as (url, metrics):
        port = int(url.split(":")[2].split("/")[0])
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            await stream.send(
                b"POST /webhooks/didit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"partial":'
            )
            started = time.monotonic()
            with anyio.fail_after(10):
                answer = await stream.receive()
            elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:40]
    assert 0.4 < elapsed < 5
    assert metrics.count("read_timeout") == 1
