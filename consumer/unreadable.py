"""Records the Kafka client cannot read: the stub that stands in for one, finding it, and decoding a record.

aiokafka decodes header keys as UTF-8 while it iterates a fetched batch, inside ``getmany``: a header key
that is not UTF-8 (Go and Java clients can write one) raises there, the fetch position stays before the
record, and every later ``getmany`` raises again. The daemon's fetch loop (:mod:`consumer.fetch`) and the
tools' range reader (:func:`consumer.tools.spans.read_spans`) both isolate the record and hand on an
:class:`UnreadableRecord` in its place, which :func:`decode_record` turns into the dead-letter reason
``undecodable_record`` wherever a record is decoded.

**aiokafka internals** (read-only, guarded): :func:`locate_unreadable` reads
``consumer._fetcher._records[tp]._partition_records`` with its ``_records_iterator`` and
``next_fetch_offset``. Checked against aiokafka 0.14; tests/consumer/test_hostile_records.py and
tests/consumer/test_fetch_unreadable.py fail if the read stops working.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from producer.envelope import Envelope, decode
from producer.errors import EnvelopeError

log = logging.getLogger(__name__)

__all__ = [
    "UnreadableRecord",
    "decode_record",
    "getmany_past_unreadable",
    "locate_unreadable",
    "unreadable_stub",
]


@dataclass
class UnreadableRecord(ConsumerRecord):  # type: ignore[misc]
    """Stands in for a record the client could not read: its position only (key, value, headers and
    timestamp are unknown) and why it could not be read."""

    detail: str = ""


def unreadable_stub(tp: TopicPartition, offset: int, exc: BaseException) -> UnreadableRecord:
    detail = (
        f"the Kafka client could not read the record ({type(exc).__name__}, e.g. a header key that "
        "is not UTF-8); key, value, headers and timestamp are unknown"
    )
    return UnreadableRecord(tp.topic, tp.partition, offset, -1, 0, None, None, None, -1, -1, (), detail)


def decode_record(msg: ConsumerRecord, *, max_bytes: int) -> Envelope:
    """The request in ``msg``; :class:`EnvelopeError` (the dead-letter reason) when it is not one."""
    if isinstance(msg, UnreadableRecord):
        raise EnvelopeError("undecodable_record", msg.detail)
    return decode(msg.value, msg.headers, max_bytes=max_bytes)


def locate_unreadable(consumer: AIOKafkaConsumer) -> tuple[TopicPartition, int] | None:
    """The partition and offset of the record aiokafka's reader just failed on, or ``None``.

    The failed partition's fetch result is still in the fetcher with a record iterator that raised (a
    finished generator, not cleared as after normal exhaustion); its ``next_fetch_offset`` is one past
    the last record it yielded, i.e. the offset of the record it could not read.
    """
    records = getattr(getattr(consumer, "_fetcher", None), "_records", None) or {}
    for tp, res in list(records.items()):
        partition_records = getattr(res, "_partition_records", None)
        iterator = getattr(partition_records, "_records_iterator", None)
        if iterator is not None and getattr(iterator, "gi_frame", True) is None:
            return tp, int(partition_records.next_fetch_offset)  # type: ignore[union-attr]
    return None


async def getmany_past_unreadable(
    consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition], *, timeout_ms: int, max_records: int
) -> dict[TopicPartition, list[ConsumerRecord]]:
    """``consumer.getmany(*partitions)`` for the tools' manually assigned consumer, with a record the client
    cannot read returned as its :class:`UnreadableRecord` (the daemon's fetch loop has its own, flow-aware
    version in :mod:`consumer.fetch`).

    The failed call loses what it had drained: the other partitions are put back where they were, the
    readable records before the bad one are read again, then the stub, and the position moves past it. If
    those cannot be read again the position stays before the bad record, which the next call meets again.
    """
    tps = list(partitions)
    before = {tp: await consumer.position(tp) for tp in tps}
    batch: dict[TopicPartition, list[ConsumerRecord]]
    try:
        batch = await consumer.getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)
    except Exception as exc:
        found = locate_unreadable(consumer)
        if found is None:
            raise
        error = exc
    else:
        return batch
    tp, bad = found
    for other, pos in before.items():
        if other != tp:
            consumer.seek(other, pos)
    log.error(
        "record at %s/%d@%d cannot be read by the Kafka client (%s); handing on a stub",
        tp.topic,
        tp.partition,
        bad,
        type(error).__name__,
        extra={"topic": tp.topic, "partition": tp.partition, "offset": bad},
    )
    out: list[ConsumerRecord] = []
    for _ in range(50):
        current = await consumer.position(tp)
        if current >= bad:
            break
        got = await consumer.getmany(tp, timeout_ms=1000, max_records=bad - current)
        out.extend(got.get(tp, []))
    if await consumer.position(tp) != bad:
        return {tp: out} if out else {}
    consumer.seek(tp, bad + 1)
    return {tp: [*out, unreadable_stub(tp, bad, error)]}
