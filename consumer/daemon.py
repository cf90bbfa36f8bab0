"""The consumer daemon: fetch → dispatch by key → process → mark done → commit.

Tasks (one anyio task group):

* **fetch loop** (:mod:`consumer.fetch`) – ``getmany`` in batches into :class:`~consumer.flow.Flow`:
  buffer slots, per-key lanes, hold/resume of partitions over their share (see :mod:`consumer.flow`);
  unreadable records become stubs.
* **workers** (:mod:`consumer.worker`) – a fixed pool of ``max_in_flight``: run :meth:`Processor.handle`
  and :func:`~consumer.delivery.deliver`; when both returned the outcome is durable, so the offset is marked
  done in its partition's :class:`~consumer.offsets.PartitionOffsets`.
* **commit loop** (:class:`~consumer.commits.CommitSchedule`) – every ``commit_interval_s`` or
  ``commit_every`` finished messages, commits each partition's watermark: the lowest offset not yet done.
  Never per message, never past a pending one.
* **rebalance listener** (:mod:`consumer.rebalance`) – on revoke: stop starting new work for those
  partitions, wait up to ``rebalance_drain_s`` for in-flight calls, cancel what is left (their leases are
  released, their offsets stay uncommitted), commit the watermark, then let the partitions go ("drain
  first, fence second").
* **signals** – SIGTERM/SIGINT stop fetching, drain within ``drain_timeout_s``, commit, exit 0.

A provider 401/403 stops the daemon with exit code 3: everything in flight is abandoned and the commit
stays below the message that met the error.

**No record stops the daemon.** Whatever one record causes — a decode error inside aiokafka's record
reader (a header key that is not UTF-8), a bug in the pipeline, a dead letter or result the broker will
never accept — ends as a dead letter (or a stub dead letter) for that record, and the partition moves on;
only configuration errors (rejected API key, a fenced transactional id) stop the daemon.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import anyio
import anyio.abc
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from consumer import tracing, wiring
from consumer.admission import Admission
from consumer.commits import CommitSchedule, Committer
from consumer.errors import (
    BrokerUnavailable,
    ConfigurationError,
    ProviderAuthError,
    StoreError,
    StoreUnavailable,
    TopicMissing,
)
from consumer.exits import EXIT_CONFIG, EXIT_OK, EXIT_PROVIDER_AUTH
from consumer.faults import FaultPoints
from consumer.fdlimit import raise_fd_limit
from consumer.fetch import Fetcher
from consumer.flow import Flow, Partition
from consumer.gcpolicy import collect_young_forever
from consumer.health import PartitionProgress, readiness_report, serve_health
from consumer.looplag import LoopLag
from consumer.metrics import Metrics
from consumer.model import Stats
from consumer.progress_log import CaughtUp, run_summary
from consumer.provider import classify_status
from consumer.providers.calls import gate_from_settings
from consumer.providers.checks import check_key_retention
from consumer.rebalance import RebalanceListener
from consumer.retention import purge_forever
from consumer.settings import Settings
from consumer.store import DedupeStore, open_store
from consumer.worker import Worker
from consumer.workflows.poller import Poller
from consumer.workflows.wiring import build_engine, with_events_topic

log = logging.getLogger(__name__)

__all__ = ["EXIT_CONFIG", "EXIT_OK", "EXIT_PROVIDER_AUTH", "Daemon"]


# Consecutive failed results transactions after which readiness reports the broker as failing.
_TXN_FAILURES_NOT_READY = 3


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        store: DedupeStore | None = None,
        consumer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        wiring.require_dead_letter_topic(settings)
        self.settings = settings
        self.security = settings.kafka_security()
        self.metrics = Metrics()
        self.progress = PartitionProgress()
        self.store = store or open_store(settings.store_url)
        self.loop_lag = LoopLag()  # the event loop's lateness: a controller signal and a metric
        self.metrics.watch_loop_lag(lambda: self.loop_lag.value)
        gate = gate_from_settings(settings, self.loop_lag)
        # With an adaptive limit, how many workers may hold a message follows it (consumer/admission.py).
        admission = Admission(lambda: gate.limit) if gate.adaptive else None
        self.provider = wiring.build_provider(
            settings,
            on_breaker_change=self.metrics.circuit,
            on_attempt=self._on_attempt,
            on_replay=self.metrics.provider_replay,
            on_reconcile=self.metrics.reconciliation,
            gate=gate,
            admission=admission,
        )
        # Refuse to start when a key could be resent after the provider forgot it (names the window).
        check_key_retention(settings, self.provider.adapter)
        self.metrics.watch_concurrency(lambda: gate.limit, lambda: gate.gate.in_flight)
        self.owner = wiring.owner_id(settings)
        self.stats = Stats()
        self._caught_up = CaughtUp()  # "caught up" once per idle period (consumer/progress_log.py)
        self.faults = FaultPoints(settings.fault_kill_at)
        self.processor = wiring.build_processor(
            settings,
            self.store,
            self.provider,
            owner=self.owner,
            want_records=settings.result_topic is not None,
            faults=self.faults,
            stats=self.stats,
            on_store_op=self.metrics.store_op,
        )
        # Workflows (consumer/workflows/): kyc_workflow requests and the provider events topic.
        self.workflows = build_engine(
            settings, self.store, self.provider, owner=self.owner, faults=self.faults,
            registry=self.metrics.registry,
        )
        self.processor.workflows = self.workflows
        self.poller: Poller | None = None
        self.sinks = wiring.build_sinks(
            settings,
            dlq_topic=settings.dead_letter_topic,
            group_id=settings.group_id,
            transactional_id=wiring.transactional_id(settings),
            security=self.security,
        )
        self.sinks.on_unwritable = self.metrics.sink_write_failure
        # Transactional mode: fetching pauses while this many results wait for the next transaction.
        self._max_pending_results = 2 * max(settings.max_buffered, settings.commit_every)
        self._consumer_kwargs = consumer_kwargs or {}
        self.consumer: AIOKafkaConsumer | None = None
        self.flow = Flow(settings.max_buffered, on_dispatched=self.progress.started)
        self.fetcher: Fetcher | None = None
        # anyio primitives are made in run(): they need the running event loop.
        self._fetch_scope: anyio.CancelScope | None = None
        self._stopping = False
        self._abandon = False  # shutdown deadline passed: start nothing more
        self.fatal: BaseException | None = None
        self.committer = Committer(self.sinks, self.metrics, self.faults, on_fatal=self._set_fatal)
        self.commits = CommitSchedule(
            self.committer, interval_s=settings.commit_interval_s, every=settings.commit_every
        )
        self.worker = Worker(
            self.flow, self.processor, self.sinks, self.metrics, self.progress, self.commits,
            accepting=lambda: not self._stopping and not self._abandon and self.fatal is None,
            on_fatal=self._set_fatal,
            admission=admission,
        )

    # -- lifecycle -------------------------------------------------------------------------------------

    def _make_consumer(self) -> AIOKafkaConsumer:
        return wiring.daemon_consumer(self.settings, self.security, **self._consumer_kwargs)

    async def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        topics = self.settings.topics
        # One descriptor per provider connection at the ceiling, plus Kafka, the store and some slack.
        raise_fd_limit(self.settings.provider_max_connections + 256)
        self.flow.open()
        self._fetch_scope = anyio.CancelScope()
        if self._stopping:
            self._fetch_scope.cancel()
        self.commits.open()
        # Signals are watched from the very start, so a SIGTERM during start-up is a clean stop too.
        error: ConfigurationError | StoreError | None = None
        async with anyio.create_task_group() as outer:
            outer.start_soon(wiring.watch_signals, self._on_signal)
            try:
                s = self.settings
                await serve_health(s.health_host, s.health_port, self.metrics, self.readiness, outer)
                async with tracing.session(self.settings):
                    await self._run(topics)
            except (ConfigurationError, StoreError) as exc:
                error = exc  # re-raised bare, not inside an exception group, for the CLI's one-line message
            finally:
                outer.cancel_scope.cancel()
        if error is not None:
            raise error
        if isinstance(self.fatal, ConfigurationError):
            raise self.fatal
        if isinstance(self.fatal, ProviderAuthError):
            log.error("stopped: %s", self.fatal)
            return EXIT_PROVIDER_AUTH
        log.info(
            "stopped cleanly",
            extra={
                "stats": self.stats.by_disposition,
                "consumed": self.stats.consumed,
                "_text": f"stopped cleanly: {run_summary(self.stats)}",  # the text format's line
            },
        )
        return EXIT_OK

    async def _run(self, topics: list[str]) -> None:
        # One clear line for a wrong address, port, protocol, certificate or password (aiokafka itself only
        # says "Unable to bootstrap"); raises ConfigurationError.
        await wiring.check_broker(self.settings, self.security)
        try:
            await self.store.open()
        except StoreError as exc:
            raise StoreUnavailable(f"cannot open the dedupe store: {exc}") from None
        try:
            try:
                await self.workflows.store.open()
            except StoreError as exc:
                raise StoreUnavailable(f"cannot open the workflow store: {exc}") from None
            try:
                await self._run_open(topics)
            finally:
                await self.workflows.store.close()
        finally:
            with anyio.CancelScope(shield=True):
                await self.processor.aclose()  # the document sources
            # Not inside a shielded scope: the SQLite store's writer task group was entered in open().
            await self.store.close()

    async def _run_open(self, topics: list[str]) -> None:
        async with self.provider:
            consumer = self.consumer = self._make_consumer()
            self.flow.consumer = self.committer.consumer = consumer
            self.fetcher = Fetcher(
                consumer,
                self.flow,
                max_records=self.settings.fetch_max_records,
                backlogged=self._results_backlogged,
                offset_reset=self.settings.auto_offset_reset,
            )
            self.fetcher.on_fetch = lambda n: self._caught_up.observe(n, self.stats)  # progress_log.py
            await wiring.start_consumer(consumer, self.settings)
            try:
                existing = await consumer.topics()
                needed = [*topics, self.settings.dead_letter_topic, self.settings.result_topic]
                missing = [t for t in needed if t is not None and t not in existing]
                if missing:
                    raise TopicMissing(f"topic(s) {', '.join(missing)} do not exist on the broker")
                try:
                    await self.sinks.start()
                except KafkaError as exc:
                    raise BrokerUnavailable(f"cannot start the producer: {type(exc).__name__}") from None
                # The provider events topic, when it exists, and the poller with it (workflows/wiring.py).
                topics, self.poller = with_events_topic(
                    self.settings, self.workflows, self.sinks, topics, existing, on_fatal=self._set_fatal
                )
                consumer.subscribe(topics, listener=RebalanceListener(self))
                log.info("consumer started", extra={"owner": self.owner, "topics": topics})
                async with anyio.create_task_group() as tg:
                    for _ in range(self.settings.max_in_flight):
                        tg.start_soon(self.worker.run)
                    tg.start_soon(self._commit_loop)
                    if (every := self.settings.purge_interval_s) > 0:
                        wfs, retention = self.workflows.store, self.settings.retention_s
                        tg.start_soon(purge_forever, self.store, every, wfs, retention)
                    tg.start_soon(collect_young_forever)
                    tg.start_soon(self.loop_lag.run_forever)
                    if self.poller is not None:
                        tg.start_soon(self.poller.run_forever)
                    await self._fetch_loop()
                    await self._drain(0.0 if self.fatal else self.settings.drain_timeout_s)
                    await self._commit_now("shutdown")
                    tg.cancel_scope.cancel()
            finally:
                self.flow.close()
                with anyio.CancelScope(shield=True):
                    await self.sinks.stop()
                    await consumer.stop()

    def stop(self) -> None:
        """Stop fetching; :meth:`run` drains, commits and returns."""
        self._stopping = True
        if self._fetch_scope is not None:
            self._fetch_scope.cancel()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s: draining", sig.name)
        self.stop()

    # -- fetch and workers ----------------------------------------------------------------------------

    @property
    def partitions(self) -> dict[TopicPartition, Partition]:
        return self.flow.partitions

    @partitions.setter
    def partitions(self, value: dict[TopicPartition, Partition]) -> None:
        self.flow.partitions = value

    async def _fetch_loop(self) -> None:
        assert self.fetcher is not None and self._fetch_scope is not None
        with self._fetch_scope:
            await self.fetcher.run(lambda: self._stopping)

    def _results_backlogged(self) -> bool:
        return self.sinks.transactional and self.sinks.pending_results >= self._max_pending_results

    def _set_fatal(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc
            log.error("fatal: %s; stopping without committing past this message", exc)
            self.flow.cancel_inflight()
            self.stop()

    # -- commits ---------------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        await self.commits.run(self._commit_now, self._update_gauges)

    async def _commit_now(self, why: str, parts: list[Partition] | None = None) -> None:
        if parts is None:
            parts = [p for p in self.partitions.values() if not p.revoked]
        await self.commits.commit(parts, why)

    def _update_gauges(self) -> None:
        self.metrics.set_in_flight(self.in_flight())
        if self.consumer is None:
            return
        for tp, part in list(self.partitions.items()):
            committed = part.offsets.committed
            highwater = self.consumer.highwater(tp)
            if committed is not None and highwater is not None:
                self.metrics.lag(tp.topic, tp.partition, max(0, highwater - committed))

    def _on_attempt(self, status: int | None, seconds: float) -> None:
        self.metrics.provider_call(status, seconds)
        if status is None or classify_status(status) == "retry":
            self.metrics.provider_retry()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return readiness_report(
            assigned=len(self.partitions),
            broker_ok=self.committer.broker_ok and self.sinks.txn_failures < _TXN_FAILURES_NOT_READY,
            store_ok=not self.processor.store_failing,
            partition_progress=self.progress.snapshot(),
            now=time.monotonic(),
            stall_after_s=self.settings.stall_after_s,
        )

    # -- shutdown --------------------------------------------------------------------------------------

    def in_flight(self) -> int:
        """Messages between fetch and done: running, or waiting in a lane behind the same key."""
        return self.flow.in_flight()

    async def _drain(self, deadline_s: float) -> None:
        with anyio.move_on_after(deadline_s):
            while self.in_flight():
                await anyio.sleep(0.02)
        left = self.in_flight()
        if left:
            log.warning("drain deadline reached with %d message(s) unfinished; abandoning them", left)
            self._abandon = True
            self.flow.cancel_inflight()
            await self.flow.wait_running(None, 5.0, 0.01)
