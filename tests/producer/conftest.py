"""Fixtures for the producer tests: read a topic back with an independent consumer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from tests.conftest import create_topic, delete_topics, random_topic_name


@pytest.fixture
def topic(kafka_bootstrap: str) -> Iterator[str]:
    """A fresh topic (as tests/conftest.py's), made outside the anyio plugin's event loop: the CLI under
    test runs its own, and ``anyio.run`` refuses to start while the plugin holds one for an async fixture."""
    name = random_topic_name()
    asyncio.run(create_topic(kafka_bootstrap, name, 8, with_sinks=True))
    yield name
    asyncio.run(delete_topics(kafka_bootstrap, [name, f"{name}.dlq", f"{name}.results"]))


ReadTopic = Callable[[str, int], Awaitable[list[ConsumerRecord[bytes, bytes]]]]


UNKNOWN_TOPIC_OR_PARTITION = 3


async def partition_ids(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list[int]:
    # A topic created a moment ago may not be in the metadata of the broker asked yet (seen under load
    # when nothing was published to it): ask again for a while before calling it missing.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    deadline = time.monotonic() + timeout_s
    try:
        [description] = await admin.describe_topics([topic])
        while description["error_code"] == UNKNOWN_TOPIC_OR_PARTITION and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            [description] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert description["error_code"] == 0, description
    return sorted(p["partition"] for p in description["partitions"])


async def read_records(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from the beginning, once ``expected`` have arrived.

    Reads to the end offsets as well, so a test also sees records it did not expect.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await partition_ids(bootstrap, topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            end = await consumer.end_offsets(partitions)
            positions = {tp: await consumer.position(tp) for tp in partitions}
            if len(records) >= expected and all(positions[tp] >= end[tp] for tp in partitions):
                break
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        await consumer.stop()


@pytest.fixture
def read_topic(kafka_bootstrap: str) -> ReadTopic:
    async def read(topic: str, expected: int) -> list[ConsumerRecord[bytes, bytes]]:
        return await read_records(kafka_bootstrap, topic, expected)

    return read


@pytest.fixture
def read_topic_sync(kafka_bootstrap: str) -> Callable[[str, int], list[ConsumerRecord[bytes, bytes]]]:
    """For synchronous tests (the CLI runs its own event loop)."""

    def read(topic: str, expected: int) -> list[ConsumerRecord[bytes, bytes]]:
        return asyncio.run(read_records(kafka_bootstrap, topic, expected))

    return read
