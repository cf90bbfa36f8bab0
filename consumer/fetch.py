"""The fetch loop: ``getmany`` in batches into :class:`~consumer.flow.Flow`, surviving unreadable records.

**aiokafka internals.** This module and :mod:`consumer.unreadable` read aiokafka's private state, each
in one place, read-only and guarded (an ``AttributeError``/missing attribute degrades to "unknown", never
a crash): :meth:`Fetcher.positions` reads ``consumer._subscription.subscription.assignment`` and its
``state_value(tp).position``, the in-memory fetch position of every assigned partition
(``consumer.position()`` is a coroutine that may go to the broker); :func:`~consumer.unreadable.
locate_unreadable` finds where the record reader stopped.

Checked against aiokafka 0.14 (pinned ``>=0.14,<0.15``); an upgrade must re-run
tests/consumer/test_hostile_records.py and tests/consumer/test_fetch_unreadable.py, which fail if either
read stops working.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CorruptRecordException, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord

from consumer.flow import Flow
from consumer.unreadable import locate_unreadable, unreadable_stub

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
        offset_reset: str = "earliest",
        position_wait_s: float = 2.0,
    ) -> None:
        self.consumer = consumer
        self.flow = flow
        self.max_records = max_records
        self.backlogged = backlogged
        self.offset_reset = offset_reset  # the consumer's auto_offset_reset (see _last_safe_position)
        self.position_wait_s = position_wait_s
        self._waited: dict[TopicPartition, float] = {}  # when settled_positions last waited for each
        self.on_fetch: Callable[[int], object] | None = None  # records per fetch (consumer/progress_log.py)

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
        before = await self.settled_positions()
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

    async def settled_positions(self) -> dict[TopicPartition, int]:
        """:meth:`positions`, first waiting (``position_wait_s`` at most, once per partition in 30 s)
        for every assigned partition without one.

        Right after an assignment no partition has a fetch position: aiokafka resets them in the
        background, and the next ``getmany`` may reset a partition *and* drain it before it fails on
        another partition's unreadable record. A position unknown beforehand cannot be put back, so
        those records would be lost in memory (never dispatched, never committed: the partition waits
        forever). Costs nothing once every position is known.
        """
        now = self.positions()
        try:
            assigned = self.consumer.assignment()
        except IllegalStateError:
            return now
        # At most once per partition in 30 s: a partition whose leader is away (an election) must not
        # hold every fetch up by the deadline. Correctness does not depend on the wait: a position still
        # unknown after it is covered by _last_safe_position.
        clock = time.monotonic()
        waited = self._waited
        for tp in [tp for tp, at in waited.items() if tp not in assigned or clock - at > 30.0]:
            del waited[tp]
        missing = assigned - now.keys() - waited.keys()
        if not missing:
            return now
        waited.update(dict.fromkeys(missing, clock))
        with anyio.move_on_after(self.position_wait_s):  # one deadline for them all
            for tp in missing:
                try:
                    now[tp] = await self.consumer.position(tp)
                except IllegalStateError:  # unassigned meanwhile
                    pass
        return now

    async def _last_safe_position(self, tp: TopicPartition) -> int | None:
        """Where to fetch ``tp`` from when its position before a failed call is unknown: just past the
        last record dispatched from it, else its committed offset, else where ``earliest`` resets it (a
        record fetched twice is skipped by the flow or deduplicated by the store; one never fetched again
        would be lost). ``None`` when unknown (``latest`` with nothing committed)."""
        part = self.flow.partitions.get(tp)
        if part is not None and part.offsets.last_seen is not None:
            return part.offsets.last_seen + 1
        try:
            committed = await self.consumer.committed(tp)
            if committed is not None and committed >= 0:
                return int(committed)
            if self.offset_reset == "earliest":
                return int((await self.consumer.beginning_offsets([tp]))[tp])
        except KafkaError:
            pass
        return None

    async def _on_unreadable(self, exc: BaseException, before: dict[TopicPartition, int]) -> None:
        consumer = self.consumer
        found = locate_unreadable(consumer)
        now = self.positions()
        for tp, pos in now.items():
            if found is not None and tp == found[0]:
                continue
            if tp not in before:  # reset during the call (the wait above ran out): its start is unknown
                back = await self._last_safe_position(tp)
                if back is not None and back < pos:
                    consumer.seek(tp, back)
            elif before[tp] != pos:
                consumer.seek(tp, before[tp])  # drained by the failed call and lost with it: fetch again
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
        consumer.seek(tp, bad + 1)
        await self.flow.dispatch_batch({tp: [unreadable_stub(tp, bad, exc)]})
