"""Offset commits: each partition's watermark, committed by the consumer or, transactional, in the results
transaction together with the result events below it; and when (:class:`CommitSchedule`).

The watermark is the first offset still pending (:class:`~consumer.offsets.PartitionOffsets`): never past
a message whose outcome, dead letter or result is not durable. A failed commit (rebalance in progress,
membership lost) leaves the offsets uncommitted; they are redelivered to the next owner and the dedupe
store turns them into skipped duplicates. Commits happen every ``commit_interval_s``, or sooner after
``commit_every`` finished messages (never per message: PITFALLS, aiokafka #128), and on revoke and
shutdown, when the daemon asks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from consumer.errors import ConfigurationError
from consumer.faults import FaultPoints
from consumer.flow import Partition
from consumer.metrics import Metrics
from consumer.sinks import Fenced, Sinks

log = logging.getLogger(__name__)

__all__ = ["CommitSchedule", "Committer", "watermarks"]


def watermarks(parts: Iterable[Partition]) -> dict[TopicPartition, int]:
    """The offsets to commit: each partition's watermark, where it is ahead of the committed one."""
    offsets = {}
    for part in parts:
        offset = part.offsets.needs_commit()
        if offset is not None:
            offsets[part.tp] = offset
    return offsets


class Committer:
    """Commits watermarks; ``on_fatal`` gets a :class:`ConfigurationError` when the transaction is fenced."""

    def __init__(
        self,
        sinks: Sinks,
        metrics: Metrics,
        faults: FaultPoints,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self.consumer: AIOKafkaConsumer | None = None  # set once the consumer exists
        self.sinks = sinks
        self.metrics = metrics
        self.faults = faults
        self.on_fatal = on_fatal
        self.broker_ok = True  # the last commit reached the broker (readiness)

    async def commit(self, parts: list[Partition], offsets: dict[TopicPartition, int], why: str) -> None:
        assert self.consumer is not None
        if self.sinks.transactional:
            # Results and offsets in one transaction: no result without its commit, no commit without them.
            try:
                ok = await self.sinks.commit_transaction(
                    offsets, on_sent=lambda: self.faults.hit("in_transaction")
                )
            except Fenced as exc:
                self.on_fatal(
                    ConfigurationError(
                        f"the results transaction was fenced ({exc}): another live instance uses the "
                        f"transactional id {self.sinks.transactional_id!r}; set IDV_INSTANCE_ID uniquely "
                        "(and stably) for every instance"
                    )
                )
                return
            if ok:
                self._committed(parts, offsets, why)
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # Rebalance in progress or membership lost: the offsets stay uncommitted and are redelivered to
            # whoever owns the partition next; the dedupe store turns that into skipped duplicates.
            log.warning("commit (%s) failed: %s", why, type(exc).__name__)
            self.broker_ok = False
            return
        self._committed(parts, offsets, why)

    def _committed(self, parts: list[Partition], offsets: dict[TopicPartition, int], why: str) -> None:
        self.broker_ok = True
        for part in parts:
            if part.tp in offsets:
                part.offsets.committed = offsets[part.tp]
                self.metrics.committed(part.tp.topic, part.tp.partition, offsets[part.tp])
        log.debug("committed (%s) %d partition(s)", why, len(offsets))
        self.faults.hit("after_commit")


class CommitSchedule:
    """When to commit: every ``interval_s``, or sooner once ``every`` messages finished since the last
    commit of something (:meth:`commit` with a watermark ahead of the committed offset)."""

    def __init__(self, committer: Committer, *, interval_s: float, every: int) -> None:
        self.committer = committer
        self.interval_s = interval_s
        self.every = every
        self._done_since_commit = 0
        self._wakeup: anyio.Event | None = None  # made in open(): it needs the running event loop

    def open(self) -> None:
        self._wakeup = anyio.Event()

    def message_done(self) -> None:
        self._done_since_commit += 1
        if self._done_since_commit >= self.every and self._wakeup is not None:
            self._wakeup.set()

    async def commit(self, parts: list[Partition], why: str) -> None:
        offsets = watermarks(parts)
        if not offsets:
            return
        self._done_since_commit = 0
        await self.committer.commit(parts, offsets, why)

    async def run(self, commit_now: Callable[[str], Awaitable[None]], after: Callable[[], None]) -> None:
        """The commit loop: ``commit_now("periodic")``, then ``after()`` (gauges), forever."""
        self._wakeup = self._wakeup or anyio.Event()
        while True:
            with anyio.move_on_after(self.interval_s):
                await self._wakeup.wait()
            self._wakeup = anyio.Event()
            await commit_now("periodic")
            after()
