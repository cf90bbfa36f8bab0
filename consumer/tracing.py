"""Tracing: OpenTelemetry spans per message, W3C trace context read from and written to Kafka headers.

Optional: the ``tracing`` extra (opentelemetry-api, -sdk, -exporter-otlp-proto-http,
-instrumentation-aiohttp-client). Nothing is imported until :func:`session` turns tracing on
(``IDV_TRACING=true``); until then every helper here returns a shared no-op object, so the hot path pays a
function call and a ``with`` per span, nothing more (numbers in docs/operations.md#tracing).

Spans (names and attributes never carry the payload, the subject ID, names or document numbers; an
exception is recorded by its type only, because messages may quote data):

* ``idv.process`` (CONSUMER) — one per message, continuing the ``traceparent``/``tracestate`` of the
  record's headers: ``messaging.*`` topic, partition, offset, consumer group, ``idv.operation``,
  ``idv.key_hash``, ``idv.disposition``;
* children: ``idv.claim``, ``idv.record`` (the dedupe-store writes; also ``idv.renew``, ``idv.store.get``),
  ``idv.provider`` (the call with its retries; each HTTP attempt is a ``POST`` CLIENT span from the aiohttp
  client instrumentation), ``idv.result`` / ``idv.dead_letter`` (PRODUCER);
* the result and dead-letter records get the ``traceparent`` (and ``tracestate``) of their span, replacing
  the request's own in a dead letter, so the trace goes on downstream and through a redrive.

Export: OTLP over HTTP, configured by the standard variables (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER`` …);
``OTEL_TRACES_EXPORTER=console`` prints spans, ``none`` exports nothing, ``OTEL_SDK_DISABLED=true`` turns
tracing off whatever ``IDV_TRACING`` says.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import anyio

from consumer.errors import ConfigurationError

if TYPE_CHECKING:
    from aiokafka.structs import ConsumerRecord

    from consumer.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "TRACE_HEADERS",
    "Tracer",
    "annotate",
    "available",
    "enabled",
    "inject",
    "install",
    "message",
    "producer_span",
    "session",
    "span",
    "store_span",
    "uninstall",
]

TRACE_HEADERS = ("traceparent", "tracestate")
_SERVICE_NAME = "idv-consumer"
_STORE_SPANS = {
    "claim": "idv.claim",
    "complete": "idv.record",
    "record_conflict": "idv.record",
    "renew": "idv.renew",
    "get": "idv.store.get",
}


class _NoopSpan:
    """What every helper yields while tracing is off: a context manager and a span that does nothing."""

    __slots__ = ()

    def __enter__(self) -> _NoopSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None


_NOOP = _NoopSpan()


def available() -> bool:
    """Whether the tracing extra is installed (the SDK and the OTLP/HTTP exporter)."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


class Tracer:
    """Spans of one tracer provider, and the W3C propagation to and from Kafka headers."""

    def __init__(self, provider: Any, *, group_id: str = "") -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.group_id = group_id
        self._trace = trace
        self._tracer = provider.get_tracer("consumer")
        self._propagator = TraceContextTextMapPropagator()
        self._kind = SpanKind
        self._error = Status
        self._code = StatusCode
        self.instrumented_aiohttp = False

    @contextmanager
    def span(
        self, name: str, kind: Any = None, attributes: dict[str, Any] | None = None, parent: Any = None
    ) -> Iterator[Any]:
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=kind if kind is not None else self._kind.INTERNAL,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as current:
            try:
                yield current
            except BaseException as exc:
                # The type only: exception messages can quote the data that caused them.
                current.set_attribute("exception.type", type(exc).__name__)
                current.set_status(self._error(self._code.ERROR, type(exc).__name__))
                raise

    def message(self, msg: ConsumerRecord) -> Any:
        try:
            # _HeaderGetter has Getter's two methods; subclassing it would import opentelemetry here.
            parent = self._propagator.extract(msg.headers or (), getter=_HEADERS)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - odd headers must not cost the message: start a new trace
            parent = None
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": msg.topic,
            "messaging.destination.partition.id": str(msg.partition),
            "messaging.kafka.offset": msg.offset,
        }
        if self.group_id:
            attributes["messaging.consumer.group.name"] = self.group_id
        return self.span("idv.process", self._kind.CONSUMER, attributes, parent)

    def inject(self, headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """``headers`` with the current span's trace context instead of any they had."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        if not carrier:
            return headers
        kept = [(k, v) for k, v in headers if k not in TRACE_HEADERS]
        return [*kept, *((k, v.encode("ascii", "replace")) for k, v in carrier.items())]

    def annotate(self, operation: str, key: str) -> None:
        current = self._trace.get_current_span()
        if current.is_recording():
            current.set_attribute("idv.operation", operation)
            current.set_attribute("idv.key_hash", hashlib.sha256(key.encode()).hexdigest()[:12])

    def shutdown(self) -> None:
        self.provider.force_flush(5_000)
        self.provider.shutdown()


class _HeaderGetter:
    """Reads W3C trace context from Kafka headers: a list of ``(str, bytes | None)``, names may repeat."""

    def get(self, carrier: Sequence[tuple[str, bytes | None]], key: str) -> list[str] | None:
        values = [v.decode("ascii", "replace") for k, v in carrier if k.lower() == key and v is not None]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, bytes | None]]) -> list[str]:
        return [k for k, _ in carrier]


_HEADERS = _HeaderGetter()

# The active tracer (None: tracing off). One per process; tests install their own.
_active: Tracer | None = None


def enabled() -> bool:
    return _active is not None


def install(tracer: Tracer | None) -> None:
    global _active
    _active = tracer


def uninstall() -> None:
    install(None)


def message(msg: ConsumerRecord) -> Any:
    """The ``idv.process`` span of one record, child of the trace context in its headers."""
    return _NOOP if _active is None else _active.message(msg)


def span(name: str) -> Any:
    """A child span of the current one (``idv.provider`` …)."""
    return _NOOP if _active is None else _active.span(name)


def store_span(what: str) -> Any:
    """The span of one dedupe-store operation (``claim`` → ``idv.claim``, ``complete`` → ``idv.record``)."""
    if _active is None:
        return _NOOP
    return _active.span(_STORE_SPANS.get(what, "idv.store." + what))


def producer_span(name: str, topic: str | None, reason: str | None = None) -> Any:
    """A PRODUCER span for a record the daemon writes (``idv.result``, ``idv.dead_letter`` with its
    reason code)."""
    if _active is None:
        return _NOOP
    attrs: dict[str, Any] = {"messaging.system": "kafka", "messaging.operation.type": "send"}
    if reason is not None:
        attrs["idv.dlq.reason"] = reason
    if topic is not None:
        attrs["messaging.destination.name"] = topic
    return _active.span(name, _active._kind.PRODUCER, attrs)


def annotate(operation: str, key: str) -> None:
    """Put the operation and the key's hash on the current span (never the key's inputs)."""
    if _active is not None:
        _active.annotate(operation, key)


def inject(headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Headers of a record the daemon writes, carrying the current trace context (unchanged when off)."""
    return headers if _active is None else _active.inject(headers)


def build(settings: Settings, *, exporter: Any = None) -> Tracer | None:
    """A tracer for the daemon, or None when tracing is off. ``exporter`` (tests: the SDK's in-memory one)
    replaces the one the OTEL_* variables choose, and is exported to synchronously."""
    if not settings.tracing or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if not available():
        raise ConfigurationError(
            "IDV_TRACING=true needs the tracing extra: pip install 'idv-exactly-once[tracing]'"
        )
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the default names the daemon.
    defaults = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: _SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(defaults))  # sampler: OTEL_TRACES_SAMPLER
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        if kind == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif kind != "none":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Endpoint, headers, timeout and compression from OTEL_EXPORTER_OTLP_[TRACES_]* variables.
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracer(provider, group_id=settings.group_id)


def _instrument_aiohttp(tracer: Tracer) -> None:
    """The HTTP CLIENT span of every provider attempt (consumer/http.py's transport is aiohttp
    underneath). Sessions made after this are traced; the provider's is made on its first request."""
    try:
        from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    except ImportError:
        log.warning("opentelemetry-instrumentation-aiohttp-client missing: no HTTP spans")
        return
    instrumentor = AioHttpClientInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        return
    instrumentor.instrument(tracer_provider=tracer.provider)
    tracer.instrumented_aiohttp = True


def _uninstrument_aiohttp(tracer: Tracer) -> None:
    if tracer.instrumented_aiohttp:
        from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor

        AioHttpClientInstrumentor().uninstrument()
        tracer.instrumented_aiohttp = False


@asynccontextmanager
async def session(settings: Settings, *, exporter: Any = None) -> AsyncIterator[Tracer | None]:
    """Tracing for the daemon's run: installed on entry (if ``IDV_TRACING`` is on), flushed and removed
    on exit. Raises :class:`ConfigurationError` when it is on but the extra is missing."""
    tracer = build(settings, exporter=exporter)
    if tracer is None:
        yield None
        return
    install(tracer)
    _instrument_aiohttp(tracer)
    log.info("tracing on", extra={"otlp_endpoint": _endpoint()})
    try:
        yield tracer
    finally:
        uninstall()
        _uninstrument_aiohttp(tracer)
        # A collector that is away must not hold up the exit for long: bounded, and in a thread.
        with anyio.move_on_after(6.0, shield=True):
            await anyio.to_thread.run_sync(tracer.shutdown, abandon_on_cancel=True)


def _endpoint() -> str:
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or "http://localhost:4318"
    )
