"""Where handled messages go besides the store: the dead-letter topic and the results topic.

Both are written **before** the message's offset is marked done, with an idempotent producer and
``acks=all``. If a write fails *retriably* (broker down, leader moving, topic missing, timeouts) the message
waits and the write is retried (backoff, no ceiling): nothing is committed past a message whose dead
letter or result is not on the broker.

A write that can never succeed (the record is larger than the topic accepts, the broker rejects it as
invalid, the daemon may not write the topic: ``retriable = False`` on the aiokafka error, or an error that
is not a ``KafkaError`` at all) is not retried: retrying it would stall the partition forever. A dead
letter that cannot be written becomes a **stub** (no key, empty value, no original headers, every
``idv-dlq-*`` header and a detail that says why), so the original position is still on record; if even
the stub is refused, it is logged and counted, and the partition moves on. A result event that cannot be
written raises :class:`Unwritable` and the daemon dead-letters the message instead.

Dead letters carry the original key, value and headers unchanged, plus ``idv-dlq-*`` headers describing
why; the detail never contains payload contents. Result events are built from the stored record only, so
a redelivered duplicate re-emits byte-identical content (downstream dedupes by message ID).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)
from aiokafka.structs import ConsumerRecord

from consumer.store.base import Record

log = logging.getLogger(__name__)

__all__ = [
    "DLQ_REASONS",
    "DeadLetter",
    "Fenced",
    "Sinks",
    "Unwritable",
    "dead_letter_headers",
    "is_retriable",
    "result_event",
]

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


class Unwritable(Exception):
    """A write the broker will never accept (retrying cannot help); ``why`` is a short explanation."""

    def __init__(self, why: str, cause: BaseException) -> None:
        super().__init__(why)
        self.why = why
        self.cause = cause


class Fenced(Exception):
    """Another live producer uses this instance's transactional id (ProducerFenced)."""


def is_retriable(exc: BaseException) -> bool:
    """Whether a failed produce may succeed later. aiokafka marks its errors with ``retriable``; a
    ``KafkaTimeoutError`` (no acknowledgement in time: broker down or slow) is marked not retriable but is
    exactly the case that heals by itself, so it is retried. Anything that is not a ``KafkaError``
    (``AssertionError``, ``IllegalOperation``, a ``TypeError`` from odd headers …) never heals."""
    if isinstance(exc, KafkaTimeoutError):
        return True
    if isinstance(exc, KafkaError):
        return bool(exc.retriable)
    return False


def _why(exc: BaseException, topic_kind: str) -> str:
    name = type(exc).__name__
    if "TooLarge" in name:
        return f"original record too large for the {topic_kind} topic ({name})"
    return f"original record rejected by the {topic_kind} topic ({name}, not retriable)"


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
    msg: ConsumerRecord, letter: DeadLetter, group_id: str, now: float, *, keep_original: bool = True
) -> list[tuple[str, bytes]]:
    # Any idv-dlq-* headers already present (a redriven dead letter failing again) are replaced, the rest
    # of the original headers are kept as they were, in order (a stub keeps none of them).
    original = [(k, v) for k, v in (msg.headers or ()) if k not in DLQ_HEADERS] if keep_original else []
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


# A result waiting for its transaction: (offset, message, event bytes, message ID); and one the results
# topic refused for good, with why.
_Pending = tuple[int, ConsumerRecord, bytes, str]
_Unwritten = tuple[TopicPartition, _Pending, str]


class Sinks:
    """The producers for dead letters and results (idempotent, ``acks=all``).

    Transactional mode (``transactional_id``): result events go through the transactional producer, in
    the transaction that also commits their offsets. Dead letters go through a **second, idempotent,
    non-transactional producer** and are acknowledged before the message's offset is marked done, exactly
    as without transactions. A transactional producer refuses sends outside a transaction
    (``IllegalOperation``), and putting dead letters inside the transaction would keep whole original
    payloads in memory until the commit interval. The price: a dead letter written just before a
    transaction that then aborts is written again when the message is redelivered (dead letters are
    at-least-once in both modes; the DLQ tooling takes the newest per original position).
    """

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
        self.transactional_id = transactional_id

        def make(txn_id: str | None) -> AIOKafkaProducer:
            return AIOKafkaProducer(
                bootstrap_servers=bootstrap,
                enable_idempotence=True,
                acks="all",
                max_request_size=max_request_size,
                linger_ms=2,
                transactional_id=txn_id,
                **(producer_kwargs or {}),
            )

        self._make = make
        self._producer = make(transactional_id)
        # The non-transactional producer: dead letters, and results too when not transactional.
        self._dlq_producer = make(None) if transactional_id is not None else self._producer
        self._generation = 0  # bumped when _dlq_producer is replaced (see _replace_producer)
        self._replace_lock = anyio.Lock()
        # Transactional mode: result events wait here, per partition, until the transaction that also
        # commits their offsets. Dead letters are still written (and acknowledged) before the offset is done.
        self._pending: dict[TopicPartition, list[_Pending]] = {}
        self._pending_count = 0
        self._txn_lock = anyio.Lock()
        self.txn_failures = 0  # consecutive failed transactions (readiness)
        self.dead_letters = 0
        self.stubs = 0  # dead letters written as stubs (the original could not be written)
        self.lost = 0  # dead letters that could not be written at all (not even the stub)
        self.results = 0
        self.unwritable_results = 0
        self.on_unwritable: Callable[[str, str], None] | None = None  # (sink, outcome) → metrics
        self._started = False

    async def start(self) -> None:
        await self._producer.start()
        self._started = True
        if self._dlq_producer is not self._producer:
            try:
                await self._dlq_producer.start()
            except BaseException:
                await self._producer.stop()
                self._started = False
                raise

    async def stop(self) -> None:
        if self._started:
            self._started = False
            try:
                if self._dlq_producer is not self._producer:
                    await self._dlq_producer.stop()
            finally:
                await self._producer.stop()

    @property
    def pending_results(self) -> int:
        """Result events buffered for the next transaction."""
        return self._pending_count

    def _count(self, sink: str, outcome: str) -> None:
        if self.on_unwritable is not None:
            self.on_unwritable(sink, outcome)

    async def _replace_producer(self, generation: int) -> None:
        """Replace the non-transactional producer after the broker refused one of its batches for good.

        aiokafka's idempotent producer does not rewind its sequence numbers when a batch fails (e.g.
        MessageSizeTooLarge): every later batch to that partition then fails with
        OutOfOrderSequenceNumber. A new producer gets a new producer id and starts its sequences afresh.
        Sends that were in flight on the old one fail and are retried on the new one.
        """
        async with self._replace_lock:
            if generation != self._generation or not self._started:
                return
            new = self._make(None)
            try:
                await new.start()
            except Exception as exc:  # noqa: BLE001 - broker away: keep the old one, the send retries
                log.warning("could not start a replacement producer (%s)", type(exc).__name__)
                return
            old = self._dlq_producer
            self._dlq_producer = new
            if not self.transactional:
                self._producer = new
            self._generation += 1
        log.warning("replaced the producer after a write the broker refused for good")
        await _stop_replaced(old)

    async def _send(
        self,
        what: str,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        """Write with the non-transactional producer and wait for the acknowledgement; retry what may
        heal, raise :class:`Unwritable` for what never will."""
        delay = 0.1
        kind = "dead-letter" if what == "dead letter" else "results"
        while True:
            generation = self._generation
            try:
                failure = await self._send_once(topic, value, key, headers)
            except _Refused as refused:  # not queued: the record itself is unacceptable
                raise Unwritable(_why(refused.cause, kind), refused.cause) from refused.cause
            if failure is None:
                return
            if generation != self._generation:
                continue  # the producer was replaced under this send: write again on the new one
            if isinstance(failure, _SEQUENCE_ERRORS):
                await self._replace_producer(generation)
                continue
            if not is_retriable(failure):
                await self._replace_producer(generation)
                raise Unwritable(_why(failure, kind), failure) from failure
            # The message waits (its offset stays uncommitted) until the broker takes the write.
            log.warning(
                "writing the %s to %s failed (%s); retrying in %.1fs",
                what,
                topic,
                type(failure).__name__,
                delay,
            )
            await anyio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _send_once(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> Exception | None:
        """One attempt: ``None`` when acknowledged, else the broker's error. Raises :class:`_Refused`
        when the client refuses the record before queueing it (larger than ``max_request_size``, neither
        key nor value, a header it cannot encode …): nothing was sent, no sequence number used."""
        generation = self._generation
        # A replaced producer may never finish a send() waiting for metadata, nor resolve the futures of
        # batches it still held: stop waiting for either once it is replaced (the caller then writes
        # again with the new one). Shielded, so the polling timeout never cancels the write itself.
        sending = asyncio.ensure_future(self._dlq_producer.send(topic, value, key=key, headers=list(headers)))
        while True:
            with anyio.move_on_after(1.0):
                try:
                    fut = await asyncio.shield(sending)
                except Exception as exc:  # classified by the caller
                    if is_retriable(exc):
                        return exc
                    raise _Refused(exc) from exc
                break
            if generation != self._generation:
                sending.cancel()
                return _Replaced("the producer was replaced while this write waited to be queued")
        while True:
            with anyio.move_on_after(1.0):
                try:
                    await asyncio.shield(fut)
                except Exception as exc:  # noqa: BLE001 - classified by the caller
                    return exc
                return None
            if generation != self._generation:
                return _Replaced("the producer was replaced while this write was in flight")

    async def dead_letter(self, msg: ConsumerRecord, letter: DeadLetter, now: float) -> str:
        """Write the dead letter; returns ``"written"``, ``"stub"``, ``"lost"`` or ``"disabled"``.

        A record with neither key nor value (another client can write one; aiokafka's producer refuses
        ``key=None, value=None``) is dead-lettered with an empty value.
        """
        if self.dlq_topic is None:
            return "disabled"
        try:
            headers = dead_letter_headers(msg, letter, self.group_id, now)
        except Exception as exc:  # noqa: BLE001 - odd original headers: write the stub instead
            return await self._stub(msg, letter, now, f"original headers unusable ({type(exc).__name__})")
        value = msg.value if msg.value is not None or msg.key is not None else b""
        try:
            await self._send("dead letter", self.dlq_topic, value, msg.key, headers)
        except Unwritable as exc:
            return await self._stub(msg, letter, now, exc.why)
        self.dead_letters += 1
        log.warning("dead-lettered: %s: %s", letter.reason, letter.detail, extra={"reason": letter.reason})
        return "written"

    async def _stub(self, msg: ConsumerRecord, letter: DeadLetter, now: float, why: str) -> str:
        assert self.dlq_topic is not None
        stub = DeadLetter(
            letter.reason,
            f"stub: {why}; {letter.detail}",
            attempts=letter.attempts,
            first_failure_at=letter.first_failure_at,
        )
        headers = dead_letter_headers(msg, stub, self.group_id, now, keep_original=False)
        try:
            await self._send("dead letter", self.dlq_topic, b"", None, headers)
        except Unwritable as exc:
            self.lost += 1
            self._count("dead_letter", "lost")
            log.error(
                "dead letter lost: neither the record nor a stub could be written (%s); %s: %s",
                exc.why,
                letter.reason,
                letter.detail,
                extra={"reason": letter.reason},
            )
            return "lost"
        self.stubs += 1
        self.dead_letters += 1
        self._count("dead_letter", "stub")
        log.error(
            "dead-lettered as a stub (%s): %s: %s",
            why,
            letter.reason,
            letter.detail,
            extra={"reason": letter.reason},
        )
        return "stub"

    def buffer_result(self, tp: TopicPartition, msg: ConsumerRecord, record: Record, subject_id: str) -> None:
        self._pending.setdefault(tp, []).append(
            (msg.offset, msg, result_event(record, subject_id), record.message_id)
        )
        self._pending_count += 1

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
            for _ in range(10):  # each round takes out at least one unwritable result
                batches = {
                    tp: [item for item in self._pending.get(tp, ()) if item[0] < offset]
                    for tp, offset in offsets.items()
                }
                unwritable: list[_Unwritten] = []
                try:
                    async with self._producer.transaction():
                        await self._send_batches(batches, unwritable)
                        await self._producer.send_offsets_to_transaction(offsets, self.group_id)
                        if on_sent is not None:
                            on_sent()
                except ProducerFenced as exc:
                    raise Fenced(str(exc) or type(exc).__name__) from exc
                except Exception as exc:  # the transaction is aborted; retried next tick
                    if _fenced_state(self._producer):
                        raise Fenced(type(exc).__name__) from exc
                    if unwritable or isinstance(exc, _SEQUENCE_ERRORS):
                        # A refused batch leaves aiokafka's sequence numbers out of step with the broker
                        # (every later transaction would fail with OutOfOrderSequenceNumber): start a new
                        # producer with the same transactional id (a new epoch, fresh sequences).
                        await self._replace_transactional_producer()
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
        await _stop_replaced(old)

    async def _send_batches(
        self, batches: dict[TopicPartition, list[_Pending]], unwritable: list[_Unwritten]
    ) -> None:
        """Send the results of one transaction; collect those the topic will never accept in
        ``unwritable`` and raise (which aborts the transaction) if any send failed."""
        assert self.results_topic is not None
        futures: list[tuple[TopicPartition, _Pending, asyncio.Future[Any]]] = []
        for tp, items in batches.items():
            for item in items:
                _, msg, value, message_id = item
                try:
                    fut = await self._producer.send(
                        self.results_topic,
                        value,
                        key=msg.key,
                        headers=[("idv-message-id", message_id.encode())],
                    )
                except Exception as exc:
                    if (
                        is_retriable(exc)
                        or isinstance(exc, (ProducerFenced, *_SEQUENCE_ERRORS))
                        or _fenced_state(self._producer)
                    ):
                        for _, _, queued in futures:  # their outcome no longer matters: aborted
                            queued.add_done_callback(_retrieve)
                        raise
                    unwritable.append((tp, item, _why(exc, "results")))
                    continue
                futures.append((tp, item, fut))
        failed: BaseException | None = None
        for tp, item, fut in futures:
            try:
                await fut
            except Exception as exc:  # noqa: BLE001 - classified; the first failure is raised below
                if not is_retriable(exc) and not isinstance(exc, (ProducerFenced, *_SEQUENCE_ERRORS)):
                    unwritable.append((tp, item, _why(exc, "results")))
                failed = failed or exc
        if failed is not None:
            raise failed
        if unwritable:
            raise _Retry

    async def _set_aside(self, unwritable: list[_Unwritten]) -> None:
        for tp, item, why in unwritable:
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
        headers = [("idv-message-id", record.message_id.encode())]
        try:
            await self._send("result", self.results_topic, result_event(record, subject_id), key, headers)
        except Unwritable:
            self.unwritable_results += 1
            self._count("result", "unwritable")
            raise
        self.results += 1


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (asyncio would log "Future exception was never retrieved")."""
    if not fut.cancelled():
        fut.exception()


async def _stop_replaced(old: AIOKafkaProducer) -> None:
    """Stop a replaced producer, but never wait long: its stop flushes batches that may never complete
    (aiokafka can wait on a partition whose sequence is broken), and the caller is a worker."""
    with anyio.move_on_after(2.0, shield=True) as scope:
        try:
            await old.stop()
        except Exception as exc:  # noqa: BLE001 - fenced or broken by design; only log it
            log.debug("stopping the replaced producer: %s", type(exc).__name__)
    if scope.cancelled_caught:
        log.warning("the replaced producer did not stop within 2s; left behind")


class _Replaced(Exception):
    """The write was in flight on a producer that has since been replaced."""


class _Refused(Exception):
    """The producer refused a record before queueing it."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


# The idempotent producer's sequence got out of step with the broker (a batch before failed): replace it.
_SEQUENCE_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)


class _Retry(Exception):
    """Abort the transaction (some results were taken out) and run it again."""


def _fenced_state(producer: AIOKafkaProducer) -> bool:
    """Whether aiokafka's transaction manager is in its fatal state (fenced by a newer producer with the
    same transactional id): it then fails every later call with an ``AssertionError`` or
    ``IllegalOperation`` instead of ``ProducerFenced``, so retrying would crash-loop."""
    manager = getattr(producer, "_txn_manager", None)
    return bool(manager is not None and manager.is_fatal_error())
