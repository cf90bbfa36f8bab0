"""Publisher against the real local broker, read back with aiokafka and with kcat."""

from __future__ import annotations

import base64
import shutil
import ssl
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import orjson
import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord

from producer.envelope import HEADER_MESSAGE_ID, HEADER_OPERATION, HEADER_SCHEMA_VERSION, Envelope, decode
from producer.errors import EnvelopeError, EnvelopeTooLarge, PublishError
from producer.publisher import Publisher, PublishResult
from producer.samples import sample_envelopes
from tests.conftest import service_missing

ReadTopic = Callable[[str, int], Awaitable[list[ConsumerRecord[bytes, bytes]]]]


def envelope(n: int, subject: str = "applicant-1", **request: str) -> Envelope:
    return Envelope(
        message_id=f"msg-{n:05d}",
        operation="aml_screening",
        subject_id=subject,
        request={"full_name": f"Sample Person {n}", **request},
    )


# ------------------------------------------------------------------------------ without a broker


def test_config_fixes_idempotence_and_acks_all() -> None:
    config = Publisher("h1:9092", "t").producer_config
    assert config["enable_idempotence"] is True
    assert config["acks"] == "all"
    assert config["bootstrap_servers"] == "h1:9092"


def test_config_passes_security_settings_and_masks_the_password() -> None:
    context = ssl.create_default_context()
    publisher = Publisher(
        ["h1:9093", "h2:9093"],
        "t",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="svc",
        sasl_plain_password="fake-password-for-test",
        ssl_context=context,
    )
    config = publisher.producer_config
    assert config["bootstrap_servers"] == ["h1:9093", "h2:9093"]
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["sasl_plain_username"] == "svc"
    assert config["sasl_plain_password"] == "***"
    assert config["ssl_context"] is context
    assert "fake-password-for-test" not in repr(publisher)
    assert publisher._config["sasl_plain_password"] == "fake-password-for-test"


def test_request_size_leaves_room_for_key_and_headers() -> None:
    config = Publisher(max_message_bytes=1000).producer_config
    assert config["max_request_size"] > 1000 + 256


def test_extra_producer_options_pass_through() -> None:
    config = Publisher(producer_options={"linger_ms": 5, "compression_type": "gzip"}).producer_config
    assert (config["linger_ms"], config["compression_type"]) == (5, "gzip")


@pytest.mark.parametrize("name", ["enable_idempotence", "acks", "transactional_id", "value_serializer"])
def test_options_deciding_the_guarantee_cannot_be_overridden(name: str) -> None:
    with pytest.raises(ValueError, match=f"producer_options may not set {name}"):
        Publisher(producer_options={name: None})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topic": ""}, "topic must not be empty"),
        ({"max_message_bytes": 0}, "max_message_bytes must be positive"),
        ({"window": 0}, "window must be positive"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Publisher(**kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_publishing_before_start_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        await Publisher().publish_envelope(envelope(1))


@pytest.mark.anyio
async def test_unreachable_broker_is_a_retriable_publish_error() -> None:
    with pytest.raises(PublishError) as info:
        async with Publisher("127.0.0.1:1", "t"):
            pass
    assert info.value.retriable
    assert isinstance(info.value.__cause__, KafkaConnectionError)
    assert "Unable to bootstrap" in str(info.value)


@pytest.mark.anyio
async def test_invalid_input_fails_before_reaching_the_producer() -> None:
    # No broker needed: validation happens in Envelope, not in Kafka.
    with pytest.raises(EnvelopeError, match="subject_id is missing or empty"):
        await Publisher().publish("aml_screening", {"full_name": "x"}, "")


# ---------------------------------------------------------------------------------- with a broker


@pytest.fixture
async def publisher(kafka_bootstrap: str, topic: str) -> AsyncIterator[Publisher]:
    """A started publisher to ``topic`` with the defaults; closed after the test."""
    async with Publisher(kafka_bootstrap, topic) as started:
        yield started


@pytest.mark.kafka
@pytest.mark.anyio
async def test_publish_waits_for_the_ack_and_reports_where(
    publisher: Publisher, topic: str, read_topic: ReadTopic
) -> None:
    result = await publisher.publish(
        "aml_screening", {"full_name": "Sample Person"}, "applicant-7", correlation_id="checkout-1"
    )
    assert isinstance(result, PublishResult)
    assert uuid.UUID(result.message_id).version == 7
    assert result.topic == topic
    [record] = await read_topic(topic, 1)
    assert (record.partition, record.offset) == (result.partition, result.offset)
    assert record.key == b"applicant-7"
    assert dict(record.headers) == {
        HEADER_MESSAGE_ID: result.message_id.encode(),
        HEADER_OPERATION: b"aml_screening",
        HEADER_SCHEMA_VERSION: b"1",
    }
    assert record.value is not None
    env = decode(record.value, list(record.headers))
    assert env.message_id == result.message_id
    assert env.subject_id == "applicant-7"
    assert env.correlation_id == "checkout-1"
    assert env.request == {"full_name": "Sample Person"}


@pytest.mark.kafka
@pytest.mark.anyio
async def test_a_supplied_message_id_is_used_on_every_send(
    publisher: Publisher, topic: str, read_topic: ReadTopic
) -> None:
    # An upstream retry re-sends with the same ID; the publisher does not dedupe (the consumer does).
    first = await publisher.publish("aml_screening", {"full_name": "x"}, "s-1", message_id="order-42")
    second = await publisher.publish("aml_screening", {"full_name": "x"}, "s-1", message_id="order-42")
    assert first.message_id == second.message_id == "order-42"
    assert first.partition == second.partition
    assert second.offset == first.offset + 1
    records = await read_topic(topic, 2)
    assert [decode(r.value).message_id for r in records] == ["order-42", "order-42"]


@pytest.mark.kafka
@pytest.mark.anyio
async def test_publish_envelope_sends_the_envelope_unchanged(
    publisher: Publisher, topic: str, read_topic: ReadTopic
) -> None:
    env = envelope(1)
    result = await publisher.publish_envelope(env)
    assert result.message_id == env.message_id
    [record] = await read_topic(topic, 1)
    assert decode(record.value, list(record.headers)) == env


@pytest.mark.kafka
@pytest.mark.anyio
async def test_publish_many_over_several_windows_keeps_order_per_subject(
    kafka_bootstrap: str, topic: str, read_topic: ReadTopic
) -> None:
    envelopes = sample_envelopes(2500, seed=1, duplicate_ratio=0.05)
    async with Publisher(kafka_bootstrap, topic, window=1000) as publisher:
        results = await publisher.publish_many(iter(envelopes))
    assert [r.message_id for r in results] == [e.message_id for e in envelopes]
    assert len({(r.partition, r.offset) for r in results}) == 2500
    assert len({r.partition for r in results}) > 1

    records = await read_topic(topic, 2500)
    assert len(records) == 2500
    by_position = {(r.partition, r.offset): r for r in records}
    for env, result in zip(envelopes, results, strict=True):
        record = by_position[(result.partition, result.offset)]
        assert record.key == env.key
        assert decode(record.value, list(record.headers)) == env
    # One subject, one partition, publish order.
    offsets: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for result, env in zip(results, envelopes, strict=True):
        offsets[env.subject_id].append((result.partition, result.offset))
    for positions in offsets.values():
        assert len({p for p, _ in positions}) == 1
        assert positions == sorted(positions)


@pytest.mark.kafka
@pytest.mark.anyio
async def test_publish_many_of_nothing(publisher: Publisher) -> None:
    assert await publisher.publish_many([]) == []


@pytest.mark.kafka
@pytest.mark.anyio
async def test_an_oversized_envelope_stops_its_window_before_anything_is_sent(
    kafka_bootstrap: str, topic: str, read_topic: ReadTopic
) -> None:
    big = envelope(3, padding="x" * 5000)
    batch = [envelope(1), envelope(2), big, envelope(4), envelope(5)]
    async with Publisher(kafka_bootstrap, topic, max_message_bytes=4000, window=2) as publisher:
        with pytest.raises(EnvelopeTooLarge):
            await publisher.publish_many(batch)
        # The publisher stays usable.
        await publisher.publish_envelope(envelope(6))
    records = await read_topic(topic, 3)
    assert sorted(decode(r.value).message_id for r in records) == ["msg-00001", "msg-00002", "msg-00006"]


@pytest.mark.kafka
@pytest.mark.anyio
async def test_broker_rejecting_a_record_is_a_non_retriable_publish_error(
    kafka_bootstrap: str, topic: str
) -> None:
    # Our limit raised above the broker's message.max.bytes (1 MiB by default): the broker says no.
    big = envelope(1, padding="x" * (1536 * 1024))
    async with Publisher(kafka_bootstrap, topic, max_message_bytes=4 * 1024 * 1024) as publisher:
        with pytest.raises(PublishError) as info:
            await publisher.publish_envelope(big)
        assert not info.value.retriable
        assert isinstance(info.value.__cause__, MessageSizeTooLargeError)
        await publisher.publish_envelope(envelope(2))


@pytest.mark.kafka
@pytest.mark.anyio
async def test_a_missing_topic_fails_on_entry(kafka_bootstrap: str) -> None:
    name = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(PublishError, match=f"topic '{name}' not found within 1"):
        async with Publisher(kafka_bootstrap, name, topic_wait_s=1.0):
            pass


@pytest.mark.kafka
@pytest.mark.anyio
async def test_entering_twice_is_refused(kafka_bootstrap: str, topic: str) -> None:
    publisher = Publisher(kafka_bootstrap, topic)
    async with publisher:
        with pytest.raises(RuntimeError, match="already started"):
            await publisher.__aenter__()
    # ...and the publisher can be used again after leaving.
    async with publisher:
        await publisher.publish_envelope(envelope(1))


@pytest.mark.kafka
@pytest.mark.anyio
async def test_kcat_reads_what_was_published(kafka_bootstrap: str, topic: str) -> None:
    """An independent client (librdkafka) sees the key, the headers and a decodable value."""
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if kcat is None:
        service_missing("kcat", "apt-get install -y kcat")
    envelopes = [envelope(n, subject=f"applicant-{n % 3}") for n in range(6)]
    async with Publisher(kafka_bootstrap, topic) as publisher:
        results = await publisher.publish_many(envelopes)
    with anyio.fail_after(60):
        proc = await anyio.run_process(
            [kcat, "-b", kafka_bootstrap, "-C", "-t", topic, "-o", "beginning", "-e", "-q", "-J", "-c", "6"]
        )
    lines = [orjson.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 6
    expected = {r.message_id: (r, e) for r, e in zip(results, envelopes, strict=True)}
    for msg in lines:
        headers = msg["headers"]
        header_map = dict(zip(headers[0::2], headers[1::2], strict=True))
        result, env = expected[header_map[HEADER_MESSAGE_ID]]
        assert (msg["partition"], msg["offset"]) == (result.partition, result.offset)
        assert msg["key"] == env.subject_id
        assert header_map[HEADER_OPERATION] == "aml_screening"
        assert header_map[HEADER_SCHEMA_VERSION] == "1"
        value = msg["payload"].encode() if "payload" in msg else base64.b64decode(msg["payload_b64"])
        assert decode(value) == env
