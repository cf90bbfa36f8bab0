"""Publish verification requests to Kafka: one envelope per record, keyed by subject.

The producer is idempotent (``enable_idempotence=True``, ``acks="all"``): the broker drops the duplicates
that the producer's own retries would otherwise write. That covers one producer session only; a request
re-sent by an upstream retry is a new record, and the consumer recognises it by its ``message_id``. So
callers that retry a business request pass the same ``message_id`` every time.
"""

from __future__ import annotations

import itertools
import logging
import ssl
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import anyio
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from producer.envelope import MAX_MESSAGE_BYTES, Envelope, encode
from producer.errors import PublishError
from producer.ids import new_message_id

__all__ = ["DEFAULT_BOOTSTRAP", "DEFAULT_TOPIC", "PublishResult", "Publisher"]

log = logging.getLogger(__name__)

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_TOPIC = "idv.requests"
DEFAULT_WINDOW = 1000

# Room for the key (subject_id, at most 256 ASCII bytes), the three headers and the record framing, so
# that an envelope right at max_message_bytes is not refused by aiokafka's own request-size check.
_RECORD_OVERHEAD = 4096

# These decide the delivery guarantee; letting producer_options override them would silently weaken it.
_FIXED_OPTIONS = frozenset(
    {
        "bootstrap_servers",
        "enable_idempotence",
        "acks",
        "key_serializer",
        "value_serializer",
        "transactional_id",
        "loop",
    }
)


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Where the broker stored one acknowledged record."""

    message_id: str
    topic: str
    partition: int
    offset: int


_NO_TRACING = False  # opentelemetry not importable (checked once)


def _traced(headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """``headers`` plus the caller's W3C trace context (``traceparent``, ``tracestate``), when
    opentelemetry is installed and a span is active: the consumer continues that trace."""
    global _NO_TRACING
    if _NO_TRACING:
        return headers
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        _NO_TRACING = True
        return headers
    if not trace.get_current_span().get_span_context().is_valid:
        return headers
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return [*headers, *((k, v.encode("ascii", "replace")) for k, v in carrier.items())]


def _wrap(exc: KafkaError, action: str) -> PublishError:
    # aiokafka marks a timeout as not retriable; for us it is (the same message_id may be sent again).
    # str() of an aiokafka error already starts with the class name, except when it has no message.
    err = PublishError(f"{action}: {str(exc) or type(exc).__name__}")
    err.retriable = bool(exc.retriable) or isinstance(exc, KafkaTimeoutError)
    return err


async def _settle(futures: Sequence[Awaitable[Any]]) -> list[Any]:
    """Wait for every acknowledgement, in order: each result, or the exception it failed with.

    The records are already in flight (aiokafka's delivery futures), so waiting for them one after
    another takes as long as waiting for all at once; no future is left with an unread error.
    """
    outcomes: list[Any] = []
    for future in futures:
        try:
            outcomes.append(await future)
        except Exception as exc:  # noqa: BLE001 - collected like gather(return_exceptions=True); the caller raises
            outcomes.append(exc)
    return outcomes


def new_envelope(
    operation: str,
    request: Mapping[str, Any],
    subject_id: str,
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
) -> Envelope:
    """An envelope for one request; ``message_id`` defaults to a new UUIDv7."""
    return Envelope(
        message_id=new_message_id() if message_id is None else message_id,
        operation=operation,
        subject_id=subject_id,
        request=request,
        correlation_id=correlation_id,
    )


class Publisher:
    """An idempotent Kafka producer for :class:`~producer.envelope.Envelope` records.

    Use as an async context manager::

        async with Publisher("127.0.0.1:9092", "idv.requests") as publisher:
            result = await publisher.publish("aml_screening", {"full_name": "..."}, "applicant-42")

    ``max_message_bytes`` bounds the encoded envelope (checked before sending, raising
    :class:`~producer.errors.EnvelopeTooLarge`). ``window`` is how many records :meth:`publish_many`
    hands to the producer before waiting for their acknowledgements. ``topic_wait_s`` bounds the wait
    for the topic's metadata on entry. ``producer_options`` passes further
    keyword arguments to :class:`aiokafka.AIOKafkaProducer` (``linger_ms``, ``compression_type``, ...);
    the options that decide the delivery guarantee cannot be overridden.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str] = DEFAULT_BOOTSTRAP,
        topic: str = DEFAULT_TOPIC,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        client_id: str = "idv-publisher",
        security_protocol: str = "PLAINTEXT",
        sasl_mechanism: str | None = None,
        sasl_plain_username: str | None = None,
        sasl_plain_password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        window: int = DEFAULT_WINDOW,
        topic_wait_s: float = 10.0,
        producer_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not topic:
            raise ValueError("topic must not be empty")
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")
        if window <= 0:
            raise ValueError("window must be positive")
        options = dict(producer_options or {})
        fixed = sorted(_FIXED_OPTIONS.intersection(options))
        if fixed:
            raise ValueError(f"producer_options may not set {', '.join(fixed)}")
        self.topic = topic
        self.max_message_bytes = max_message_bytes
        self.window = window
        self.topic_wait_s = topic_wait_s
        config: dict[str, Any] = {
            "bootstrap_servers": (
                bootstrap_servers if isinstance(bootstrap_servers, str) else list(bootstrap_servers)
            ),
            "client_id": client_id,
            "enable_idempotence": True,
            "acks": "all",
            "max_request_size": max_message_bytes + _RECORD_OVERHEAD,
            "security_protocol": security_protocol,
            "ssl_context": ssl_context,
            "sasl_plain_username": sasl_plain_username,
            "sasl_plain_password": sasl_plain_password,
        }
        if sasl_mechanism is not None:
            config["sasl_mechanism"] = sasl_mechanism
        config.update(options)
        self._config = config
        self._producer: AIOKafkaProducer | None = None

    @property
    def producer_config(self) -> dict[str, Any]:
        """The keyword arguments given to ``AIOKafkaProducer``, with the SASL password masked."""
        shown = dict(self._config)
        if shown.get("sasl_plain_password") is not None:
            # A mask, not a credential.
            shown["sasl_plain_password"] = "***"  # noqa: S105
        return shown

    def __repr__(self) -> str:
        return f"<Publisher topic={self.topic!r} bootstrap={self._config['bootstrap_servers']!r}>"

    async def __aenter__(self) -> Self:
        if self._producer is not None:
            raise RuntimeError("Publisher is already started")
        producer = AIOKafkaProducer(**self._config)
        try:
            await producer.start()
            # Fail here, not at the first send, when the topic is missing or not authorised; aiokafka
            # alone would keep asking for request_timeout_ms (40 s by default).
            with anyio.fail_after(self.topic_wait_s):
                await producer.partitions_for(self.topic)
        except TimeoutError:
            await producer.stop()
            raise PublishError(f"topic {self.topic!r} not found within {self.topic_wait_s} s") from None
        except KafkaError as exc:
            await producer.stop()
            raise _wrap(exc, f"cannot start producer for topic {self.topic!r}") from exc
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        log.debug("publisher started for topic %s", self.topic)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            # stop() flushes what is still in the accumulator before closing.
            await producer.stop()
        except KafkaError as err:
            if exc is None:
                raise _wrap(err, "producer did not stop cleanly") from err
            log.warning("producer did not stop cleanly: %s", type(err).__name__)

    def _started(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("Publisher is not started; use 'async with Publisher(...)'")
        return self._producer

    async def publish(
        self, operation: str, request: Mapping[str, Any], subject_id: str, *,
        message_id: str | None = None, correlation_id: str | None = None,
    ) -> PublishResult:  # fmt: skip
        """Validate, send and wait for the acknowledgement of one request.

        ``message_id`` defaults to a new UUIDv7; pass the earlier ID when re-sending the same business
        request so that the consumer processes it only once.
        """
        envelope = new_envelope(
            operation, request, subject_id, message_id=message_id, correlation_id=correlation_id
        )
        return await self.publish_envelope(envelope)

    async def publish_envelope(self, envelope: Envelope) -> PublishResult:
        results = await self._publish_window([envelope])
        return results[0]

    async def publish_many(self, envelopes: Iterable[Envelope]) -> list[PublishResult]:
        """Publish many envelopes, in order, and return their results in the same order.

        Records are handed to the producer ``window`` at a time and the acknowledgements awaited per
        window, so batching happens in aiokafka's accumulator rather than one round trip per record.
        If a record fails, :class:`~producer.errors.PublishError` is raised after the rest of its window
        has settled; records of earlier windows are published, later ones are not sent.
        """
        results: list[PublishResult] = []
        iterator = iter(envelopes)
        while chunk := list(itertools.islice(iterator, self.window)):
            results.extend(await self._publish_window(chunk))
        return results

    async def _publish_window(self, envelopes: Sequence[Envelope]) -> list[PublishResult]:
        producer = self._started()
        # Encode everything first so an invalid envelope stops the window before anything is sent.
        encoded = [encode(envelope, max_bytes=self.max_message_bytes) for envelope in envelopes]
        futures: list[Awaitable[Any]] = []
        try:
            for envelope, value in zip(envelopes, encoded, strict=True):
                futures.append(
                    await producer.send(
                        self.topic, value=value, key=envelope.key, headers=_traced(envelope.headers())
                    )
                )
        except KafkaError as exc:
            # Let the records already handed over settle, so no future is left with an unread error.
            await _settle(futures)
            raise _wrap(exc, "send failed") from exc
        outcomes = await _settle(futures)
        results: list[PublishResult] = []
        for envelope, outcome in zip(envelopes, outcomes, strict=True):
            if isinstance(outcome, KafkaError):
                raise _wrap(outcome, "broker did not acknowledge") from outcome
            if isinstance(outcome, BaseException):
                raise outcome
            results.append(
                PublishResult(envelope.message_id, outcome.topic, outcome.partition, outcome.offset)
            )
        log.debug("published %d records to %s", len(results), self.topic)
        return results
