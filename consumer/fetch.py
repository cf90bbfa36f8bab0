"""The fetch loop: ``getmany`` in batches into :class:`~consumer.flow.Flow`, surviving unreadable records.

**aiokafka internals.** This is the one module that reads aiokafka's private state, in two places, both
read-only and both guarded (an ``AttributeError``/missing attribute degrades to "unknown", never a crash):

* :meth:`Fetcher.positions` — ``consumer._subscription.subscription.assignment`` and its
  ``state_value(tp).position``: the in-memory fetch position of every assigned partition
  (``consumer.position()`` is a coroutine that may go to the broker);
* :meth:`Fetcher.locate_unreadable` — ``consumer._fetcher._records[tp]._partition_records`` with its
  ``_records_iterator`` and ``next_fetch_offset``: where the record reader stopped.

Checked against aiokafka 0.14 (pinned ``>=0.14,<0.15``); an upgrade must re-run
tests/consumer/test_hostile_records.py, which fails if either read stops working.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CorruptRecordException, KafkaError
from aiokafka.structs import ConsumerRecord

from consumer.flow import Flow

log = logging.getLogger(__name__)

__all__ = ["Fetcher"]

Batch = dict[TopicPartition, list[ConsumerRecord]]


class Fetcher:
    """Feeds ``flow`` from ``consumer``; pauses everything while the buffer is full or ``backlogged()``."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        flow: Flow,
        *,
        max_records: int,
        backlogged: Callable[[], bool] = lambda: False,
    ) -> None:
        self.consumer = consumer
        self.flow = flow
        self.max_records = max_records
        self.backlogged = backlogged
        # Records aiokafka could not read (by topic, partition, offset), dispatched as stubs: their detail.
        self.undecodable: dict[tuple[str, int, int], str] = {}
        self.on_fetch: Callable[[int], object] | None = None  # records per fetch (consumer/progress_log.py)

    def take_undecodable(self, msg: ConsumerRecord) -> str | None:
        """The detail of a stub dispatched for an unreadable record, or ``None`` for a real record."""
        return self.undecodable.pop((msg.topic, msg.partition, msg.offset), None)

    async def run(self, stopping: Callable[[], bool]) -> None:
        flow = self.flow
        while not stopping():
            if flow.free == 0 or self.backlogged():
                # Buffer full (slow provider, open breaker), or results piling up while transactions
                # fail: pause every partition but keep polling, so the broker does not consider this
                # consumer dead (max.poll.interval.ms).
                flow.pause_all()
                await flow.wait_slot_freed(1.0)
                if flow.free == 0 or self.backlogged():
                    batch = await self.getmany(timeout_ms=0, max_records=1)
                    await flow.dispatch_batch(batch)  # normally empty: all partitions are paused
                continue
            flow.resume_all()
            batch = await self.getmany(timeout_ms=500, max_records=min(flow.free, self.max_records))
            if self.on_fetch is not None:
                self.on_fetch(sum(map(len, batch.values())))
            await flow.dispatch_batch(batch)

    def positions(self) -> dict[TopicPartition, int]:
        """The fetch position of every assigned partition that has one (aiokafka's subscription state;
        ``consumer.position()`` is a coroutine that may go to the broker, this only reads memory)."""
        try:
            assignment = self.consumer._subscription.subscription.assignment
            out = {}
            for tp in assignment.tps:
                state = assignment.state_value(tp)
                if state is not None and state.has_valid_position:
                    out[tp] = state.position
        except AttributeError:  # not subscribed or assigned yet, or a different aiokafka
            return {}
        return out

    async def getmany(self, *, timeout_ms: int, max_records: int) -> Batch:
        """``getmany`` that survives a record aiokafka cannot read.

        aiokafka decodes header keys as UTF-8 while it iterates a fetched batch, inside ``getmany``: a
        header key that is not UTF-8 (Go and Java clients can write one) raises ``UnicodeDecodeError``
        there, the fetch position stays before the record, and every later ``getmany`` raises again — a
        naive loop dies on it forever. A failed call also loses what it had already drained from other
        partitions (their positions moved on, the records were never returned), so those positions are put
        back first; then the bad record is isolated and replaced by a stub that is dead-lettered
        (``undecodable_record``) like any other message.
        """
        before = self.positions()
        try:
            batch: Batch = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as exc:
            if not isinstance(exc, CorruptRecordException):
                raise
            await self._on_unreadable(exc, before)
        except Exception as exc:  # noqa: BLE001 - any error reading one record; see the docstring
            await self._on_unreadable(exc, before)
        else:
            return batch
        return {}

    def locate_unreadable(self) -> tuple[TopicPartition, int] | None:
        """The partition and offset of the record aiokafka's reader just failed on.

        The failed partition's fetch result is still in the fetcher with a record iterator that raised (a
        finished generator, not cleared as after normal exhaustion); its ``next_fetch_offset`` is one past
        the last record it yielded, i.e. the offset of the record it could not read.
        """
        records = getattr(getattr(self.consumer, "_fetcher", None), "_records", None) or {}
        for tp, res in list(records.items()):
            partition_records = getattr(res, "_partition_records", None)
            iterator = getattr(partition_records, "_records_iterator", None)
            if iterator is not None and getattr(iterator, "gi_frame", True) is None:
                return tp, int(partition_records.next_fetch_offset)  # type: ignore[union-attr]
        return None

    async def _on_unreadable(self, exc: BaseException, before: dict[TopicPartition, int]) -> None:
        consumer = self.consumer
        found = self.locate_unreadable()
        now = self.positions()
        for tp, pos in before.items():
            if now.get(tp, pos) != pos and (found is None or tp != found[0]):
                consumer.seek(tp, pos)  # drained by the failed call and lost with it: fetch them again
        if found is None:
            log.error(
                "a fetched record could not be read (%s) and could not be located; retrying in 1s",
                type(exc).__name__,
            )
            await anyio.sleep(1.0)
            return
        tp, bad = found
        part = self.flow.partitions.get(tp)
        log.error(
            "record at %s/%d@%d cannot be read by the Kafka client (%s); dead-lettering a stub",
            tp.topic,
            tp.partition,
            bad,
            type(exc).__name__,
            extra={"topic": tp.topic, "partition": tp.partition, "offset": bad},
        )
        if part is None or part.revoked:
            await anyio.sleep(0.1)  # being revoked: the next owner meets the record; do not spin
            return
        # The readable records before it were lost with the failed call: read exactly those again (a
        # max_records bound stops the reader before the bad record), then the stub, then go past it.
        for _ in range(50):
            current = self.positions().get(tp)
            if current is None or current >= bad or part.held or part.revoked or self.flow.all_paused:
                break
            try:
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=bad - current)
            except Exception as again:  # noqa: BLE001 - not expected (the bound stops before the record)
                log.warning("re-reading before an unreadable record failed (%s)", type(again).__name__)
                return
            await self.flow.dispatch_batch(batch)
        if self.positions().get(tp) != bad or part.held or part.revoked:
            return  # not there yet (paused, handed back): the next fetch meets the record again
        detail = (
            f"the Kafka client could not read the record ({type(exc).__name__}, e.g. a header key that "
            "is not UTF-8); key, value, headers and timestamp are unknown"
        )
        self.undecodable[(tp.topic, tp.partition, bad)] = detail
        consumer.seek(tp, bad + 1)
        stub = ConsumerRecord(tp.topic, tp.partition, bad, -1, 0, None, None, None, -1, -1, ())
        await self.flow.dispatch_batch({tp: [stub]})
