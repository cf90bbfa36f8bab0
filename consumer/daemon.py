"""The consumer daemon: fetch → dispatch by key → process → mark done → commit.

Tasks (one anyio task group):

* **fetch loop** – ``getmany`` in batches; each message takes a buffer slot (``max_buffered``, a global
  bound) and is dispatched to its *lane*: messages with the same Kafka key in the same partition run one
  after another in offset order, different keys run concurrently on a fixed pool of ``max_in_flight``
  workers (a queue feeding workers, not a task per message). When the buffer is full every partition is
  paused; while it is more than half full, a partition holding more than its share is paused (its unsent
  records are fetched again later), so one partition with few keys cannot fill the buffer with messages
  waiting behind those keys while other partitions' messages wait unfetched.
* **workers** – run :meth:`Processor.handle`; when it returns the outcome is durable, so the offset is
  marked done in its partition's :class:`~consumer.offsets.PartitionOffsets`.
* **commit loop** – every ``commit_interval_s`` or ``commit_every`` finished messages, commits each
  partition's watermark: the lowest offset not yet done. Never per message, never past a pending one.
* **rebalance listener** – on revoke: stop starting new work for those partitions, wait up to
  ``rebalance_drain_s`` for in-flight calls, cancel what is left (their leases are released, their offsets
  stay uncommitted), commit the watermark, then let the partitions go ("drain first, fence second").
* **signals** – SIGTERM/SIGINT stop fetching, drain within ``drain_timeout_s``, commit, exit 0.

A provider 401/403 stops the daemon with exit code 3: everything in flight is abandoned and the commit
stays below the message that met the error.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from consumer.concurrency import raise_fd_limit
from consumer.errors import (
    BrokerUnavailable,
    ConfigurationError,
    ProviderAuthError,
    StoreError,
    StoreUnavailable,
    TopicMissing,
)
from consumer.faults import FaultPoints
from consumer.gcpolicy import collect_young
from consumer.health import HealthServer, PartitionProgress, readiness_report
from consumer.metrics import Metrics
from consumer.offsets import PartitionOffsets
from consumer.pipeline import Processor, Stats
from consumer.provider import ProviderClient, classify_status
from consumer.security import check_kafka_connection
from consumer.settings import Settings
from consumer.sinks import Sinks
from consumer.store import DedupeStore, open_store

log = logging.getLogger(__name__)

__all__ = ["EXIT_CONFIG", "EXIT_OK", "EXIT_PROVIDER_AUTH", "Daemon"]

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_PROVIDER_AUTH = 3


@dataclass(eq=False)
class _Partition:
    tp: TopicPartition
    offsets: PartitionOffsets = field(default_factory=PartitionOffsets)
    inflight: set[anyio.CancelScope] = field(default_factory=set)
    revoked: bool = False
    active: int = 0  # dispatched (running or queued in a lane) and not yet through a worker
    held: bool = False  # paused because it holds more than its share of the buffer


_Item = tuple[_Partition, Any, ConsumerRecord]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.daemon._on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.daemon._on_assigned(list(assigned))


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        store: DedupeStore | None = None,
        provider: ProviderClient | None = None,
        consumer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.security = settings.kafka_security()
        self.metrics = Metrics()
        self.progress = PartitionProgress()
        self.store = store or open_store(settings.store_url)
        self.provider = provider or ProviderClient.from_settings(
            settings, on_breaker_change=self.metrics.circuit, on_attempt=self._on_attempt
        )
        if self.provider.gate is not None:
            gate = self.provider.gate
            self.metrics.watch_concurrency(lambda: gate.limit, lambda: gate.gate.in_flight)
        self.owner = f"{settings.instance_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = Stats()
        self.faults = FaultPoints(settings.fault_kill_at)
        self.processor = Processor(
            store=self.store,
            provider=self.provider,
            owner=self.owner,
            namespace=settings.namespace,
            lease_s=settings.lease_s,
            retention_s=settings.retention_s,
            max_message_bytes=settings.max_message_bytes,
            faults=self.faults,
            stats=self.stats,
            want_records=settings.result_topic is not None,
            on_store_op=self.metrics.store_op,
            fingerprint_key=settings.fingerprint_key,
            provider_key_retention_s=settings.provider_key_retention_s,
        )
        self.sinks = Sinks(
            bootstrap=settings.kafka_bootstrap,
            dlq_topic=settings.dead_letter_topic,
            results_topic=settings.result_topic,
            group_id=settings.group_id,
            producer_kwargs=self.security,
            # Stable across restarts of this instance, so a restarted process fences (and aborts the open
            # transaction of) its SIGKILLed predecessor. Must be unique among live instances.
            transactional_id=(
                f"idv-{settings.group_id}-{settings.instance_id}" if settings.results_transactional else None
            ),
        )
        self._consumer_kwargs = consumer_kwargs or {}
        self.consumer: AIOKafkaConsumer | None = None
        self.partitions: dict[TopicPartition, _Partition] = {}
        self._lanes: dict[Any, deque[tuple[_Partition, ConsumerRecord]]] = {}
        # anyio primitives are made in run(): they need the running event loop.
        self._slots: anyio.Semaphore
        self._ready_send: MemoryObjectSendStream[_Item]
        self._ready_recv: MemoryObjectReceiveStream[_Item]
        self._fetch_scope: anyio.CancelScope | None = None
        self._commit_wakeup: anyio.Event
        self._slot_freed: anyio.Event
        self._done_since_commit = 0
        self._all_paused = False  # the fetch loop paused every partition: no free slot at all
        self._stopping = False
        self._abandon = False  # shutdown deadline passed: start nothing more
        self.fatal: BaseException | None = None
        self._broker_ok = True

    # -- lifecycle -------------------------------------------------------------------------------------

    def _make_consumer(self) -> AIOKafkaConsumer:
        s = self.settings
        return AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=s.group_id,
            client_id=s.client_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            max_poll_records=s.fetch_max_records,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
            # aiokafka defaults this to the session timeout; a revoke that drains longer would get the
            # member expelled while its calls still run. Cover the drain, the wait for cancelled work and
            # the commit.
            rebalance_timeout_ms=int((s.rebalance_drain_s + 10) * 1000),
            isolation_level="read_committed",
            **self.security,
            **self._consumer_kwargs,
        )

    async def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        topics = self.settings.topics
        # One descriptor per provider connection at the ceiling, plus Kafka, the store and some slack.
        raise_fd_limit(self.settings.provider_max_connections + 256)
        self._slots = anyio.Semaphore(self.settings.max_buffered)
        self._ready_send, self._ready_recv = anyio.create_memory_object_stream[_Item](
            self.settings.max_buffered + 1
        )
        self._fetch_scope = anyio.CancelScope()
        if self._stopping:
            self._fetch_scope.cancel()
        self._commit_wakeup = anyio.Event()
        self._slot_freed = anyio.Event()
        # Signals are watched from the very start, so a SIGTERM during start-up is a clean stop too.
        error: ConfigurationError | StoreError | None = None
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._watch_signals)
            try:
                if self.settings.health_port >= 0:
                    health = HealthServer(
                        self.settings.health_host, self.settings.health_port, self.metrics, self.readiness
                    )
                    await health.bind()
                    outer.start_soon(health.serve)
                    log.info("health and metrics on %s", health.url, extra={"health_url": health.url})
                await self._run(topics)
            except (ConfigurationError, StoreError) as exc:
                error = exc  # re-raised bare, not inside an exception group, for the CLI's one-line message
            finally:
                outer.cancel_scope.cancel()
        if error is not None:
            raise error
        if isinstance(self.fatal, ProviderAuthError):
            log.error("stopped: %s", self.fatal)
            return EXIT_PROVIDER_AUTH
        log.info(
            "stopped cleanly", extra={"stats": self.stats.by_disposition, "consumed": self.stats.consumed}
        )
        return EXIT_OK

    async def _run(self, topics: list[str]) -> None:
        # One clear line for a wrong address, port, protocol, certificate or password (aiokafka itself only
        # says "Unable to bootstrap"); raises ConfigurationError.
        try:
            await check_kafka_connection(self.settings.kafka_bootstrap, self.security)
        except ConfigurationError as exc:
            raise BrokerUnavailable(str(exc)) from None
        try:
            await self.store.open()
        except StoreError as exc:
            raise StoreUnavailable(f"cannot open the dedupe store: {exc}") from None
        try:
            await self._run_open(topics)
        finally:
            # Not inside a shielded scope: the SQLite store's writer task group was entered in open().
            await self.store.close()

    async def _run_open(self, topics: list[str]) -> None:
        async with self.provider:
            consumer = self.consumer = self._make_consumer()
            try:
                await consumer.start()
            except KafkaError as exc:
                await consumer.stop()
                raise BrokerUnavailable(
                    f"cannot reach Kafka at {self.settings.kafka_bootstrap}: {type(exc).__name__}"
                ) from None
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
                consumer.subscribe(topics, listener=_Listener(self))
                log.info("consumer started", extra={"owner": self.owner, "topics": topics})
                async with anyio.create_task_group() as tg:
                    for _ in range(self.settings.max_in_flight):
                        tg.start_soon(self._worker)
                    tg.start_soon(self._commit_loop)
                    if self.settings.purge_interval_s > 0:
                        tg.start_soon(self._reaper)
                    tg.start_soon(self._collect_garbage)
                    await self._fetch_loop()
                    await self._drain(0.0 if self.fatal else self.settings.drain_timeout_s)
                    await self._commit_now("shutdown")
                    tg.cancel_scope.cancel()
            finally:
                self._ready_send.close()
                self._ready_recv.close()
                with anyio.CancelScope(shield=True):
                    await self.sinks.stop()
                    await consumer.stop()

    def stop(self) -> None:
        """Stop fetching; :meth:`run` drains, commits and returns."""
        self._stopping = True
        if self._fetch_scope is not None:
            self._fetch_scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: draining", signal.Signals(signum).name)
                self.stop()
                return

    # -- fetch and dispatch ----------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        assert self.consumer is not None and self._fetch_scope is not None
        consumer = self.consumer
        with self._fetch_scope:
            while not self._stopping:
                free = self._slots.value
                if free == 0:
                    # Buffer full (slow provider, open breaker): pause every partition but keep polling,
                    # so the broker does not consider this consumer dead (max.poll.interval.ms).
                    if not self._all_paused:
                        consumer.pause(*consumer.assignment())
                        self._all_paused = True
                    self._slot_freed = anyio.Event()
                    with anyio.move_on_after(1.0):
                        await self._slot_freed.wait()
                    if self._slots.value == 0:
                        batch = await consumer.getmany(timeout_ms=0, max_records=1)
                        await self._dispatch_batch(batch)  # normally empty: all partitions are paused
                    continue
                if self._all_paused:
                    held = {p.tp for p in self.partitions.values() if p.held}
                    consumer.resume(*(tp for tp in consumer.assignment() if tp not in held))
                    self._all_paused = False
                batch = await consumer.getmany(
                    timeout_ms=500, max_records=min(free, self.settings.fetch_max_records)
                )
                await self._dispatch_batch(batch)

    def _share(self) -> int:
        """Buffer slots a partition may hold while the buffer is more than half full."""
        return max(1, self.settings.max_buffered // max(1, len(self.partitions)))

    def _over_share(self, part: _Partition) -> bool:
        # A partition may borrow beyond its share only while more than half of the pool is free: one
        # fetch of a partition with few keys must not fill every slot with messages queued behind those
        # keys while other partitions' keys wait unfetched (head-of-line blocking across partitions).
        return part.active >= self._share() and self._slots.value <= self.settings.max_buffered // 2

    async def _dispatch_batch(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        assert self.consumer is not None
        for tp, messages in batch.items():
            part = self.partitions.get(tp)
            for msg in messages:
                await self._slots.acquire()
                # The partition may have been revoked (and even re-assigned) while we waited.
                if part is None or part.revoked or self.partitions.get(tp) is not part:
                    self._slots.release()
                    break
                last = part.offsets.last_seen
                if last is not None and msg.offset <= last:
                    self._slots.release()
                    continue
                if self._over_share(part):
                    # Hand the rest of this batch back: fetch it again from this offset once the partition
                    # is below half its share. Nothing was dispatched from here on, so nothing is skipped.
                    self._slots.release()
                    self.consumer.seek(tp, msg.offset)
                    self.consumer.pause(tp)
                    part.held = True
                    break
                part.offsets.add(msg.offset)
                part.active += 1
                self.progress.started(msg.topic, msg.partition)
                self._dispatch(part, msg)

    def _dispatch(self, part: _Partition, msg: ConsumerRecord) -> None:
        # Same key, same partition → same lane → offset order. No key → no ordering promise.
        lane = (part.tp, msg.key) if msg.key is not None else (part.tp, None, msg.offset)
        queue = self._lanes.get(lane)
        if queue is None:
            self._lanes[lane] = deque()
            self._ready_send.send_nowait((part, lane, msg))
        else:
            queue.append((part, msg))

    async def _worker(self) -> None:
        async for part, lane, msg in self._ready_recv:
            # Stopping (SIGTERM), revoked or fatal: messages not started yet are left uncommitted for the
            # next owner; only running calls are drained. (The buffer may hold ~1,000 of them.)
            if not part.revoked and not self._stopping and not self._abandon and self.fatal is None:
                finished = False
                self.metrics.consumed(msg.topic, msg.partition)
                with anyio.CancelScope() as scope:
                    part.inflight.add(scope)
                    try:
                        handled = await self.processor.handle_safely(msg)
                        # Dead letter or result first, then the offset: both must be on the broker
                        # before the watermark may pass this message.
                        if handled.dead_letter is not None:
                            await self.sinks.dead_letter(msg, handled.dead_letter, time.time())
                            self.metrics.dead_letter(handled.dead_letter.reason)
                        elif handled.record is not None:
                            if self.sinks.transactional:
                                self.sinks.buffer_result(
                                    part.tp, msg.offset, handled.record, msg.key, handled.subject_id or ""
                                )
                            else:
                                await self.sinks.result(handled.record, msg.key, handled.subject_id or "")
                        finished = True
                    except ProviderAuthError as exc:
                        self._set_fatal(exc)
                    finally:
                        part.inflight.discard(scope)
                if finished:
                    outcome = handled.record.outcome if handled.record is not None else None
                    self.metrics.finished(handled.disposition, outcome.status if outcome else None)
                    self.progress.finished(msg.topic, msg.partition)
                    part.offsets.done(msg.offset)
                    self._done_since_commit += 1
                    if self._done_since_commit >= self.settings.commit_every:
                        self._commit_wakeup.set()
            part.active -= 1
            self._slots.release()
            if part.held:
                self._maybe_resume(part)
            self._slot_freed.set()
            queue = self._lanes[lane]
            if queue:
                nxt_part, nxt = queue.popleft()
                self._ready_send.send_nowait((nxt_part, lane, nxt))
            else:
                del self._lanes[lane]

    def _maybe_resume(self, part: _Partition) -> None:
        """Resume a held partition once it is down to half its share, or the buffer is half free again."""
        if part.active > self._share() // 2 and self._slots.value <= self.settings.max_buffered // 2:
            return
        part.held = False
        if self.consumer is not None and not self._all_paused and not part.revoked:
            try:
                self.consumer.resume(part.tp)
            except IllegalStateError:  # no longer assigned; the next owner starts unpaused
                pass

    def _set_fatal(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc
            log.error("fatal: %s; stopping without committing past this message", exc)
            for part in self.partitions.values():
                for scope in list(part.inflight):
                    scope.cancel()
            self.stop()

    # -- commits ---------------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            with anyio.move_on_after(self.settings.commit_interval_s):
                await self._commit_wakeup.wait()
            self._commit_wakeup = anyio.Event()
            await self._commit_now("periodic")
            self._update_gauges()

    async def _commit_now(self, why: str, parts: list[_Partition] | None = None) -> None:
        assert self.consumer is not None
        if parts is None:
            parts = [p for p in self.partitions.values() if not p.revoked]
        offsets = {}
        for part in parts:
            offset = part.offsets.needs_commit()
            if offset is not None:
                offsets[part.tp] = offset
        if not offsets:
            return
        self._done_since_commit = 0
        if self.sinks.transactional:
            # Results and offsets in one transaction: no result without its commit, no commit without them.
            if not await self.sinks.commit_transaction(
                offsets, on_sent=lambda: self.faults.hit("in_transaction")
            ):
                return
            self._committed(parts, offsets, why)
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # Rebalance in progress or membership lost: the offsets stay uncommitted and are redelivered to
            # whoever owns the partition next; the dedupe store turns that into skipped duplicates.
            log.warning("commit (%s) failed: %s", why, type(exc).__name__)
            self._broker_ok = False
            return
        self._committed(parts, offsets, why)

    async def _collect_garbage(self) -> None:
        """Free cyclic garbage (some holds fetch buffers) within a second; see consumer/gcpolicy.py."""
        while True:
            await anyio.sleep(1.0)
            collect_young()

    async def _reaper(self) -> None:
        """Delete records past their retention (never IN_PROGRESS ones). Every instance may run it: the
        deletes are idempotent, and a record still needed is by definition within retention."""
        while True:
            await anyio.sleep(self.settings.purge_interval_s)
            try:
                purged = await self.store.purge_expired()
            except StoreError as exc:
                log.warning("retention purge failed (%s); will retry", exc)
                continue
            if purged:
                log.info("retention purge removed %d record(s)", purged, extra={"purged": purged})

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
            broker_ok=self._broker_ok,
            store_ok=not self.processor.store_failing,
            partition_progress=self.progress.snapshot(),
            now=time.monotonic(),
            stall_after_s=self.settings.stall_after_s,
        )

    def _committed(self, parts: list[_Partition], offsets: dict[TopicPartition, int], why: str) -> None:
        self._broker_ok = True
        for part in parts:
            if part.tp in offsets:
                part.offsets.committed = offsets[part.tp]
                self.metrics.committed(part.tp.topic, part.tp.partition, offsets[part.tp])
        log.debug("committed (%s) %d partition(s)", why, len(offsets))
        self.faults.hit("after_commit")

    # -- rebalance -------------------------------------------------------------------------------------

    def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            if tp not in self.partitions:
                self.partitions[tp] = _Partition(tp)
        log.info("partitions assigned: %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        parts = [self.partitions[tp] for tp in revoked if tp in self.partitions]
        for part in parts:
            part.revoked = True  # queued messages of these partitions are no longer started
        with anyio.move_on_after(self.settings.rebalance_drain_s):
            while any(part.inflight for part in parts):
                await anyio.sleep(0.02)
        abandoned = sum(len(part.inflight) for part in parts)
        for part in parts:
            for scope in list(part.inflight):
                scope.cancel()
        if abandoned:
            log.warning(
                "rebalance: abandoned %d in-flight message(s) after %.1fs",
                abandoned,
                self.settings.rebalance_drain_s,
            )
            with anyio.move_on_after(5.0):
                while any(part.inflight for part in parts):
                    await anyio.sleep(0.01)
        await self._commit_now("revoke", parts)
        for part in parts:
            self.sinks.drop_pending(part.tp)
            self.progress.remove(part.tp.topic, part.tp.partition)
            self.metrics.forget_partition(part.tp.topic, part.tp.partition)
            if self.partitions.get(part.tp) is part:
                del self.partitions[part.tp]
        if revoked:
            log.info("partitions revoked: %s", sorted(f"{tp.topic}/{tp.partition}" for tp in revoked))

    # -- shutdown --------------------------------------------------------------------------------------

    def in_flight(self) -> int:
        """Messages between fetch and done: running, or waiting in a lane behind the same key."""
        return self.settings.max_buffered - self._slots.value

    async def _drain(self, deadline_s: float) -> None:
        with anyio.move_on_after(deadline_s):
            while self.in_flight():
                await anyio.sleep(0.02)
        left = self.in_flight()
        if left:
            log.warning("drain deadline reached with %d message(s) unfinished; abandoning them", left)
            self._abandon = True
            for part in self.partitions.values():
                for scope in list(part.inflight):
                    scope.cancel()
            with anyio.move_on_after(5.0):
                while any(part.inflight for part in self.partitions.values()):
                    await anyio.sleep(0.01)
