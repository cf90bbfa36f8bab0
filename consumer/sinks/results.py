"""Result events: their bytes, and their write — one by one, or buffered per partition and published in
the transaction that also commits their offsets (``IDV_RESULTS_TRANSACTIONAL``).

Result events are built from the stored record only, so a redelivered duplicate re-emits byte-identical
content (downstream dedupes by message ID). A result event that cannot be written raises
:class:`~consumer.sinks.producers.Unwritable` and the caller dead-letters the message instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import orjson
from aiokafka import TopicPartition
from aiokafka.errors import ProducerFenced
from aiokafka.structs import ConsumerRecord

from consumer import tracing
from consumer.model import DeadLetter
from consumer.sinks import producers
from consumer.sinks.deadletters import DeadLetterWriter
from consumer.sinks.producers import SEQUENCE_ERRORS, Unwritable, is_retriable
from consumer.store.base import Record
from consumer.timefmt import iso

log = logging.getLogger(__name__)

__all__ = ["RESULT_SCHEMA_VERSION", "Fenced", "ResultWriter", "result_event"]

RESULT_SCHEMA_VERSION = 1


class Fenced(Exception):
    """Another live producer uses this instance's transactional id (ProducerFenced)."""


def result_event(record: Record, subject_id: str) -> bytes:
    """The outcome event for a COMPLETED or FAILED record (no request data, no personal data)."""
    outcome = record.outcome
    status = outcome.status if outcome else record.state.value
    return orjson.dumps(
        {
            "schema_version": RESULT_SCHEMA_VERSION,
            "message_id": record.message_id,
            "idempotency_key": record.key,
            "operation": record.operation,
            "subject_id": subject_id,
            "status": status,
            "provider_reference": outcome.provider_reference if outcome else None,
            "http_status": outcome.http_status if outcome else None,
            "detail": outcome.detail if outcome else None,
            "attempts": record.attempts,
            "first_seen_at": iso(record.created_at),
            "recorded_at": iso(record.updated_at),
        }
    )


# A result waiting for its transaction: (offset, message, event bytes, headers, Kafka key); and one the
# results topic refused for good, with why.
_Pending = tuple[int, ConsumerRecord, bytes, list[tuple[str, bytes]], bytes | None]
_Sent = tuple[TopicPartition, _Pending, "asyncio.Future[Any]"]
_Unwritten = tuple[TopicPartition, _Pending, str, bool]  # why; refused by the broker (in a batch)


class ResultWriter(DeadLetterWriter):
    """Writes result events; in transactional mode buffers them until :meth:`commit_transaction`."""

    def __init__(self, *, results_topic: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.results_topic = results_topic
        # Transactional mode: result events wait here, per partition, until the transaction that also
        # commits their offsets. Dead letters are still written (and acknowledged) before the offset is done.
        self._pending: dict[TopicPartition, list[_Pending]] = {}
        self._pending_count = 0
        self._txn_lock = anyio.Lock()
        self.txn_failures = 0  # consecutive failed transactions (readiness)
        self.results = 0
        self.unwritable_results = 0

    @property
    def pending_results(self) -> int:
        """Result events buffered for the next transaction."""
        return self._pending_count

    def buffer_result(self, tp: TopicPartition, msg: ConsumerRecord, record: Record, subject_id: str) -> None:
        self._pending.setdefault(tp, []).append(
            (
                msg.offset,
                msg,
                result_event(record, subject_id),
                # The headers now, while the message's span is current (the transaction comes later).
                tracing.inject([("idv-message-id", record.message_id.encode())]),
                msg.key,
            )
        )
        self._pending_count += 1

    def buffer_raw(
        self, tp: TopicPartition, msg: ConsumerRecord, key: bytes, value: bytes, message_id: str
    ) -> None:
        """Buffer a prepared result event (a workflow's, as stored) for the transaction committing ``msg``."""
        headers = tracing.inject([("idv-message-id", message_id.encode())])
        self._pending.setdefault(tp, []).append((msg.offset, msg, value, headers, key))
        self._pending_count += 1

    async def raw_result(self, key: bytes, value: bytes, message_id: str) -> None:
        """Write a prepared result event (non-transactional mode); raises :class:`Unwritable`."""
        if self.results_topic is None:
            return
        headers = tracing.inject([("idv-message-id", message_id.encode())])
        await self._send("result", self.results_topic, value, key, headers)
        self.results += 1

    async def publish_event(self, topic: str, key: bytes, value: bytes) -> None:
        """Write a synthetic provider event (the workflow poller's) with the non-transactional producer."""
        await self._send("provider event", topic, value, key, [("idv-provider", b"poller")])

    def drop_pending(self, tp: TopicPartition) -> None:
        """Forget buffered results of a partition we no longer own (they were never made visible)."""
        self._pending_count -= len(self._pending.pop(tp, ()))

    async def commit_transaction(
        self, offsets: dict[TopicPartition, int], on_sent: Callable[[], None] | None = None
    ) -> bool:
        """One transaction: the results below each partition's new offset, then the offsets themselves.

        Either both become visible (to ``read_committed`` readers and to the group) or neither does. On
        failure the transaction is aborted, the results stay buffered and the next commit tries again.
        A result the results topic will never accept is taken out, its message dead-lettered (before the
        offset is committed, by the next transaction) and the transaction tried again at once. Raises
        :class:`Fenced` when another producer took this transactional id.
        """
        assert self.results_topic is not None
        async with self._txn_lock:
            # The broker refuses a whole batch for one record it will never take, and every record of the
            # batch gets that error: after such a refusal the results are sent one at a time (each its own
            # batch), so the one set aside is the one refused alone.
            alone = False
            for _ in range(10):  # each round takes out at least one unwritable result, or goes one at a time
                batches = {
                    tp: [item for item in self._pending.get(tp, ()) if item[0] < offset]
                    for tp, offset in offsets.items()
                }
                unwritable: list[_Unwritten] = []
                try:
                    async with self._producer.transaction():
                        await self._send_batches(batches, unwritable, alone=alone)
                        await self._producer.send_offsets_to_transaction(offsets, self.group_id)
                        if on_sent is not None:
                            on_sent()
                except ProducerFenced as exc:
                    raise Fenced(str(exc) or type(exc).__name__) from exc
                except Exception as exc:  # the transaction is aborted; retried next tick
                    if producers.fenced_state(self._producer):
                        raise Fenced(type(exc).__name__) from exc
                    if unwritable or isinstance(exc, SEQUENCE_ERRORS):
                        # A refused batch leaves aiokafka's sequence numbers out of step with the broker
                        # (every later transaction would fail with OutOfOrderSequenceNumber): start a new
                        # producer with the same transactional id (a new epoch, fresh sequences).
                        await self._replace_transactional_producer()
                    if unwritable and not alone and any(refused for *_, refused in unwritable):
                        alone = True  # refused in a batch: which record it was, a batch of one tells
                        continue
                    if unwritable:
                        await self._set_aside(unwritable)
                        continue
                    self.txn_failures += 1
                    log.warning(
                        "results transaction failed (%s); will retry",
                        type(exc).__name__,
                        extra={"failures": self.txn_failures},
                    )
                    return False
                break
            else:
                self.txn_failures += 1
                return False
            self.txn_failures = 0
            for tp, offset in offsets.items():
                left = [item for item in self._pending.get(tp, ()) if item[0] >= offset]
                self._pending_count -= len(self._pending.get(tp, ())) - len(left)
                if left:
                    self._pending[tp] = left
                else:
                    self._pending.pop(tp, None)
            self.results += sum(len(b) for b in batches.values())
            return True

    async def _replace_transactional_producer(self) -> None:
        new = self._make(self.transactional_id)
        try:
            await new.start()  # InitProducerId: a new epoch; the broker aborts the old one's transaction
        except Exception as exc:  # noqa: BLE001 - broker away: keep the old one, the next commit retries
            log.warning("could not start a replacement transactional producer (%s)", type(exc).__name__)
            return
        old, self._producer = self._producer, new
        log.warning("replaced the transactional producer after a batch the broker refused")
        await producers.stop_replaced(old)

    async def _send_batches(
        self, batches: dict[TopicPartition, list[_Pending]], unwritable: list[_Unwritten], *, alone: bool
    ) -> None:
        """Send the results of one transaction; collect those the topic will never accept in
        ``unwritable`` (flagged when the broker refused them, possibly for another record of their batch)
        and raise (which aborts the transaction) if any send failed. ``alone``: each result is
        acknowledged before the next is sent, so each is a batch of its own."""
        assert self.results_topic is not None
        futures: list[_Sent] = []
        for tp, items in batches.items():
            for item in items:
                _, msg, value, headers, key = item
                try:
                    fut = await self._producer.send(self.results_topic, value, key=key, headers=headers)
                except Exception as exc:
                    if (
                        is_retriable(exc)
                        or isinstance(exc, (ProducerFenced, *SEQUENCE_ERRORS))
                        or producers.fenced_state(self._producer)
                    ):
                        for _, _, queued in futures:  # their outcome no longer matters: aborted
                            queued.add_done_callback(producers.retrieve)
                        raise
                    unwritable.append((tp, item, producers.why_unwritable(exc, "results"), False))
                    continue
                if alone:
                    await self._acknowledged([(tp, item, fut)], unwritable)  # raises on a refusal
                else:
                    futures.append((tp, item, fut))
        await self._acknowledged(futures, unwritable)
        if unwritable:
            raise _Retry

    async def _acknowledged(self, futures: list[_Sent], unwritable: list[_Unwritten]) -> None:
        """Wait for the sends' acknowledgements; the refused ones go to ``unwritable``, the first failure
        is raised."""
        failed: BaseException | None = None
        for tp, item, fut in futures:
            try:
                await fut
            except Exception as exc:  # noqa: BLE001 - classified; the first failure is raised below
                if not is_retriable(exc) and not isinstance(exc, (ProducerFenced, *SEQUENCE_ERRORS)):
                    unwritable.append((tp, item, producers.why_unwritable(exc, "results"), True))
                failed = failed or exc
        if failed is not None:
            raise failed

    async def _set_aside(self, unwritable: list[_Unwritten]) -> None:
        for tp, item, why, _ in unwritable:
            items = self._pending.get(tp, [])
            if item in items:
                items.remove(item)
                self._pending_count -= 1
            msg = item[1]
            self.unwritable_results += 1
            self._count("result", "unwritable")
            log.error(
                "result event can never be written (%s); dead-lettering the message",
                why,
                extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
            )
            letter = DeadLetter(
                "internal_error", f"result event could not be written: {why}; outcome recorded"
            )
            await self.dead_letter(msg, letter, time.time())

    async def result(self, record: Record, key: bytes | None, subject_id: str) -> None:
        """Write one result event (non-transactional mode); raises :class:`Unwritable`."""
        if self.results_topic is None:
            return
        headers = tracing.inject([("idv-message-id", record.message_id.encode())])
        try:
            await self._send("result", self.results_topic, result_event(record, subject_id), key, headers)
        except Unwritable:
            self.unwritable_results += 1
            self._count("result", "unwritable")
            raise
        self.results += 1


class _Retry(Exception):
    """Abort the transaction (some results were taken out) and run it again."""
