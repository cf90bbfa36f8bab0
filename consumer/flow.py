"""Flow control between the fetch loop and the workers: partitions, key lanes, buffer slots, hold/resume.

Each fetched message takes a buffer slot (``max_buffered``, a global bound) and is dispatched to its
*lane*: messages with the same Kafka key in the same partition run one after another in offset order,
different keys run concurrently (the lane's head waits in :attr:`Flow.ready` for a free worker). When the
buffer is full every partition is paused (and still polled). While it is more than half full, a partition
holding more than its share (``max_buffered`` ÷ assigned partitions) is *held*: paused, and the rest of its
fetched batch handed back (``seek`` to the first record not dispatched) until it is down to half its
share, so one partition with few keys cannot fill the buffer with messages waiting behind those keys while
other partitions' messages wait unfetched. Nothing is skipped: a record is dispatched once, in offset
order, and the commit watermark (:class:`~consumer.offsets.PartitionOffsets`) is unchanged.

:class:`Flow` only needs ``pause``/``resume``/``seek``/``assignment`` of the consumer (:class:`Pausable`),
so it is tested without a broker (tests/consumer/test_flow.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError
from aiokafka.structs import ConsumerRecord
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from consumer.offsets import PartitionOffsets

__all__ = ["Flow", "Item", "Lane", "Partition", "Pausable"]


class Pausable(Protocol):
    """The part of :class:`aiokafka.AIOKafkaConsumer` flow control uses."""

    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...


@dataclass(eq=False)
class Partition:
    """One assigned partition: its offsets, its running calls, and its share of the buffer."""

    tp: TopicPartition
    offsets: PartitionOffsets = field(default_factory=PartitionOffsets)
    inflight: set[anyio.CancelScope] = field(default_factory=set)
    revoked: bool = False
    active: int = 0  # dispatched (running or queued in a lane) and not yet through a worker
    held: bool = False  # paused because it holds more than its share of the buffer


# (partition, key) for keyed messages; (partition, None, offset) for unkeyed ones (no ordering promise).
Lane = tuple[Any, ...]
Item = tuple[Partition, Lane, ConsumerRecord]


class Flow:
    """Buffer slots, lanes and pause bookkeeping of one consumer. :meth:`open` inside the event loop."""

    def __init__(
        self,
        max_buffered: int,
        *,
        on_dispatched: Callable[[str, int], None] | None = None,
    ) -> None:
        self.max_buffered = max_buffered
        self.on_dispatched = on_dispatched  # (topic, partition): a message entered the buffer
        self.consumer: Pausable | None = None
        self.partitions: dict[TopicPartition, Partition] = {}
        self._lanes: dict[Lane, deque[tuple[Partition, ConsumerRecord]]] = {}
        self.all_paused = False  # every partition paused: no free slot at all
        # anyio primitives are made in open(): they need the running event loop.
        self._slots: anyio.Semaphore
        self._ready_send: MemoryObjectSendStream[Item]
        self.ready: MemoryObjectReceiveStream[Item]
        self._slot_freed: anyio.Event

    def open(self) -> None:
        self._slots = anyio.Semaphore(self.max_buffered)
        self._ready_send, self.ready = anyio.create_memory_object_stream[Item](self.max_buffered + 1)
        self._slot_freed = anyio.Event()

    def close(self) -> None:
        self._ready_send.close()
        self.ready.close()

    # -- slots -----------------------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return self._slots.value

    def in_flight(self) -> int:
        """Messages between fetch and done: running, or waiting in a lane behind the same key."""
        return self.max_buffered - self._slots.value

    async def wait_slot_freed(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until a worker hands back a slot."""
        self._slot_freed = anyio.Event()
        with anyio.move_on_after(timeout_s):
            await self._slot_freed.wait()

    def share(self) -> int:
        """Buffer slots a partition may hold while the buffer is more than half full."""
        return max(1, self.max_buffered // max(1, len(self.partitions)))

    def over_share(self, part: Partition) -> bool:
        # A partition may borrow beyond its share only while more than half of the pool is free: one
        # fetch of a partition with few keys must not fill every slot with messages queued behind those
        # keys while other partitions' keys wait unfetched (head-of-line blocking across partitions).
        return part.active >= self.share() and self._slots.value <= self.max_buffered // 2

    # -- assignment ------------------------------------------------------------------------------------

    def assign(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            if tp not in self.partitions:
                self.partitions[tp] = Partition(tp)

    def revoke(self, tps: Iterable[TopicPartition]) -> list[Partition]:
        """Mark partitions revoked: their queued messages are no longer started. Returns them."""
        parts = [self.partitions[tp] for tp in tps if tp in self.partitions]
        for part in parts:
            part.revoked = True
        return parts

    def forget(self, part: Partition) -> None:
        if self.partitions.get(part.tp) is part:
            del self.partitions[part.tp]

    def cancel_inflight(self, parts: Iterable[Partition] | None = None) -> int:
        """Cancel every running call (of ``parts``, default all); returns how many were cancelled."""
        cancelled = 0
        for part in list(self.partitions.values()) if parts is None else parts:
            for scope in list(part.inflight):
                scope.cancel()
                cancelled += 1
        return cancelled

    async def wait_running(self, parts: Iterable[Partition] | None, seconds: float, poll_s: float) -> None:
        """Wait up to ``seconds`` until no call of ``parts`` (default all) runs, looking every ``poll_s``."""
        with anyio.move_on_after(seconds):
            while any(part.inflight for part in (self.partitions.values() if parts is None else parts)):
                await anyio.sleep(poll_s)

    # -- pause / resume --------------------------------------------------------------------------------

    def pause_all(self) -> None:
        if not self.all_paused and self.consumer is not None:
            self.consumer.pause(*self.consumer.assignment())
            self.all_paused = True

    def resume_all(self) -> None:
        """Resume every partition except those held over their share."""
        if self.all_paused and self.consumer is not None:
            held = {p.tp for p in self.partitions.values() if p.held}
            self.consumer.resume(*(tp for tp in self.consumer.assignment() if tp not in held))
            self.all_paused = False

    def maybe_resume(self, part: Partition) -> None:
        """Resume a held partition once it is down to half its share, or the buffer is half free again."""
        if part.active > self.share() // 2 and self._slots.value <= self.max_buffered // 2:
            return
        part.held = False
        if self.consumer is not None and not self.all_paused and not part.revoked:
            try:
                self.consumer.resume(part.tp)
            except IllegalStateError:  # no longer assigned; the next owner starts unpaused
                pass

    # -- dispatch and finish ---------------------------------------------------------------------------

    async def dispatch_batch(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Give each message a slot (waiting for one) and put it in its lane, in offset order."""
        for tp, messages in batch.items():
            part = self.partitions.get(tp)
            for msg in messages:
                await self._slots.acquire()
                # The partition may have been revoked (and even re-assigned) while we waited.
                if part is None or part.revoked or self.partitions.get(tp) is not part:
                    self._slots.release()
                    break
                last = part.offsets.last_seen
                if last is not None and msg.offset <= last:
                    self._slots.release()
                    continue
                if self.over_share(part):
                    # Hand the rest of this batch back: fetch it again from this offset once the partition
                    # is below half its share. Nothing was dispatched from here on, so nothing is skipped.
                    self._slots.release()
                    if self.consumer is not None:
                        self.consumer.seek(tp, msg.offset)
                        self.consumer.pause(tp)
                    part.held = True
                    break
                part.offsets.add(msg.offset)
                part.active += 1
                if self.on_dispatched is not None:
                    self.on_dispatched(msg.topic, msg.partition)
                self._dispatch(part, msg)

    def _dispatch(self, part: Partition, msg: ConsumerRecord) -> None:
        # Same key, same partition → same lane → offset order. No key → no ordering promise.
        lane: Lane = (part.tp, msg.key) if msg.key is not None else (part.tp, None, msg.offset)
        queue = self._lanes.get(lane)
        if queue is None:
            self._lanes[lane] = deque()
            self._ready_send.send_nowait((part, lane, msg))
        else:
            queue.append((part, msg))

    def finish(self, part: Partition, lane: Lane) -> None:
        """A worker is through with the head of ``lane`` (done or not): free its slot, maybe resume its
        partition, and make the lane's next message ready."""
        part.active -= 1
        self._slots.release()
        if part.held:
            self.maybe_resume(part)
        self._slot_freed.set()
        queue = self._lanes[lane]
        if queue:
            nxt_part, nxt = queue.popleft()
            self._ready_send.send_nowait((nxt_part, lane, nxt))
        else:
            del self._lanes[lane]
