"""The fetcher around a record aiokafka cannot read, on the real broker with records written by kcat:
nothing another partition had drained in the failed ``getmany`` may be lost, including on the very first
fetch after assignment, when no partition has a fetch position yet (seed 14 of the record fuzz: a partition
whose 38 records were drained by the failing call never reached the daemon, which then waited forever).
"""

from __future__ import annotations

import subprocess
import uuid

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.fetch import Fetcher
from consumer.flow import Flow
from consumer.unreadable import UnreadableRecord
from tests.conftest import create_topic, random_topic_name
from tests.consumer.test_hostile_records import kcat

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

GOOD = 40  # readable records in the partition without the bad one


def kcat_unreadable(bootstrap: str, topic: str, partition: int) -> None:
    """One unkeyed record whose header key is not UTF-8 (aiokafka raises while iterating the batch)."""
    args: list[str | bytes] = [kcat(), "-b", bootstrap, "-P", "-t", topic, "-p", str(partition)]
    args += ["-H", b"\xc3\x28bad=1"]
    subprocess.run(args, input=b"unreadable\n", check=True, timeout=30, capture_output=True)


async def drain(
    fetcher: Fetcher, flow: Flow, want: int, seconds: float
) -> tuple[dict[int, list[int]], list[tuple[int, int]]]:
    """Fetch until ``want`` records (stubs included) reached the flow: their offsets by partition, and the
    (partition, offset) of each :class:`UnreadableRecord` among them."""
    seen: dict[int, list[int]] = {}
    stubs: list[tuple[int, int]] = []
    with anyio.move_on_after(seconds):
        while sum(map(len, seen.values())) < want:
            batch = await fetcher.getmany(timeout_ms=200, max_records=1000)
            await flow.dispatch_batch(batch)
            while True:
                try:
                    part, lane, msg = flow.ready.receive_nowait()
                except anyio.WouldBlock:
                    break
                seen.setdefault(msg.partition, []).append(msg.offset)
                if isinstance(msg, UnreadableRecord):
                    stubs.append((msg.partition, msg.offset))
                flow.finish(part, lane)
    return seen, stubs


@pytest.mark.parametrize("wait_s", [10.0, 0.0], ids=["positions-awaited", "positions-unknown"])
@pytest.mark.parametrize("bad_partition", [0, 1])
async def test_the_first_fetch_after_assignment_loses_nothing_to_an_unreadable_record(
    kafka_bootstrap: str, bad_partition: int, wait_s: float
) -> None:
    """Either partition may come first in the fetch response; with the bad record in each in turn, one of
    the two runs has the failing call drain the good partition before it meets the bad record. With no
    wait for the positions (``positions-unknown``) the fetcher must rewind a partition it never had a
    position for (nothing dispatched, nothing committed: to where ``earliest`` resets it)."""
    topic = random_topic_name()
    await create_topic(kafka_bootstrap, topic, 2)
    good_partition = 1 - bad_partition
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(GOOD):
            await producer.send(topic, b"good-%d" % i, partition=good_partition)
        await producer.send_and_wait(topic, b"before", partition=bad_partition)
    finally:
        await producer.stop()
    kcat_unreadable(kafka_bootstrap, topic, bad_partition)

    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id="g-" + uuid.uuid4().hex[:8],
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    flow = Flow(1000)
    flow.open()
    try:
        tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
        flow.consumer = consumer
        flow.assign(tps)
        consumer.assign(tps)  # no fetch position yet: the first getmany runs while they are reset
        fetcher = Fetcher(consumer, flow, max_records=1000, position_wait_s=wait_s)
        seen, stubs = await drain(fetcher, flow, GOOD + 2, 20)
    finally:
        flow.close()
        await consumer.stop()
    assert sorted(seen.get(good_partition, [])) == list(range(GOOD)), "records lost in the failed fetch"
    assert sorted(seen.get(bad_partition, [])) == [0, 1], "the bad record's partition (record, stub)"
    assert stubs == [(bad_partition, 1)], "the bad record comes as its stub"
