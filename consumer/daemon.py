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

**No record stops the daemon.** Whatever one record causes — a decode error inside aiokafka's record
reader (a header key that is not UTF-8), a bug in the pipeline, a dead letter or result the broker will
never accept — ends as a dead letter (or a stub dead letter) for that record, and the partition moves on;
only configuration errors (rejected API key, a fenced transactional id) stop the daemon.
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
from aiokafka.errors import CorruptRecordException, IllegalStateError, KafkaError
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
from consumer.pipeline import Disposition, Handled, Processor, Stats
from consumer.provider import ProviderClient, classify_status
from consumer.security import check_kafka_connection
from consumer.settings import Settings
from consumer.sinks import DeadLetter, Fenced, Sinks, Unwritable
from consumer.store import DedupeStore, open_store

log = logging.getLogger(__name__)

__all__ = ["EXIT_CONFIG", "EXIT_OK", "EXIT_PROVIDER_AUTH", "Daemon"]

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_PROVIDER_AUTH = 3

# Consecutive failed results transactions after which readiness reports the broker as failing.
_TXN_FAILURES_NOT_READY = 3


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
        if settings.dead_letter_topic is None:
            # Without a DLQ a message set aside (retries_exhausted, invalid, conflict) would be committed
            # past with nothing but a log line: the request would be lost silently. (The replay tool may
            # still run without one; only the daemon refuses.)
            raise ConfigurationError(
                "IDV_DLQ_TOPIC: 'none' is refused by the daemon (messages set aside, e.g. "
                "retries_exhausted, would be committed past without a trace); name a dead-letter topic"
            )
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
        self.sinks.on_unwritable = self.metrics.sink_write_failure
        # Records aiokafka could not read (by topic, partition, offset), dispatched as stubs: their detail.
        self._undecodable: dict[tuple[str, int, int], str] = {}
        # Transactional mode: fetching pauses while this many results wait for the next transaction.
        self._max_pending_results = 2 * max(settings.max_buffered, settings.commit_every)
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
        if isinstance(self.fatal, ConfigurationError):
            raise self.fatal
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
                if free == 0 or self._results_backlogged():
                    # Buffer full (slow provider, open breaker), or results piling up while transactions
                    # fail: pause every partition but keep polling, so the broker does not consider this
                    # consumer dead (max.poll.interval.ms).
                    if not self._all_paused:
                        consumer.pause(*consumer.assignment())
                        self._all_paused = True
                    self._slot_freed = anyio.Event()
                    with anyio.move_on_after(1.0):
                        await self._slot_freed.wait()
                    if self._slots.value == 0 or self._results_backlogged():
                        batch = await self._getmany(timeout_ms=0, max_records=1)
                        await self._dispatch_batch(batch)  # normally empty: all partitions are paused
                    continue
                if self._all_paused:
                    held = {p.tp for p in self.partitions.values() if p.held}
                    consumer.resume(*(tp for tp in consumer.assignment() if tp not in held))
                    self._all_paused = False
                batch = await self._getmany(
                    timeout_ms=500, max_records=min(free, self.settings.fetch_max_records)
                )
                await self._dispatch_batch(batch)

    def _results_backlogged(self) -> bool:
        return self.sinks.transactional and self.sinks.pending_results >= self._max_pending_results

    def _positions(self) -> dict[TopicPartition, int]:
        """The fetch position of every assigned partition that has one (aiokafka's subscription state;
        ``consumer.position()`` is a coroutine that may go to the broker, this only reads memory)."""
        assert self.consumer is not None
        try:
            assignment = self.consumer._subscription.subscription.assignment
            out = {}
            for tp in assignment.tps:
                state = assignment.state_value(tp)
                if state is not None and state.has_valid_position:
                    out[tp] = state.position
        except AttributeError:  # not subscribed or assigned yet, or a different aiokafka
            return {}
        return out

    async def _getmany(
        self, *, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        """``getmany`` that survives a record aiokafka cannot read.

        aiokafka decodes header keys as UTF-8 while it iterates a fetched batch, inside ``getmany``: a
        header key that is not UTF-8 (Go and Java clients can write one) raises ``UnicodeDecodeError``
        there, the fetch position stays before the record, and every later ``getmany`` raises again — a
        naive loop dies on it forever. A failed call also loses what it had already drained from other
        partitions (their positions moved on, the records were never returned), so those positions are put
        back first; then the bad record is isolated and replaced by a stub that is dead-lettered
        (``undecodable_record``) like any other message.
        """
        assert self.consumer is not None
        before = self._positions()
        try:
            batch: dict[TopicPartition, list[ConsumerRecord]] = await self.consumer.getmany(
                timeout_ms=timeout_ms, max_records=max_records
            )
        except KafkaError as exc:
            if not isinstance(exc, CorruptRecordException):
                raise
            await self._on_unreadable(exc, before)
        except Exception as exc:  # noqa: BLE001 - any error reading one record; see the docstring
            await self._on_unreadable(exc, before)
        else:
            return batch
        return {}

    def _locate_unreadable(self) -> tuple[TopicPartition, int] | None:
        """The partition and offset of the record aiokafka's reader just failed on.

        The failed partition's fetch result is still in the fetcher with a record iterator that raised (a
        finished generator, not cleared as after normal exhaustion); its ``next_fetch_offset`` is one past
        the last record it yielded, i.e. the offset of the record it could not read.
        """
        assert self.consumer is not None
        records = getattr(getattr(self.consumer, "_fetcher", None), "_records", None) or {}
        for tp, res in list(records.items()):
            partition_records = getattr(res, "_partition_records", None)
            iterator = getattr(partition_records, "_records_iterator", None)
            if iterator is not None and getattr(iterator, "gi_frame", True) is None:
                return tp, int(partition_records.next_fetch_offset)  # type: ignore[union-attr]
        return None

    async def _on_unreadable(self, exc: BaseException, before: dict[TopicPartition, int]) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        found = self._locate_unreadable()
        now = self._positions()
        for tp, pos in before.items():
            if now.get(tp, pos) != pos and (found is None or tp != found[0]):
                consumer.seek(tp, pos)  # drained by the failed call and lost with it: fetch them again
        if found is None:
            log.error(
                "a fetched record could not be read (%s) and could not be located; retrying in 1s",
                type(exc).__name__,
            )
            await anyio.sleep(1.0)
            return
        tp, bad = found
        part = self.partitions.get(tp)
        log.error(
            "record at %s/%d@%d cannot be read by the Kafka client (%s); dead-lettering a stub",
            tp.topic,
            tp.partition,
            bad,
            type(exc).__name__,
            extra={"topic": tp.topic, "partition": tp.partition, "offset": bad},
        )
        if part is None or part.revoked:
            await anyio.sleep(0.1)  # being revoked: the next owner meets the record; do not spin
            return
        # The readable records before it were lost with the failed call: read exactly those again (a
        # max_records bound stops the reader before the bad record), then the stub, then go past it.
        for _ in range(50):
            current = self._positions().get(tp)
            if current is None or current >= bad or part.held or part.revoked or self._all_paused:
                break
            try:
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=bad - current)
            except Exception as again:  # noqa: BLE001 - not expected (the bound stops before the record)
                log.warning("re-reading before an unreadable record failed (%s)", type(again).__name__)
                return
            await self._dispatch_batch(batch)
        if self._positions().get(tp) != bad or part.held or part.revoked:
            return  # not there yet (paused, handed back): the next fetch meets the record again
        detail = (
            f"the Kafka client could not read the record ({type(exc).__name__}, e.g. a header key that "
            "is not UTF-8); key, value, headers and timestamp are unknown"
        )
        self._undecodable[(tp.topic, tp.partition, bad)] = detail
        consumer.seek(tp, bad + 1)
        stub = ConsumerRecord(tp.topic, tp.partition, bad, -1, 0, None, None, None, -1, -1, ())
        await self._dispatch_batch({tp: [stub]})

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
                        handled = await self._handle(part, msg)
                        finished = True
                    except ProviderAuthError as exc:
                        self._set_fatal(exc)
                    except Exception as exc:  # the worker must survive any one record
                        # Only a bug in the dead-letter path itself gets here (everything else became a
                        # dead letter in _handle): log it and move on rather than stop every partition.
                        log.exception(
                            "unexpected %s while finishing a message; moving on without a dead letter",
                            type(exc).__name__,
                            extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
                        )
                        self.metrics.sink_write_failure("dead_letter", "lost")
                        handled = Handled(Disposition.ERROR)
                        finished = True
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

    async def _handle(self, part: _Partition, msg: ConsumerRecord) -> Handled:
        """Process one message and write its dead letter or result. Raises only ProviderAuthError (and
        cancellation): anything else one record causes becomes its dead letter (internal_error)."""
        detail = self._undecodable.pop((msg.topic, msg.partition, msg.offset), None)
        if detail is not None:
            self.stats.consumed += 1
            self.stats.count(Disposition.INVALID)
            handled = Handled(Disposition.INVALID, DeadLetter("undecodable_record", detail))
        else:
            handled = await self.processor.handle_safely(msg)
        try:
            await self._deliver(part, msg, handled)
        except ProviderAuthError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug meeting one record must not stop the worker
            log.error(
                "unexpected %s while writing the outcome of a message; dead-lettering it",
                type(exc).__name__,
                extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
            )
            handled = Handled(
                Disposition.ERROR, DeadLetter("internal_error", f"{type(exc).__name__} in the consumer")
            )
            await self._write_dead_letter(msg, handled.dead_letter)  # type: ignore[arg-type]
        return handled

    async def _deliver(self, part: _Partition, msg: ConsumerRecord, handled: Handled) -> None:
        # Dead letter or result first, then the offset: both must be on the broker (or, transactional, in
        # the transaction that commits the offset) before the watermark may pass this message.
        if handled.dead_letter is not None:
            await self._write_dead_letter(msg, handled.dead_letter)
        elif handled.record is not None:
            if self.sinks.transactional:
                self.sinks.buffer_result(part.tp, msg, handled.record, handled.subject_id or "")
                return
            try:
                await self.sinks.result(handled.record, msg.key, handled.subject_id or "")
            except Unwritable as exc:
                # The outcome is recorded; only its event can never be published. Set the message aside
                # so the gap is visible, instead of retrying forever and stalling the partition.
                log.error(
                    "result event can never be written (%s); dead-lettering the message",
                    exc.why,
                    extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
                )
                letter = DeadLetter(
                    "internal_error", f"result event could not be written: {exc.why}; outcome recorded"
                )
                await self._write_dead_letter(msg, letter)

    async def _write_dead_letter(self, msg: ConsumerRecord, letter: DeadLetter) -> None:
        written = await self.sinks.dead_letter(msg, letter, time.time())
        if written in ("written", "stub"):
            self.metrics.dead_letter(letter.reason)

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
            try:
                ok = await self.sinks.commit_transaction(
                    offsets, on_sent=lambda: self.faults.hit("in_transaction")
                )
            except Fenced as exc:
                self._set_fatal(
                    ConfigurationError(
                        f"the results transaction was fenced ({exc}): another live instance uses the "
                        f"transactional id {self.sinks.transactional_id!r}; set IDV_INSTANCE_ID uniquely "
                        "(and stably) for every instance"
                    )
                )
                return
            if not ok:
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
            broker_ok=self._broker_ok and self.sinks.txn_failures < _TXN_FAILURES_NOT_READY,
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
