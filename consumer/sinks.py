"""Where handled messages go besides the store: the dead-letter topic and the results topic.

Both are written **before** the message's offset is marked done, with an idempotent producer and
``acks=all``. If a write fails the message waits and the write is retried (backoff, no ceiling): nothing
is committed past a message whose dead letter or result is not on the broker.

Dead letters carry the original key, value and headers unchanged, plus ``idv-dlq-*`` headers describing
why; the detail never contains payload contents. Result events are built from the stored record only, so
a redelivered duplicate re-emits byte-identical content (downstream dedupes by message ID).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from consumer.store.base import Record

log = logging.getLogger(__name__)

__all__ = ["DLQ_REASONS", "DeadLetter", "Sinks", "dead_letter_headers", "result_event"]

DLQ_REASONS = (
    "invalid_encoding",
    "invalid_json",
    "invalid_envelope",
    "missing_message_id",
    "unknown_operation",
    "too_large",
    "idempotency_conflict",
    "retries_exhausted",
    "internal_error",  # a bug in the consumer met this message; redrive after the fix
    "undecodable_record",  # the Kafka client could not read the record (e.g. a non-UTF-8 header key)
    "in_doubt",  # the provider may have acted; the outcome is unknown, an operator decides
)

H_REASON = "idv-dlq-reason"
H_DETAIL = "idv-dlq-detail"
H_TOPIC = "idv-dlq-original-topic"
H_PARTITION = "idv-dlq-original-partition"
H_OFFSET = "idv-dlq-original-offset"
H_TIMESTAMP = "idv-dlq-original-timestamp"
H_GROUP = "idv-dlq-consumer-group"
H_FIRST_FAILURE = "idv-dlq-first-failure-at"
H_ATTEMPTS = "idv-dlq-attempts"
DLQ_HEADERS = (
    H_REASON,
    H_DETAIL,
    H_TOPIC,
    H_PARTITION,
    H_OFFSET,
    H_TIMESTAMP,
    H_GROUP,
    H_FIRST_FAILURE,
    H_ATTEMPTS,
)

RESULT_SCHEMA_VERSION = 1


class DeadLetter:
    """Why a message is set aside; becomes the dead-letter headers."""

    __slots__ = ("attempts", "detail", "first_failure_at", "reason")

    def __init__(self, reason: str, detail: str, *, attempts: int = 0, first_failure_at: float | None = None):
        if reason not in DLQ_REASONS:
            raise ValueError(f"unknown dead-letter reason {reason!r}")
        self.reason = reason
        self.detail = detail[:500]
        self.attempts = attempts
        self.first_failure_at = first_failure_at


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dead_letter_headers(
    msg: ConsumerRecord, letter: DeadLetter, group_id: str, now: float
) -> list[tuple[str, bytes]]:
    # Any idv-dlq-* headers already present (a redriven dead letter failing again) are replaced, the rest
    # of the original headers are kept as they were, in order.
    original = [(k, v) for k, v in (msg.headers or ()) if k not in DLQ_HEADERS]
    first = letter.first_failure_at if letter.first_failure_at is not None else now
    return [
        *original,
        (H_REASON, letter.reason.encode()),
        (H_DETAIL, letter.detail.encode("utf-8", "replace")),
        (H_TOPIC, msg.topic.encode()),
        (H_PARTITION, str(msg.partition).encode()),
        (H_OFFSET, str(msg.offset).encode()),
        (H_TIMESTAMP, str(msg.timestamp).encode()),
        (H_GROUP, group_id.encode()),
        (H_FIRST_FAILURE, _iso(first).encode()),
        (H_ATTEMPTS, str(letter.attempts).encode()),
    ]


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
            "first_seen_at": _iso(record.created_at),
            "recorded_at": _iso(record.updated_at),
        }
    )


class Sinks:
    """The producer for dead letters and results (one idempotent producer, ``acks=all``)."""

    def __init__(
        self,
        *,
        bootstrap: str,
        dlq_topic: str | None,
        results_topic: str | None,
        group_id: str,
        producer_kwargs: dict[str, Any] | None = None,
        max_request_size: int = 16 * 1024 * 1024,
        transactional_id: str | None = None,
    ) -> None:
        self.dlq_topic = dlq_topic
        self.results_topic = results_topic
        self.group_id = group_id
        self.transactional = transactional_id is not None
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            enable_idempotence=True,
            acks="all",
            max_request_size=max_request_size,
            linger_ms=2,
            transactional_id=transactional_id,
            **(producer_kwargs or {}),
        )
        # Transactional mode: result events wait here, per partition, until the transaction that also
        # commits their offsets. Dead letters are still written (and acknowledged) before the offset is done.
        self._pending: dict[TopicPartition, list[tuple[int, bytes | None, bytes, str]]] = {}
        self._txn_lock = anyio.Lock()
        self.dead_letters = 0
        self.results = 0
        self._started = False

    async def start(self) -> None:
        await self._producer.start()
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._producer.stop()

    async def _send(
        self,
        what: str,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        delay = 0.1
        while True:
            try:
                fut = await self._producer.send(topic, value, key=key, headers=list(headers))
                await fut
            except KafkaError as exc:
                # The message waits (its offset stays uncommitted) until the broker takes the write.
                log.warning(
                    "writing the %s to %s failed (%s); retrying in %.1fs",
                    what,
                    topic,
                    type(exc).__name__,
                    delay,
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 10.0)
            else:
                return

    async def dead_letter(self, msg: ConsumerRecord, letter: DeadLetter, now: float) -> None:
        if self.dlq_topic is None:
            return
        headers = dead_letter_headers(msg, letter, self.group_id, now)
        await self._send("dead letter", self.dlq_topic, msg.value, msg.key, headers)
        self.dead_letters += 1
        log.warning("dead-lettered: %s: %s", letter.reason, letter.detail, extra={"reason": letter.reason})

    def buffer_result(
        self, tp: TopicPartition, offset: int, record: Record, key: bytes | None, subject_id: str
    ) -> None:
        self._pending.setdefault(tp, []).append(
            (offset, key, result_event(record, subject_id), record.message_id)
        )

    def drop_pending(self, tp: TopicPartition) -> None:
        """Forget buffered results of a partition we no longer own (they were never made visible)."""
        self._pending.pop(tp, None)

    async def commit_transaction(
        self, offsets: dict[TopicPartition, int], on_sent: Callable[[], None] | None = None
    ) -> bool:
        """One transaction: the results below each partition's new offset, then the offsets themselves.

        Either both become visible (to ``read_committed`` readers and to the group) or neither does. On
        failure the transaction is aborted, the results stay buffered and the next commit tries again.
        """
        assert self.results_topic is not None
        async with self._txn_lock:
            batches = {
                tp: [item for item in self._pending.get(tp, ()) if item[0] < offset]
                for tp, offset in offsets.items()
            }
            try:
                async with self._producer.transaction():
                    futures = []
                    for items in batches.values():
                        for _, key, value, message_id in items:
                            futures.append(
                                await self._producer.send(
                                    self.results_topic,
                                    value,
                                    key=key,
                                    headers=[("idv-message-id", message_id.encode())],
                                )
                            )
                    for fut in futures:
                        await fut
                    await self._producer.send_offsets_to_transaction(offsets, self.group_id)
                    if on_sent is not None:
                        on_sent()
            except KafkaError as exc:
                log.warning("results transaction failed (%s); will retry", type(exc).__name__)
                return False
            for tp, offset in offsets.items():
                left = [item for item in self._pending.get(tp, ()) if item[0] >= offset]
                if left:
                    self._pending[tp] = left
                else:
                    self._pending.pop(tp, None)
            self.results += sum(len(b) for b in batches.values())
            return True

    async def result(self, record: Record, key: bytes | None, subject_id: str) -> None:
        if self.results_topic is None:
            return
        headers = [("idv-message-id", record.message_id.encode())]
        await self._send("result", self.results_topic, result_event(record, subject_id), key, headers)
        self.results += 1
