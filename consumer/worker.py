"""A worker of the daemon's pool: take a ready message from the flow, process and deliver it, mark it done.

When :meth:`Worker.handle` returned, the message's outcome is durable (recorded in the store, its dead
letter or result written), so only then is its offset marked done in its partition's
:class:`~consumer.offsets.PartitionOffsets`; the commit loop commits up to the lowest offset not yet done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from aiokafka.structs import ConsumerRecord

from consumer import tracing
from consumer.admission import Admission
from consumer.commits import CommitSchedule
from consumer.delivery import deliver
from consumer.errors import ProviderAuthError
from consumer.flow import Flow, Lane, Partition
from consumer.health import PartitionProgress
from consumer.metrics import Metrics
from consumer.model import Disposition, Handled, Stats
from consumer.pipeline import Processor
from consumer.sinks import Sinks

log = logging.getLogger(__name__)

__all__ = ["Worker"]


@dataclass(slots=True)
class Worker:
    flow: Flow
    processor: Processor
    sinks: Sinks
    metrics: Metrics
    progress: PartitionProgress
    commits: CommitSchedule
    # False once stopping, past the shutdown deadline or fatal: messages not started yet stay uncommitted
    # for the next owner.
    accepting: Callable[[], bool] = field(kw_only=True)
    on_fatal: Callable[[BaseException], None] = field(kw_only=True)
    # At most a multiple of the provider concurrency limit of workers hold a message (admission.py).
    admission: Admission | None = field(default=None, kw_only=True)

    @property
    def stats(self) -> Stats:
        return self.processor.stats

    async def run(self) -> None:
        admission = self.admission
        while True:
            if admission is not None:
                await admission.acquire()
            try:
                try:
                    part, lane, msg = await self.flow.ready.receive()
                except anyio.EndOfStream:
                    return
                await self._one(part, lane, msg)
            finally:
                if admission is not None:
                    admission.release()

    async def _one(self, part: Partition, lane: Lane, msg: ConsumerRecord) -> None:
        # Stopping (SIGTERM), revoked or fatal: messages not started yet are left uncommitted for the
        # next owner; only running calls are drained. (The buffer may hold ~1,000 of them.)
        if not part.revoked and self.accepting():
            finished = False
            self.metrics.consumed(msg.topic, msg.partition)
            with anyio.CancelScope() as scope:
                part.inflight.add(scope)
                try:
                    with tracing.message(msg) as span:
                        handled = await self.handle(msg)
                        span.set_attribute("idv.disposition", handled.disposition.value)
                    finished = True
                except ProviderAuthError as exc:
                    self.on_fatal(exc)
                except Exception as exc:  # the worker must survive any one record
                    # Only a bug in the dead-letter path itself gets here (everything else became a
                    # dead letter in handle): log it and move on rather than stop every partition.
                    log.exception(
                        "unexpected %s while finishing a message; moving on without a dead letter",
                        type(exc).__name__,
                        extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
                    )
                    self.metrics.sink_write_failure("dead_letter", "lost")
                    handled = Handled(Disposition.ERROR)
                    finished = True
                finally:
                    part.inflight.discard(scope)
            if finished:
                outcome = handled.record.outcome if handled.record is not None else None
                self.metrics.finished(handled.disposition, outcome.status if outcome else None)
                self.progress.finished(msg.topic, msg.partition)
                part.offsets.done(msg.offset)
                self.commits.message_done()
        self.flow.finish(part, lane)

    async def handle(self, msg: ConsumerRecord) -> Handled:
        """Process one message and write its dead letter or result. Raises only ProviderAuthError (and
        cancellation): anything else one record causes becomes its dead letter (internal_error)."""
        handled = await self.processor.handle_safely(msg)
        return await deliver(handled, msg, self.sinks, on_dead_letter=self.metrics.dead_letter)
