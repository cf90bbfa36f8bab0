"""Builders shared by the two entry points (the daemon and the replay/dlq tools): one way to wire them.

* :func:`build_provider`, :func:`build_processor`, :func:`build_sinks` — the provider client, the
  pipeline and the dead-letter/results producer, built from :class:`~consumer.settings.Settings`.
* :func:`owner_id` — the lease owner of one process (``instance:pid:random``, prefixed for the tools).
* :func:`require_dead_letter_topic` — the daemon runs only with a dead-letter topic.
* :func:`kafka_consumer` (:func:`daemon_consumer`: the group member's), :func:`check_broker`,
  :func:`start_consumer`, :func:`stop_consumer` — the Kafka consumer with the options that decide the
  guarantee (manual commits, ``read_committed``), a clear line instead of aiokafka's "Unable to
  bootstrap", and the aiokafka 0.14 stop-after-start quirk.
* :func:`lane_of` — the ordering rule: same key in the same partition → one lane, offset order.
* :func:`watch_signals` — SIGTERM/SIGINT, once.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Hashable
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from consumer.errors import BrokerUnavailable, ConfigurationError, ConsumerError
from consumer.faults import FaultPoints
from consumer.pipeline import Processor, Stats
from consumer.provider import ProviderClient
from consumer.security import check_kafka_connection
from consumer.settings import Settings
from consumer.sinks import Sinks
from consumer.store import DedupeStore

__all__ = [
    "build_processor",
    "build_provider",
    "build_sinks",
    "check_broker",
    "daemon_consumer",
    "kafka_consumer",
    "lane_of",
    "owner_id",
    "require_dead_letter_topic",
    "start_consumer",
    "stop_consumer",
    "transactional_id",
    "watch_signals",
]


# -- pipeline ------------------------------------------------------------------------------------------


def owner_id(settings: Settings, prefix: str | None = None) -> str:
    """The lease owner of this process: unique per process, so two processes never share a lease."""
    base = f"{settings.instance_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return f"{prefix}:{base}" if prefix else base


# The provider client, built exactly as the replay tool builds it: the settings' profile, timeouts,
# retries, connection pool and circuit breaker (the keyword hooks: ProviderClient.from_settings).
build_provider = ProviderClient.from_settings


def build_processor(
    settings: Settings,
    store: DedupeStore,
    provider: ProviderClient,
    *,
    owner: str,
    want_records: bool,
    ignore_key_retention: bool = False,
    faults: FaultPoints | None = None,
    stats: Stats | None = None,
    on_store_op: Callable[[str, float], None] | None = None,
) -> Processor:
    """The pipeline (decode → key → claim → call → record) with the settings' namespace, lease and limits,
    and the document sources of ``IDV_DOCUMENTS_*`` (closed by :meth:`Processor.aclose`)."""
    from consumer.documents import source_from_settings

    s = settings
    return Processor(
        store=store, provider=provider, owner=owner, faults=faults, stats=stats, want_records=want_records,
        on_store_op=on_store_op, ignore_key_retention=ignore_key_retention,
        namespace=s.namespace, lease_s=s.lease_s, retention_s=s.retention_s,
        max_message_bytes=s.max_message_bytes, fingerprint_key=s.fingerprint_key,
        provider_key_retention_s=s.provider_key_retention_s, documents=source_from_settings(s),
    )  # fmt: skip


def transactional_id(settings: Settings) -> str | None:
    """The daemon's transactional ID with ``IDV_RESULTS_TRANSACTIONAL=true``, else None.

    Stable across restarts of this instance, so a restarted process fences (and aborts the open
    transaction of) its SIGKILLed predecessor. Must be unique among live instances.
    """
    if not settings.results_transactional:
        return None
    return f"idv-{settings.group_id}-{settings.instance_id}"


def build_sinks(
    settings: Settings,
    *,
    dlq_topic: str | None,
    group_id: str,
    transactional_id: str | None = None,
    security: dict[str, Any] | None = None,
) -> Sinks:
    """The dead-letter and results producer, labelling dead letters with ``group_id``. ``security`` is
    :meth:`Settings.kafka_security`, when the caller already built it (it loads the TLS files)."""
    sinks = Sinks(
        bootstrap=settings.kafka_bootstrap,
        dlq_topic=dlq_topic,
        results_topic=settings.result_topic,
        group_id=group_id,
        producer_kwargs=settings.kafka_security() if security is None else security,
        transactional_id=transactional_id,
    )
    sinks.dlq_cipher = settings.dlq_cipher()
    return sinks


def require_dead_letter_topic(settings: Settings) -> str:
    """The daemon's dead-letter topic; ConfigurationError when there is none."""
    if settings.dead_letter_topic is None:
        # Without a DLQ a message set aside (retries_exhausted, invalid, conflict) would be committed
        # past with nothing but a log line: the request would be lost silently. (The replay tool may
        # still run without one; only the daemon refuses.)
        raise ConfigurationError(
            "IDV_DLQ_TOPIC: 'none' is refused by the daemon (messages set aside, e.g. "
            "retries_exhausted, would be committed past without a trace); name a dead-letter topic"
        )
    return settings.dead_letter_topic


# -- Kafka consumer ------------------------------------------------------------------------------------


def kafka_consumer(
    settings: Settings,
    *,
    group_id: str | None,
    client_id: str,
    auto_offset_reset: str,
    max_poll_records: int,
    security: dict[str, Any] | None = None,
    **options: Any,
) -> AIOKafkaConsumer:
    """A consumer that never commits on its own and never reads uncommitted transactional records.
    ``options`` are further :class:`~aiokafka.AIOKafkaConsumer` arguments (timeouts)."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group_id, client_id=client_id,
        enable_auto_commit=False, isolation_level="read_committed",
        auto_offset_reset=auto_offset_reset, max_poll_records=max_poll_records,
        **(settings.kafka_security() if security is None else security), **options,
    )  # fmt: skip


def daemon_consumer(settings: Settings, security: dict[str, Any], **options: Any) -> AIOKafkaConsumer:
    """The daemon's group member: :func:`kafka_consumer` with the group's timeouts; ``options`` override."""
    s = settings
    # rebalance_timeout_ms: aiokafka defaults it to the session timeout; a revoke that drains longer would
    # get the member expelled while its calls still run. Cover the drain, the wait for cancelled work and
    # the commit.
    return kafka_consumer(
        s, group_id=s.group_id, client_id=s.client_id, auto_offset_reset=s.auto_offset_reset,
        max_poll_records=s.fetch_max_records, security=security, session_timeout_ms=s.session_timeout_ms,
        heartbeat_interval_ms=s.heartbeat_interval_ms, max_poll_interval_ms=s.max_poll_interval_ms,
        rebalance_timeout_ms=int((s.rebalance_drain_s + 10) * 1000), **options,
    )  # fmt: skip


async def check_broker(settings: Settings, security: dict[str, Any] | None = None) -> None:
    """One clear line for a wrong address, port, protocol, certificate or password (aiokafka itself only
    says "Unable to bootstrap"); raises :class:`~consumer.errors.BrokerUnavailable`."""
    security = settings.kafka_security() if security is None else security
    try:
        await check_kafka_connection(settings.kafka_bootstrap, security)
    except ConfigurationError as exc:
        raise BrokerUnavailable(str(exc)) from None


async def start_consumer(
    consumer: AIOKafkaConsumer,
    settings: Settings,
    unreachable: Callable[[str], ConsumerError] = BrokerUnavailable,
) -> None:
    """Start ``consumer``; when Kafka cannot be reached, stop it and raise ``unreachable(message)``."""
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise unreachable(f"cannot reach Kafka at {settings.kafka_bootstrap}: {type(exc).__name__}") from None


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop ``consumer``, shielded from cancellation."""
    # aiokafka 0.14: stop() right after start() can meet a background task cancelled before it ran.
    await anyio.lowlevel.checkpoint()
    with anyio.CancelScope(shield=True):
        await consumer.stop()


# -- ordering and signals ------------------------------------------------------------------------------


def lane_of(tp: TopicPartition, msg: ConsumerRecord) -> Hashable:
    """The lane of ``msg`` (of partition ``tp``): messages of one lane run one after another in offset
    order. Same key, same partition → same lane. No key → a lane of its own: no ordering promise."""
    if msg.key is None:
        return (tp, None, msg.offset)
    return (tp, msg.key)


async def watch_signals(on_signal: Callable[[signal.Signals], None]) -> None:
    """Wait for SIGTERM or SIGINT, call ``on_signal`` with it once, and return."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            on_signal(signal.Signals(signum))
            return
