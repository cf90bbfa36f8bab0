"""The events producer of the webhook intake: one accepted delivery → one record, acknowledged by the broker
before the provider hears 2xx.

The producer is idempotent (``enable_idempotence=True``, hence ``acks="all"``): its own retries of a
batch never write a record twice, and records of one key keep their order. :meth:`EventPublisher.publish`
returns only once the broker acknowledged the record (every in-sync replica has it); any failure, or no
acknowledgement within ``timeout_s``, raises :class:`EventNotDurable` and the delivery is answered 503, so
the provider sends it again. A record whose acknowledgement came too late may still be written: the
provider's retry then makes a duplicate, which is expected (events are deduplicated when applied, not
here). What can never happen is a 2xx for a record the broker does not have.

The record: key = ``session_id`` (one session's events stay in one partition, in order), value = the body
exactly as received, headers ``idv-provider``, ``idv-event-type``, ``idv-received-at`` (unix ms).

The producer starts lazily when the first record needs it if :meth:`EventPublisher.start` was not called or
failed (a broker that is down at start-up → 503s until it is back, never a 2xx).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumer.errors import ConsumerError

log = logging.getLogger(__name__)

__all__ = ["EventNotDurable", "EventPublisher", "event_headers"]

PROVIDER = "didit"


class EventNotDurable(ConsumerError):
    """The broker did not acknowledge the event (unreachable, refused, or not in time): answered 503.

    ``reason`` is a short code for the metric and the log (``unavailable``, ``timeout``, ``refused``)."""

    retriable = True

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def event_headers(webhook_type: str, received_at_ms: int | None = None) -> list[tuple[str, bytes]]:
    """The record headers of one event (docs/webhooks.md, "The events topic")."""
    ms = int(time.time() * 1000) if received_at_ms is None else received_at_ms
    return [
        ("idv-provider", PROVIDER.encode()),
        ("idv-event-type", webhook_type.encode("utf-8")),
        ("idv-received-at", str(ms).encode()),
    ]


class EventPublisher:
    """Publishes accepted events to ``topic``; ``security`` are aiokafka TLS/SASL keyword arguments
    (:func:`consumer.security.kafka_security_kwargs`)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        security: Mapping[str, Any] | None = None,
        client_id: str = "idv-webhooks",
        timeout_s: float = 5.0,
        max_request_size: int = 1_048_576,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s
        self._options: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "client_id": client_id,
            "acks": "all",
            "enable_idempotence": True,
            "max_request_size": max_request_size,
            # A batch the broker has not acknowledged in this long is failed by aiokafka itself; the
            # caller has long answered 503 by then.
            "request_timeout_ms": max(1000, int(timeout_s * 1000)),
            "metadata_max_age_ms": 60_000,
            **(security or {}),
        }
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def ready(self) -> bool:
        """Whether the producer is started (a publish does not have to connect first)."""
        return self._producer is not None and not self._closed

    async def start(self) -> None:
        """Start the producer now; raises :class:`EventNotDurable` when the broker cannot be reached."""
        async with self._lock:
            await self._start_locked()

    async def _start_locked(self) -> AIOKafkaProducer:
        if self._closed:
            raise EventNotDurable("unavailable", "the events producer is closed (shutting down)")
        if self._producer is not None:
            return self._producer
        producer = AIOKafkaProducer(**self._options)
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            with anyio.CancelScope(shield=True):
                await _quiet_stop(producer)
            raise EventNotDurable(
                "unavailable", f"cannot reach Kafka at {self.bootstrap}: {type(exc).__name__}"
            ) from None
        self._producer = producer
        log.info("events producer started", extra={"topic": self.topic})
        return producer

    async def publish(
        self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> tuple[int, int]:
        """Write one record and wait for the broker's acknowledgement; returns (partition, offset)."""
        started = time.monotonic()
        try:
            with anyio.fail_after(self.timeout_s):
                async with self._lock:
                    producer = await self._start_locked()
                future = await producer.send(self.topic, value, key=key, headers=list(headers))
                # Shielded: a timeout abandons the wait, never the batch (aiokafka keeps retrying it; a
                # late success is a duplicate the provider's retry makes anyway).
                metadata = await asyncio.shield(future)
        except TimeoutError:
            raise EventNotDurable(
                "timeout", f"no acknowledgement from Kafka within {self.timeout_s:g}s"
            ) from None
        except KafkaError as exc:
            raise EventNotDurable("refused", f"Kafka did not take the event: {type(exc).__name__}") from None
        log.debug(
            "event acknowledged in %.1f ms",
            (time.monotonic() - started) * 1000,
            extra={"partition": metadata.partition, "offset": metadata.offset},
        )
        return metadata.partition, metadata.offset

    async def topic_exists(self) -> bool:
        """Whether the events topic is known to the broker (start-up check)."""
        async with self._lock:
            producer = await self._start_locked()
        try:
            with anyio.fail_after(self.timeout_s):
                partitions = await producer.partitions_for(self.topic)
        except (TimeoutError, KafkaError):
            return False
        return bool(partitions)

    async def stop(self) -> None:
        """Flush and close (idempotent). Records still being acknowledged finish first."""
        async with self._lock:
            self._closed = True
            producer, self._producer = self._producer, None
        if producer is not None:
            with anyio.CancelScope(shield=True):
                await _quiet_stop(producer)
            log.info("events producer stopped")


async def _quiet_stop(producer: AIOKafkaProducer) -> None:
    # aiokafka 0.14: stop() right after a failed or fresh start() can meet a background task cancelled
    # before it ran; one scheduling round first.
    await anyio.lowlevel.checkpoint()
    try:
        await producer.stop()
    except (KafkaError, OSError) as exc:
        log.warning("events producer did not close cleanly: %s", type(exc).__name__)
