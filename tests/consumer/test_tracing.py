"""OpenTelemetry tracing (consumer/tracing.py): trace context from the request's headers, one span per
message with its children, the trace continued on the result and dead-letter records, no payload in spans.

Needs the ``tracing`` extra (scripts/test.sh installs it): skipped locally without it, a failure under CI.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any

import anyio
import orjson
import pytest

from consumer import tracing
from consumer.errors import ConfigurationError
from consumer.settings import Settings
from producer.envelope import Envelope, encode
from producer.publisher import Publisher
from tests.consumer.conftest import FINGERPRINT_KEY, Sandbox, publish_raw, read_all

if not tracing.available():
    if os.environ.get("CI"):
        pytest.fail("the tracing extra is missing: pip install -e '.[tracing]'", pytrace=False)
    pytest.skip("the tracing extra is not installed (pip install -e '.[tracing]')", allow_module_level=True)

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = pytest.mark.anyio

SECRET_NAME = "Jane Tracer-Roe"  # the payload: must appear in no span
SUBJECT = "subject-traced-7"


def traceparent(headers: Any) -> str | None:
    values = [v.decode() for k, v in headers or () if k == "traceparent"]
    assert len(values) <= 1, values
    return values[0] if values else None


async def read_records(bootstrap: str, topic: str, n: int) -> list[Any]:
    """The first ``n`` committed records of ``topic`` (a transactional topic's end offsets count its
    transaction markers, so read_all's "up to the end offsets" would wait for records that never come)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    out: list[Any] = []
    try:
        with anyio.fail_after(30):
            while len(out) < n:
                batch = await consumer.getmany(timeout_ms=500)
                out.extend(m for msgs in batch.values() for m in msgs)
    finally:
        await consumer.stop()
    return out


def trace_id_of(tp: str) -> str:
    return tp.split("-")[1]


def assert_no_payload(spans: list[ReadableSpan]) -> None:
    for s in spans:
        text = repr(dict(s.attributes or {})) + s.name + repr([e.attributes for e in s.events])
        assert SECRET_NAME not in text and SUBJECT not in text, (s.name, text)


def test_everything_is_a_no_op_while_tracing_is_off() -> None:
    assert not tracing.enabled()
    headers = [("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")]
    assert tracing.inject(headers) is headers
    with tracing.span("idv.provider") as span, tracing.store_span("claim"):
        span.set_attribute("x", 1)
    tracing.annotate("aml_screening", "key")
    assert tracing.build(Settings(provider_api_key="x", fingerprint_key=FINGERPRINT_KEY)) is None


def test_tracing_on_without_the_extra_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "available", lambda: False)
    # At start-up, as one line naming the variable (exit code 2), before anything is opened.
    env = {"IDV_PROVIDER_API_KEY": "x", "IDV_FINGERPRINT_KEY": FINGERPRINT_KEY, "IDV_TRACING": "true"}
    with pytest.raises(ConfigurationError, match=r"^IDV_TRACING: needs the tracing extra"):
        Settings.from_env(env)
    with pytest.raises(ConfigurationError, match=r"IDV_TRACING=true needs the tracing extra"):
        tracing.build(Settings(provider_api_key="x", fingerprint_key=FINGERPRINT_KEY, tracing=True))


def test_the_setting_reads_from_the_environment() -> None:
    env = {"IDV_PROVIDER_API_KEY": "x", "IDV_FINGERPRINT_KEY": FINGERPRINT_KEY, "IDV_TRACING": "true"}
    assert Settings.from_env(env).tracing is True


@pytest.mark.kafka
@pytest.mark.parametrize("transactional", [False, True], ids=["plain", "transactional"])
async def test_spans_continue_the_request_trace_and_go_on_to_result_and_dead_letter(
    kafka_bootstrap: str, topic: str, sandbox: object, sqlite_url: str, transactional: bool
) -> None:
    from tests.consumer.test_exactly_once import run_until_committed, settings_for

    sb = Sandbox(sandbox.url)  # type: ignore[attr-defined]
    group = "g-" + uuid.uuid4().hex[:8]
    settings = settings_for(
        kafka_bootstrap, topic, group, sqlite_url, sb.url, results_transactional=transactional
    )
    exporter = InMemorySpanExporter()
    async with tracing.session(dataclasses.replace(settings, tracing=True), exporter=exporter) as tr:
        assert tr is not None and tracing.enabled()
        # The upstream service: publishes inside its own span; the publisher puts its context in headers.
        with tr.span("upstream.request") as upstream:
            async with Publisher(kafka_bootstrap, topic) as publisher:
                await publisher.publish("aml_screening", {"full_name": SECRET_NAME}, SUBJECT)
        up = upstream.get_span_context()
        # A record another client wrote by hand with a traceparent, which is not valid JSON: dead-lettered.
        foreign_trace, foreign_parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        bad_tp = f"00-{foreign_trace}-{foreign_parent}-01".encode()
        await publish_raw(
            kafka_bootstrap, topic, [(SUBJECT.encode(), b'{"not json', [("traceparent", bad_tp)])]
        )
        await run_until_committed(settings)
    assert not tracing.enabled()
    spans = [s for s in exporter.get_finished_spans() if s.name != "upstream.request"]
    by_trace: dict[int, list[ReadableSpan]] = {}
    for s in spans:
        assert s.context is not None
        by_trace.setdefault(s.context.trace_id, []).append(s)

    # The published request: its trace is the upstream span's, idv.process its direct child.
    ok = by_trace[up.trace_id]
    (process,) = [s for s in ok if s.name == "idv.process"]
    assert process.parent is not None and process.parent.span_id == up.span_id
    attrs = dict(process.attributes or {})
    assert attrs["messaging.destination.name"] == topic
    assert attrs["messaging.consumer.group.name"] == group
    assert {"messaging.destination.partition.id", "messaging.kafka.offset"} <= set(attrs)
    assert attrs["idv.operation"] == "aml_screening"
    assert len(str(attrs["idv.key_hash"])) == 12
    assert attrs["idv.disposition"] == "completed"
    # Transactional: the result is written later, by the commit's transaction (no idv.result span).
    expected = {"idv.claim", "idv.provider", "idv.record"} | (set() if transactional else {"idv.result"})
    assert expected <= {s.name for s in ok}, {s.name for s in ok}
    children = {s.name for s in ok if s.parent is not None and s.parent.span_id == process.context.span_id}
    assert expected <= children
    # The aiohttp client instrumentation sees consumer/http.py's transport: one CLIENT span per attempt.
    (provider,) = [s for s in ok if s.name == "idv.provider"]
    http = [s for s in ok if s.parent is not None and s.parent.span_id == provider.context.span_id]
    assert http and http[0].name.startswith("POST"), [s.name for s in http]
    http_attrs = dict(http[0].attributes or {})
    assert http_attrs.get("http.status_code", http_attrs.get("http.response.status_code")) == 200

    # The dead-lettered record continues the trace its own header named.
    bad = by_trace[int(foreign_trace, 16)]
    (bad_process,) = [s for s in bad if s.name == "idv.process"]
    assert bad_process.parent is not None and bad_process.parent.span_id == int(foreign_parent, 16)
    assert dict(bad_process.attributes or {})["idv.disposition"] == "invalid"
    (dead,) = [s for s in bad if s.name == "idv.dead_letter"]
    assert dict(dead.attributes or {})["idv.dlq.reason"] == "invalid_json"
    assert_no_payload(spans)

    # Result and dead-letter records carry a traceparent of the same trace, naming their producer span.
    (result,) = await read_records(kafka_bootstrap, f"{topic}.results", 1)
    result_tp = traceparent(result.headers)
    assert result_tp is not None and trace_id_of(result_tp) == f"{up.trace_id:032x}"
    # Its parent: the idv.result span, or with transactions the message's idv.process span.
    (result_span,) = [s for s in ok if s.name == ("idv.process" if transactional else "idv.result")]
    assert result_tp.split("-")[2] == f"{result_span.context.span_id:016x}"
    assert orjson.loads(result.value)["status"]
    (letter,) = await read_all(kafka_bootstrap, f"{topic}.dlq")
    letter_tp = traceparent(letter.headers)  # replaced, not added next to the original one
    assert letter_tp is not None and trace_id_of(letter_tp) == foreign_trace
    assert letter_tp.split("-")[2] == f"{dead.context.span_id:016x}"


@pytest.mark.kafka
async def test_without_tracing_the_records_keep_the_original_trace_context(
    kafka_bootstrap: str, topic: str, sandbox: object, sqlite_url: str
) -> None:
    from tests.consumer.test_exactly_once import run_until_committed, settings_for

    sb = Sandbox(sandbox.url)  # type: ignore[attr-defined]
    tp = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01".encode()
    await publish_raw(kafka_bootstrap, topic, [(b"k", b"not json", [("traceparent", tp)])])
    env = Envelope(
        message_id=f"m-{uuid.uuid4()}", operation="aml_screening", subject_id="s", request={"full_name": "A"}
    )
    await publish_raw(kafka_bootstrap, topic, [(env.key, encode(env), env.headers())])
    group = "g-" + uuid.uuid4().hex[:8]
    await run_until_committed(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url))
    (letter,) = await read_all(kafka_bootstrap, f"{topic}.dlq")
    assert traceparent(letter.headers) == tp.decode()
    (result,) = await read_all(kafka_bootstrap, f"{topic}.results")
    assert traceparent(result.headers) is None


def test_odd_trace_headers_start_a_new_trace_and_injection_replaces_the_old_context() -> None:
    from aiokafka.structs import ConsumerRecord
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = tracing.Tracer(provider, group_id="g")
    old = b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"
    odd = [("traceparent", b"\xff\xfe garbage"), ("TRACEPARENT", None), ("tracestate", b"\x00")]
    for headers in (odd, [("traceparent", old), ("traceparent", old)], []):
        msg = ConsumerRecord("t", 0, 5, 0, 0, b"k", b"v", None, 1, 1, tuple(headers))
        tracing.install(tracer)
        try:
            with tracing.message(msg):
                out = tracing.inject([("idv-message-id", b"m"), ("traceparent", old), ("tracestate", b"x=1")])
        finally:
            tracing.uninstall()
        assert [k for k, _ in out] == ["idv-message-id", "traceparent"]
        assert out[1][1] != old
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["idv.process"] * 3
    assert spans[0].parent is None and spans[2].parent is None  # garbage, none: a new trace
    assert spans[1].parent is not None and spans[1].parent.span_id == int("b" * 16, 16)  # the first one


@pytest.mark.kafka
async def test_the_daemon_turns_tracing_on_from_its_settings(
    kafka_bootstrap: str, topic: str, sandbox: object, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.consumer.test_exactly_once import run_until_committed, settings_for

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")  # spans are made and propagated, not exported
    sb = Sandbox(sandbox.url)  # type: ignore[attr-defined]
    env = Envelope(
        message_id=f"m-{uuid.uuid4()}", operation="aml_screening", subject_id="s", request={"full_name": "A"}
    )
    await publish_raw(kafka_bootstrap, topic, [(env.key, encode(env), env.headers())])
    group = "g-" + uuid.uuid4().hex[:8]
    await run_until_committed(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url, tracing=True))
    assert not tracing.enabled()  # removed again when the daemon stopped
    (result,) = await read_all(kafka_bootstrap, f"{topic}.results")
    assert traceparent(result.headers) is not None  # a new trace: the request had none
