"""Prometheus metrics of one daemon.

Each :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry` instead of the library's
global one, so tests and several daemons in one process never collide, and :meth:`Metrics.render` shows
exactly this daemon's samples.

The recording methods are called on the hot path (several per message). Labelled children are looked up
once and cached in plain dictionaries keyed by the label values, so a call costs a dict lookup and an
increment, not a ``labels(**kwargs)`` round with string conversion. Label values with a fixed vocabulary
(disposition, outcome status, circuit state) are checked against it; anything unexpected is counted as
``other`` rather than raising, because a metric must never fail the message it describes, and must never
grow a label set from data.

Metric names (all prefixed ``idv_``) are listed in :data:`METRIC_NAMES` and in docs/operations.md.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.context_managers import Timer
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

__all__ = [
    "CIRCUIT_STATES",
    "CONTENT_TYPE",
    "DISPOSITIONS",
    "METRIC_NAMES",
    "OUTCOME_STATUSES",
    "PROVIDER_LATENCY_BUCKETS",
    "RECONCILIATIONS",
    "STORE_LATENCY_BUCKETS",
    "Metrics",
]

# The classic text format (what prometheus_client itself answers a scraper that sends no Accept header);
# every metric and label name here is a legacy-valid name, so the output is 0.0.4 as it stands.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DISPOSITIONS = frozenset(
    {"completed", "failed", "duplicate", "conflict", "invalid", "set_aside", "in_doubt", "dead_lettered"}
)
OUTCOME_STATUSES = frozenset(
    {"approved", "declined", "review", "created", "abandoned", "expired", "failed", "unknown"}
)
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}
#: Results of a lookup before a resend (``idv_reconciliations``), in the order their series are created.
RECONCILIATIONS = ("found", "not_found", "in_doubt")

# Provider calls: a fast sandbox answers in ~5 ms, a slow real one in seconds, the timeout is 10-30 s.
PROVIDER_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)
# Store operations: a shared SQLite fsync is ~1 ms, a PostgreSQL round trip a few ms; seconds mean trouble.
STORE_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

METRIC_NAMES = (
    "idv_messages_consumed_total",
    "idv_messages_finished_total",
    "idv_dead_letters_total",
    "idv_in_doubt_total",
    "idv_provider_calls_total",
    "idv_provider_call_duration_seconds",
    "idv_provider_retries_total",
    "idv_provider_replays_total",
    "idv_reconciliations_total",
    "idv_messages_in_flight",
    "idv_committed_offset",
    "idv_consumer_lag",
    "idv_store_operation_duration_seconds",
    "idv_circuit_breaker_state",
    "idv_concurrency_limit",
    "idv_event_loop_lag_seconds",
    "idv_provider_in_flight",
)

_NONE = "none"
_OTHER = "other"
M = TypeVar("M", bound=MetricWrapperBase)


def _label(value: str | enum.Enum | None) -> str:
    if value is None:
        return _NONE
    if isinstance(value, enum.Enum):
        value = value.value
    return str(value)


class _Children(Generic[M]):
    """A labelled metric's children, each looked up once per label values and kept in a plain dict keyed by
    the raw values the caller passes (``labels`` turns them into the label strings)."""

    __slots__ = ("_children", "_labels", "_metric")

    def __init__(self, metric: M, labels: Callable[[Any], tuple[str, ...]]) -> None:
        self._metric = metric
        self._labels = labels
        self._children: dict[Hashable, M] = {}

    def __call__(self, key: Hashable) -> M:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._metric.labels(*self._labels(key))
        return child

    def forget(self, key: Hashable) -> None:
        if self._children.pop(key, None) is not None:
            self._metric.remove(*self._labels(key))


def _topic_partition(key: tuple[str, int]) -> tuple[str, str]:
    return key[0], str(key[1])


def _finished_labels(key: tuple[str, str]) -> tuple[str, str]:
    """Disposition and status outside their vocabularies are counted as ``other``, never a new label."""
    d, s = key
    return (d if d in DISPOSITIONS else _OTHER, s if s == _NONE or s in OUTCOME_STATUSES else _OTHER)


class _WithoutCreated(Collector):
    """The registry's samples minus the ``*_created`` timestamps prometheus_client adds to every counter and
    histogram child. In the text format they become a second series per child that dashboards never use
    (Prometheus tracks resets itself); dropping them here halves the scrape without touching the
    process-wide ``disable_created_metrics()`` switch other code in the process may rely on."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    """The daemon's metrics in a registry of their own.

    ::

        metrics = Metrics()
        metrics.consumed("idv.requests", 3)
        metrics.finished("completed", "approved")
        with metrics.time_store("claim"):
            ...
        body = metrics.render()   # Prometheus text format, serve with CONTENT_TYPE
    """

    def __init__(self, *, registry: CollectorRegistry | None = None, process_metrics: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._exposed = _WithoutCreated(self.registry)
        if process_metrics:
            # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
            ProcessCollector(registry=self.registry)
        r = self.registry
        self._consumed = Counter(
            "idv_messages_consumed",
            "Records fetched from Kafka and dispatched for processing.",
            ("topic", "partition"),
            registry=r,
        )
        self._finished = Counter(
            "idv_messages_finished",
            "Messages whose handling ended, by disposition and provider outcome status "
            "(status is 'none' where no outcome applies).",
            ("disposition", "status"),
            registry=r,
        )
        self._dead_letters = Counter(
            "idv_dead_letters",
            "Messages written to the dead-letter topic, by reason.",
            ("reason",),
            registry=r,
        )
        self._in_doubt = Counter(
            "idv_in_doubt",
            "Messages set aside in doubt: the provider may have acted, the outcome is unknown (422 "
            "idempotency_key_reused, or unfinished past the provider's key retention). Never FAILED.",
            registry=r,
        )
        self._sink_failures = Counter(
            "idv_sink_write_failures",
            "Writes the broker will never accept: dead letters written as stubs or lost, result events "
            "that could not be written (their messages are dead-lettered).",
            ("sink", "outcome"),
            registry=r,
        )
        # Every series exists from the start at 0, so an alert sees the first increase (and the dashboard
        # a flat line instead of "no data").
        for sink, outcome in (("dead_letter", "stub"), ("dead_letter", "lost"), ("result", "unwritable")):
            self._sink_failures.labels(sink, outcome)
        self._provider_calls = Counter(
            "idv_provider_calls",
            "Provider HTTP attempts by response status code, or 'transport_error' when none came back.",
            ("status",),
            registry=r,
        )
        self._provider_latency = Histogram(
            "idv_provider_call_duration_seconds",
            "Duration of one provider HTTP attempt (each retry is observed separately).",
            buckets=PROVIDER_LATENCY_BUCKETS,
            registry=r,
        )
        self._provider_retries = Counter(
            "idv_provider_retries", "Provider attempts that were retries of an earlier attempt.", registry=r
        )
        self._provider_replays = Counter(
            "idv_provider_replays",
            "Provider answers carrying Idempotent-Replayed: true (the provider answered from its idempotency "
            "cache: an earlier attempt with this key had reached it).",
            registry=r,
        )
        self._reconciliations = Counter(
            "idv_reconciliations",
            "Lookups of an earlier attempt before a resend, for a provider without idempotency keys: found "
            "(its answer recorded, no call), not_found (sent), in_doubt (could not look; dead-lettered).",
            ("result",),
            registry=r,
        )
        self._in_flight = Gauge(
            "idv_messages_in_flight",
            "Messages between fetch and done, running or waiting behind their key (max IDV_MAX_BUFFERED).",
            registry=r,
        )
        self._committed = Gauge(
            "idv_committed_offset",
            "Last offset committed to Kafka for the consumer group (the next offset to read).",
            ("topic", "partition"),
            registry=r,
        )
        self._lag = Gauge(
            "idv_consumer_lag",
            "Records between the committed offset and the partition's end (high watermark).",
            ("topic", "partition"),
            registry=r,
        )
        self._store_latency = Histogram(
            "idv_store_operation_duration_seconds",
            "Duration of one dedupe-store operation (including its durable commit).",
            ("op",),
            buckets=STORE_LATENCY_BUCKETS,
            registry=r,
        )
        self._circuit = Gauge(
            "idv_circuit_breaker_state",
            "Provider circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=r,
        )
        self._concurrency_limit = Gauge(
            "idv_concurrency_limit",
            "Provider calls allowed in flight at once (adaptive: between IDV_CONCURRENCY_MIN and "
            "IDV_MAX_IN_FLIGHT).",
            registry=r,
        )
        self._loop_lag = Gauge(
            "idv_event_loop_lag_seconds",
            "How late a 50-ms timer fires on the daemon's event loop (smoothed): time a ready callback "
            "waits for the CPU. Tens of milliseconds: the daemon is CPU-bound.",
            registry=r,
        )
        self._provider_in_flight = Gauge(
            "idv_provider_in_flight",
            "Provider attempts in flight now (holding a concurrency slot).",
            registry=r,
        )
        # Labelled children, cached by the raw label values the caller passes.
        self._consumed_children = _Children(self._consumed, _topic_partition)
        self._finished_children = _Children(self._finished, _finished_labels)
        self._dead_letter_children = _Children(self._dead_letters, lambda reason: (reason,))
        self._provider_children = _Children(self._provider_calls, lambda key: (str(key),))
        self._committed_children = _Children(self._committed, _topic_partition)
        self._lag_children = _Children(self._lag, _topic_partition)
        self._store_children = _Children(self._store_latency, lambda op: (op,))
        self._reconciliation_children = _Children(self._reconciliations, lambda result: (result,))
        for result in RECONCILIATIONS:  # every series from the start, at 0
            self._reconciliation_children(result)

    # -- messages ------------------------------------------------------------------------------------

    def consumed(self, topic: str, partition: int) -> None:
        """One record fetched and dispatched."""
        self._consumed_children((topic, partition)).inc()

    def finished(self, disposition: str | enum.Enum, status: str | None = None) -> None:
        """A message's handling ended. ``disposition`` is a :data:`DISPOSITIONS` value (or an enum whose
        value is one, such as ``pipeline.Disposition``); ``status`` the outcome's status, if any."""
        self._finished_children((_label(disposition), _NONE if status is None else status)).inc()

    def dead_letter(self, reason: str) -> None:
        """One message written to the dead-letter topic. ``reason`` is a short code (``too_large``,
        ``retries_exhausted``, an envelope reason code …), never free text."""
        self._dead_letter_children(reason).inc()
        if reason == "in_doubt":
            self._in_doubt.inc()

    def sink_write_failure(self, sink: str, outcome: str) -> None:
        """A write that can never succeed: ``sink`` is dead_letter or result, ``outcome`` stub, lost or
        unwritable (short codes, never free text)."""
        self._sink_failures.labels(sink, outcome).inc()

    def set_in_flight(self, n: int) -> None:
        self._in_flight.set(n)

    # -- provider ------------------------------------------------------------------------------------

    def provider_call(self, status: int | None, seconds: float) -> None:
        """One HTTP attempt: its response status code, or ``None`` when no response came back (timeout,
        refused, reset), counted as ``transport_error``."""
        self._provider_children("transport_error" if status is None else status).inc()
        self._provider_latency.observe(seconds)

    def provider_retry(self) -> None:
        self._provider_retries.inc()

    def provider_replay(self) -> None:
        self._provider_replays.inc()

    def reconciliation(self, result: str) -> None:
        """One lookup of an earlier attempt: ``found``, ``not_found`` or ``in_doubt``; anything else counts
        as ``other`` (the cache is keyed by the counted label, so it never grows from data)."""
        self._reconciliation_children(result if result in RECONCILIATIONS else _OTHER).inc()

    def circuit(self, state: int | str) -> None:
        """Circuit-breaker state: 0/'closed', 1/'half_open', 2/'open' (a ``BreakerState`` works as is,
        so ``CircuitBreaker(on_change=metrics.circuit)``)."""
        value = CIRCUIT_STATES[state.lower()] if isinstance(state, str) else int(state)
        if value not in (0, 1, 2):
            raise ValueError(f"circuit state must be 0, 1 or 2, not {state!r}")
        self._circuit.set(value)

    def watch_concurrency(self, limit: Callable[[], float], in_flight: Callable[[], float]) -> None:
        """Read the concurrency limit and the attempts in flight at scrape time (no hot-path cost)."""
        self._concurrency_limit.set_function(limit)
        self._provider_in_flight.set_function(in_flight)

    def watch_loop_lag(self, lag: Callable[[], float]) -> None:
        """Read the event-loop lag at scrape time (consumer/looplag.py)."""
        self._loop_lag.set_function(lag)

    # -- offsets -------------------------------------------------------------------------------------

    def committed(self, topic: str, partition: int, offset: int) -> None:
        self._committed_children((topic, partition)).set(offset)

    def lag(self, topic: str, partition: int, n: int) -> None:
        self._lag_children((topic, partition)).set(n)

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop a revoked partition's offset and lag gauges, so a partition now owned by another instance
        does not keep reporting this instance's last values. (Counters stay: they are cumulative.)"""
        self._committed_children.forget((topic, partition))
        self._lag_children.forget((topic, partition))

    # -- store ---------------------------------------------------------------------------------------

    def store_op(self, op: str, seconds: float) -> None:
        """One store operation (``claim``, ``complete``, ``fail``, ``release``, ``renew`` …) took
        ``seconds``."""
        self._store_children(op).observe(seconds)

    def time_store(self, op: str) -> Timer:
        """``with metrics.time_store("claim"): await store.claim(...)`` — :meth:`store_op` with the
        block's duration, observed also when the block raises."""
        # A fresh timer per use (prometheus_client's): concurrent tasks timing the same op must not share
        # a start time. Only the histogram child is cached.
        return self._store_children(op).time()

    # -- exposition ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The figures of the status page (``/`` and ``/status.json``), read from the same samples as
        :meth:`render`: partitions with committed offset and lag, outcomes by status, finished messages by
        disposition, dead letters by reason, in-doubt, breaker state, in-flight, provider replays."""

        def samples(metric: Counter | Gauge, name: str) -> list[tuple[dict[str, str], float]]:
            return [(s.labels, s.value) for f in metric.collect() for s in f.samples if s.name == name]

        parts: dict[tuple[str, int], dict[str, Any]] = {}
        for field, gauge, name in (
            ("committed", self._committed, "idv_committed_offset"),
            ("lag", self._lag, "idv_consumer_lag"),
        ):
            for labels, value in samples(gauge, name):
                key = (labels["topic"], int(labels["partition"]))
                parts.setdefault(key, {"topic": key[0], "partition": key[1], "committed": None, "lag": None})
                parts[key][field] = int(value)
        outcomes: dict[str, int] = {}
        dispositions: dict[str, int] = {}
        for labels, value in samples(self._finished, "idv_messages_finished_total"):
            d, s = labels["disposition"], labels["status"]
            dispositions[d] = dispositions.get(d, 0) + int(value)
            if s != _NONE:
                outcomes[s] = outcomes.get(s, 0) + int(value)

        def one(metric: Counter | Gauge, name: str) -> int:
            return int(sum(value for _, value in samples(metric, name)))

        state = one(self._circuit, "idv_circuit_breaker_state")
        return {
            "partitions": [parts[k] for k in sorted(parts)],
            "outcomes": dict(sorted(outcomes.items())),
            "dispositions": dict(sorted(dispositions.items())),
            "dead_letters": {
                lbl["reason"]: int(v) for lbl, v in samples(self._dead_letters, "idv_dead_letters_total")
            },
            "in_doubt": one(self._in_doubt, "idv_in_doubt_total"),
            "breaker": {0: "closed", 1: "half_open", 2: "open"}.get(state, str(state)),
            "in_flight": one(self._in_flight, "idv_messages_in_flight"),
            "provider_replays": one(self._provider_replays, "idv_provider_replays_total"),
        }

    def render(self) -> bytes:
        """All samples in the Prometheus text format (serve with :data:`CONTENT_TYPE`)."""
        return generate_latest(self._exposed)
