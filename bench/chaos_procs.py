"""The chaos run while it runs: the daemons' supervisor, the offset monitor, its counters, Kafka I/O."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from bench.chaos_env import (
    DaemonProcess,
)
from bench.chaos_plan import START_UP_CODES, Raw
from consumer.sinks import H_OFFSET, H_PARTITION, H_REASON


@dataclass
class Counts:
    kills: int = 0
    kills_skipped: int = 0
    broker_restarts: int = 0
    pg_restarts: int = 0
    spikes: int = 0
    restarts: int = 0
    self_exits: list[dict[str, Any]] = field(default_factory=list)
    published: int = 0
    publish_resends: int = 0
    samples: int = 0
    samples_failed: int = 0


def last_error(log: str) -> str:
    """The last exception line of a traceback in a daemon log (``Type: message``), or ''."""
    found = ""
    for line in log.splitlines():
        text = line.strip().lstrip("|").strip()
        head = text.split(":", 1)[0]
        if (
            ": " in text
            and head.replace(".", "").replace("_", "").isalnum()
            and head.endswith(("Error", "Exception"))
        ):
            found = text
    return found[:200]


class Supervisor:
    """Keeps ``processes`` daemons running: restarts whatever exits, except while a kill holds it down.

    A daemon that cannot reach the broker or the store at start-up exits (documented: code 2): expected
    while one of them is down, and a real supervisor (systemd, Kubernetes) restarts it the same way. A
    daemon that exits by itself after it started is a *crash*: reported with its last exception; not an
    exactly-once violation by itself (a crash is what the SIGKILLs do anyway), but a robustness finding.
    """

    def __init__(self, daemons: list[DaemonProcess], counts: Counts, deps_down: Callable[[], bool]) -> None:
        self.daemons = daemons
        self.counts = counts
        self.held: set[int] = set()
        self.deps_down = deps_down
        self.last_dep_outage = float("-inf")
        self._t0 = time.monotonic()

    async def run(self) -> None:
        while True:
            if self.deps_down():
                self.last_dep_outage = time.monotonic()
            for i, daemon in enumerate(self.daemons):
                if i in self.held or daemon.alive():
                    continue
                code = daemon.returncode()
                # Before "consumer started" it could not start (broker or store down: documented as exit
                # 2); after it, any exit we did not cause is a crash.
                crash = daemon.started()
                error = "" if code in START_UP_CODES else last_error(daemon.current_log())
                self.counts.self_exits.append(
                    {
                        "daemon": i,
                        "code": code,
                        "at_s": round(time.monotonic() - self._t0, 1),
                        "during_outage": time.monotonic() - self.last_dep_outage < 30,
                        "crash": crash,
                        "error": error,
                    }
                )
                what = "crashed" if crash else "could not start"
                print(f"  ! daemon {i} {what}: exit code {code}" + (f" ({error})" if error else ""))
                self.held.add(i)
                asyncio.get_running_loop().call_later(1.0, self._restart, i)
            await asyncio.sleep(0.25)

    def _restart(self, i: int) -> None:
        self.daemons[i].start()
        self.counts.restarts += 1
        self.held.discard(i)

    async def kill(self, i: int, down_s: float) -> None:
        daemon = self.daemons[i]
        # The target may be between a failed start (broker or store down) and its restart: the kill waits
        # for it (bounded), so the scheduled number of SIGKILLs really happens.
        deadline = time.monotonic() + 20

        def down() -> bool:
            return i in self.held or not daemon.alive()

        while down() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a child process
            await asyncio.sleep(0.1)
        if down():
            self.counts.kills_skipped += 1
            return
        self.held.add(i)
        daemon.kill()
        self.counts.kills += 1
        await asyncio.sleep(down_s)
        daemon.start()
        self.counts.restarts += 1
        self.held.discard(i)


class Monitor:
    """Samples committed offsets, then what is recorded and dead-lettered, for invariant (c)."""

    def __init__(self, bootstrap: str, group: str, topic: str, dlq: str, store_url: str) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.topic = topic
        self.dlq = dlq
        self.store_url = store_url
        self.samples: list[tuple[float, dict[int, int]]] = []
        self.key_first: dict[str, int] = {}  # idempotency key → first sample it was COMPLETED/FAILED in
        self.dlq_first: dict[tuple[int, int], int] = {}  # original (partition, offset) → first sample
        self.dlq_reasons: Counter[str] = Counter()
        # Dead letters read during a sample that then failed (store down): judged with the next good one.
        self._dlq_pending: list[tuple[tuple[int, int], str]] = []
        self.failed = 0
        self._admin: AIOKafkaAdminClient | None = None
        self._dlq_consumer: AIOKafkaConsumer | None = None
        self._dlq_next: dict[TopicPartition, int] = {}
        self._conn: Any = None

    async def start(self, dlq_partitions: int) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        await self._admin.start()
        self._dlq_consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await self._dlq_consumer.start()
        tps = [TopicPartition(self.dlq, p) for p in range(dlq_partitions)]
        self._dlq_consumer.assign(tps)
        await self._dlq_consumer.seek_to_beginning(*tps)
        self._dlq_next = dict.fromkeys(tps, 0)

    async def stop(self) -> None:
        await asyncio.sleep(0)
        if self._dlq_consumer is not None:
            await self._dlq_consumer.stop()
        if self._admin is not None:
            await self._admin.close()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()

    async def committed(self) -> dict[int, int]:
        assert self._admin is not None
        offsets = await self._admin.list_consumer_group_offsets(self.group)
        return {tp.partition: max(om.offset, 0) for tp, om in offsets.items() if tp.topic == self.topic}

    async def sample(self) -> bool:
        """One sample: committed offsets first, then everything recorded/dead-lettered by now."""
        index = len(self.samples)
        try:
            async with asyncio.timeout(15):
                committed = await self.committed()
                at = time.time()
                await self._catch_up_dlq()
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(self.store_url, timeout=5)
                rows = await self._conn.fetch(
                    "SELECT key FROM idempotency_records WHERE state IN ('completed', 'failed')"
                )
        except Exception:  # noqa: BLE001 - broker or store down: this sample is discarded, not judged
            self.failed += 1
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.terminate()
                self._conn = None
            return False
        for row in rows:
            self.key_first.setdefault(row["key"], index)
        for where, reason in self._dlq_pending:
            self.dlq_first.setdefault(where, index)
            self.dlq_reasons[reason] += 1
        self._dlq_pending.clear()
        self.samples.append((at, committed))
        return True

    async def _catch_up_dlq(self) -> None:
        """Read the dead-letter topic up to its current end into ``_dlq_pending``. What is read stays
        pending across failed samples: the consumer's position has moved past it for good."""
        consumer = self._dlq_consumer
        assert consumer is not None
        ends = await consumer.end_offsets(list(self._dlq_next))
        while any(self._dlq_next[tp] < end for tp, end in ends.items()):
            batch = await consumer.getmany(timeout_ms=500)
            for tp, msgs in batch.items():
                for msg in msgs:
                    headers = dict(msg.headers or ())
                    where = (int(headers[H_PARTITION]), int(headers[H_OFFSET]))
                    self._dlq_pending.append((where, headers[H_REASON].decode()))
                    self._dlq_next[tp] = msg.offset + 1

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


async def create_topics(bootstrap: str, names: Iterable[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
        )
        for _ in range(200):
            descs = await admin.describe_topics(list(names))
            if all(
                len(d.get("partitions") or []) == partitions
                and all(p.get("leader", -1) >= 0 for p in d["partitions"])
                for d in descs
            ):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("topics have no leaders after 10 s")
    finally:
        await admin.close()


async def publish(bootstrap: str, topic: str, records: list[Raw], duration: float, counts: Counts) -> None:
    """Send ``records`` at a steady pace over ``duration`` seconds; a failed send is sent again (the copy
    that may have landed anyway is just one more duplicate record, which the checker accounts for)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        request_timeout_ms=30000,
    )
    await producer.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    n = len(records)
    i = 0
    try:
        while i < n:
            due = min(n, int((loop.time() - t0) / duration * n) + 1)
            pending = records[i:due]
            i = due
            while pending:
                futures = []
                for key, value, headers in pending:
                    try:
                        futures.append(await producer.send(topic, value, key=key, headers=headers))
                    except Exception as exc:  # noqa: BLE001 - broker down: resend below
                        fut = loop.create_future()
                        fut.set_exception(exc)
                        futures.append(fut)
                results = await asyncio.gather(*futures, return_exceptions=True)
                failed = [
                    rec for rec, res in zip(pending, results, strict=True) if isinstance(res, BaseException)
                ]
                counts.published += len(pending) - len(failed)
                counts.publish_resends += len(failed)
                pending = failed
                if failed:
                    await asyncio.sleep(0.5)
            await asyncio.sleep(0.05)
    finally:
        await producer.stop()


async def wait_caught_up(
    monitor: Monitor, bootstrap: str, topic: str, partitions: int, bound_s: float
) -> tuple[bool, float, dict[int, int]]:
    """Until every partition's committed offset reaches its end offset; (reached, seconds, lag)."""
    t0 = time.monotonic()
    lag: dict[int, int] = {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        while time.monotonic() - t0 < bound_s:
            with contextlib.suppress(Exception):
                ends = await consumer.end_offsets(tps)
                committed = await monitor.committed()
                lag = {tp.partition: end - committed.get(tp.partition, 0) for tp, end in ends.items()}
                if all(v <= 0 for v in lag.values()):
                    return True, time.monotonic() - t0, lag
            await asyncio.sleep(0.5)
        return False, time.monotonic() - t0, {p: v for p, v in lag.items() if v > 0}
    finally:
        await asyncio.sleep(0)
        await consumer.stop()


async def read_topic(bootstrap: str, topic: str, partitions: int) -> dict[int, list[ConsumerRecord]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        parts = list(range(partitions))
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: dict[int, list[ConsumerRecord]] = {p: [] for p in parts}
        remaining = {tp for tp in tps if ends[tp] > 0}
        async with asyncio.timeout(120):
            while remaining:
                batch = await consumer.getmany(timeout_ms=1000)
                for tp, msgs in batch.items():
                    out[tp.partition].extend(msgs)
                    if msgs and msgs[-1].offset + 1 >= ends[tp]:
                        remaining.discard(tp)
        return out
    finally:
        await asyncio.sleep(0)
        await consumer.stop()


async def _sandbox_faults(url: str, **config: Any) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(url + "/_admin/faults", json=config)
        r.raise_for_status()
