"""The producers behind the sinks: one idempotent ``acks=all`` send that retries what may heal, refuses
what never will (:class:`Unwritable`), and replaces a producer whose sequence numbers broke.

If a write fails *retriably* (broker down, leader moving, topic missing, timeouts) the message waits and
the write is retried (backoff, no ceiling): nothing is committed past a message whose dead letter or result
is not on the broker. A write that can never succeed (the record is larger than the topic accepts, the
broker rejects it as invalid, the daemon may not write the topic: ``retriable = False`` on the aiokafka
error, or an error that is not a ``KafkaError`` at all) is not retried: retrying it would stall the
partition forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
)

log = logging.getLogger(__name__)

__all__ = [
    "SEQUENCE_ERRORS",
    "Producers",
    "Unwritable",
    "fenced_state",
    "is_retriable",
    "retrieve",
    "stop_replaced",
    "why_unwritable",
]


class Unwritable(Exception):
    """A write the broker will never accept (retrying cannot help); ``why`` is a short explanation."""

    def __init__(self, why: str, cause: BaseException) -> None:
        super().__init__(why)
        self.why = why
        self.cause = cause


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


def why_unwritable(exc: BaseException, topic_kind: str) -> str:
    name = type(exc).__name__
    if "TooLarge" in name:
        return f"original record too large for the {topic_kind} topic ({name})"
    return f"original record rejected by the {topic_kind} topic ({name}, not retriable)"


class Producers:
    """The transactional producer (results, transactional mode) and the idempotent, non-transactional one
    (dead letters; results too when not transactional): start, stop, send with retry, replace."""

    def __init__(
        self,
        *,
        bootstrap: str,
        group_id: str,
        producer_kwargs: dict[str, Any] | None = None,
        max_request_size: int = 16 * 1024 * 1024,
        transactional_id: str | None = None,
    ) -> None:
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
        self._alone: AIOKafkaProducer | None = None  # see _send_alone
        self._alone_lock = anyio.Lock()
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
        if self._alone is not None:
            alone, self._alone = self._alone, None
            await stop_replaced(alone)
        if self._started:
            self._started = False
            try:
                if self._dlq_producer is not self._producer:
                    await self._dlq_producer.stop()
            finally:
                await self._producer.stop()

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
        await stop_replaced(old)

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
                raise Unwritable(why_unwritable(refused.cause, kind), refused.cause) from refused.cause
            if failure is None:
                return
            if generation != self._generation:
                continue  # the producer was replaced under this send: write again on the new one
            if isinstance(failure, SEQUENCE_ERRORS):
                await self._replace_producer(generation)
                continue
            if not is_retriable(failure):
                await self._replace_producer(generation)
                # The broker refuses a whole batch for one record it will never take (too large, invalid),
                # and every record in that batch gets the same error: only a write of this record alone
                # tells whether it is the one.
                failure = await self._send_alone(topic, value, key, headers)
                if failure is None:
                    return
                if not is_retriable(failure):
                    raise Unwritable(why_unwritable(failure, kind), failure) from failure
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

    async def _send_alone(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> Exception | None:
        """Write one record in a batch of its own: on a producer of its own, one record at a time.

        ``None`` when acknowledged, else the broker's verdict on this record alone. Used only after a
        refusal, so the extra producer is started then and replaced after a refusal of its own (its
        sequence numbers break as the main one's do)."""
        async with self._alone_lock:
            if self._alone is None:
                producer = self._make(None)
                try:
                    await producer.start()
                except Exception as exc:  # noqa: BLE001 - broker away: the caller retries
                    away: Exception = KafkaTimeoutError(f"no lone-write producer ({type(exc).__name__})")
                    return away
                self._alone = producer
            try:
                await self._alone.send_and_wait(topic, value, key=key, headers=list(headers))
            except Exception as exc:  # noqa: BLE001 - classified by the caller
                if not is_retriable(exc):
                    old, self._alone = self._alone, None
                    await stop_replaced(old)
                return exc
            return None

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


def retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (asyncio would log "Future exception was never retrieved")."""
    if not fut.cancelled():
        fut.exception()


async def stop_replaced(old: AIOKafkaProducer) -> None:
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
SEQUENCE_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)


def fenced_state(producer: AIOKafkaProducer) -> bool:
    """Whether aiokafka's transaction manager is in its fatal state (fenced by a newer producer with the
    same transactional id): it then fails every later call with an ``AssertionError`` or
    ``IllegalOperation`` instead of ``ProducerFenced``, so retrying would crash-loop."""
    manager = getattr(producer, "_txn_manager", None)
    return bool(manager is not None and manager.is_fatal_error())
