"""Chaos run: several consumer daemons under random SIGKILLs, broker and PostgreSQL restarts and provider
faults, then an invariant checker. Exits 1 on any violation.

    python bench/chaos.py --seed 7 --messages 2000 --kills 4 --broker-restarts 1 --pg-restarts 0 --processes 3

Everything it restarts is its own: a second Kafka broker (``--kafka-port``, default 19192, via
``scripts/kafka.sh``), a PostgreSQL cluster in ``--pg-data-dir`` on ``--pg-port`` (default 5499), and a
fresh sandbox provider process. The shared broker (9092) and PostgreSQL (5432) are never touched.

**The schedule** (kill times and targets, restart delays, broker and PostgreSQL outages, latency spikes),
the requests (IDs, payloads, which ones are re-sent: 10 % duplicates) and the sandbox's fault rolls all
derive from ``--seed``: the same seed gives the same schedule (``--schedule-only`` prints it). Process
start-up times and the interleaving of concurrent work are not deterministic, so the same seed does not
give byte-identical runs; a violation found with a seed is replayed by running that seed again (often
more than once).

**During the run** a publisher sends the requests at a steady rate over ~90 % of the chaos window
(``--duration``); the daemons run with short leases (``IDV_LEASE_S=4``, ``IDV_PROVIDER_TIMEOUT_S=3``) so
take-overs after kills happen within the run; a supervisor restarts any daemon that exits (a SIGKILLed
one after its scheduled delay, one that exits by itself — e.g. it could not reach the broker at start-up —
after 1 s, counted). A monitor samples the group's committed offsets every ``--sample-interval`` seconds
and, right after each sample, which outcomes are recorded (store) and which messages are dead-lettered.

**Then** faults stop, every daemon is brought back, and the checker verifies:

(a) exactly one provider side effect (sandbox ledger) per unique message ID that completed; at most one
    for IDs that were only dead-lettered (or ended FAILED); no side effect under any other key;
(b) every record of the request topic is accounted for — its ID's outcome is COMPLETED/FAILED in the
    store (processed or skipped duplicate) or that very record (partition, offset) is in the dead-letter
    topic — and every completed ID has a result event, all result events of one ID being identical;
(c) committed offsets were never ahead of recorded outcomes: for every sample, every record below the
    committed offset was accounted for (as in b) by the time of the sample; also for the final offsets;
(d) no stuck partition: every partition's committed offset reaches its end within ``--settle-timeout``
    seconds after the faults stop.

Logs of every process and a JSON summary are kept in the run directory (``.run/chaos/<run id>/``).

``--mutant NAME`` runs the daemons from a copy of the tree with one mutant of ``tests/mutants.py`` applied
(e.g. ``new-key-on-takeover``); the run must then fail, which shows the checker is not vacuous.
``--fail-on-crash`` (CI) also fails the run on any daemon exit the harness did not cause.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import logging
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from bench.chaos_env import (
    ROOT,
    DaemonProcess,
    PrivateKafka,
    PrivatePostgres,
    SandboxProcess,
    ToolMissing,
    daemon_child_env,
)
from consumer.keys import idempotency_key
from consumer.sinks import H_OFFSET, H_PARTITION, H_REASON
from producer.envelope import Envelope, decode, encode
from producer.errors import EnvelopeError
from producer.samples import iter_sample_envelopes

API_KEY = "chaos-key"
NAMESPACE = "idv"
EXIT_VIOLATION = 1
EXIT_SETUP = 2

# -- the schedule --------------------------------------------------------------------------------------

# idv-consumer run's documented start-up failures: configuration, broker, store, topic.
START_UP_CODES = frozenset({2, 4, 5, 6})


@dataclass(frozen=True)
class Event:
    at: float  # seconds after the chaos window opens
    kind: str  # kill | broker | pg | spike
    target: int = -1  # kill: which daemon
    down_s: float = 0.0  # kill: restart delay; broker/pg: downtime; spike: length
    mode: str = ""  # pg: pg_ctl stop mode
    latency_ms: float = 0.0  # spike: provider latency

    def describe(self) -> str:
        if self.kind == "kill":
            return f"SIGKILL daemon {self.target}, restart after {self.down_s:.1f}s"
        if self.kind == "broker":
            return f"broker stop, down {self.down_s:.1f}s, start"
        if self.kind == "pg":
            return f"PostgreSQL stop -m {self.mode}, down {self.down_s:.1f}s, start"
        return f"provider latency {self.latency_ms:.0f}ms for {self.down_s:.1f}s"


def _slots(rng: random.Random, n: int, start: float, end: float) -> list[float]:
    """``n`` times, one per equal slot of [start, end), placed in the first 60 % of their slot, so
    consecutive events of one kind are at least 40 % of a slot apart."""
    if n <= 0:
        return []
    width = (end - start) / n
    return [start + i * width + rng.uniform(0.0, 0.6 * width) for i in range(n)]


def make_schedule(
    seed: int,
    *,
    duration: float,
    kills: int,
    broker_restarts: int,
    pg_restarts: int,
    processes: int,
    spikes: int,
) -> list[Event]:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and PYTHONHASHSEED.
    rng = random.Random(f"idv-chaos-schedule:{seed}")
    events: list[Event] = []
    previous = -1
    for at in _slots(rng, kills, 0.05 * duration, 0.95 * duration):
        # Never the daemon hit last, so a target has been restarted before it is killed again.
        target = rng.choice([i for i in range(processes) if i != previous] or [0])
        previous = target
        events.append(Event(round(at, 2), "kill", target=target, down_s=round(rng.uniform(0.5, 3.0), 2)))
    events.extend(
        Event(round(at, 2), "broker", down_s=round(rng.uniform(1.0, 5.0), 2))
        for at in _slots(rng, broker_restarts, 0.15 * duration, 0.8 * duration)
    )
    events.extend(
        Event(
            round(at, 2),
            "pg",
            mode=rng.choice(["fast", "immediate"]),
            down_s=round(rng.uniform(1.0, 5.0), 2),
        )
        for at in _slots(rng, pg_restarts, 0.1 * duration, 0.85 * duration)
    )
    events.extend(
        Event(
            round(at, 2),
            "spike",
            down_s=round(rng.uniform(2.0, 5.0), 2),
            latency_ms=round(rng.uniform(500.0, 3500.0)),
        )
        for at in _slots(rng, spikes, 0.0, 0.9 * duration)
    )
    return sorted(events, key=lambda e: (e.at, e.kind))


# -- the requests --------------------------------------------------------------------------------------

Raw = tuple[bytes | None, bytes, list[tuple[str, bytes]]]


def _for_didit(env: Envelope) -> Envelope:
    """``--profile didit``: a session per message (Didit hands a subject's unfinished session of the same
    workflow to the next create: no side effect, another request's session; one side effect per message
    ID needs a workflow per message), and the sample images as inline base64 (sent as file parts)."""
    request = dict(env.request)
    if env.operation == "create_session":
        request["workflow_id"] = f"wf-{env.message_id}"
    for name in ("front_image", "back_image"):
        if isinstance(request.get(name), str):
            request[name] = base64.b64encode(request[name].encode()).decode()
    return Envelope(
        message_id=env.message_id,
        operation=env.operation,
        subject_id=env.subject_id,
        request=request,
        created_at=env.created_at,
        correlation_id=env.correlation_id,
    )


def make_records(
    seed: int, messages: int, dup_ratio: float, invalid_ratio: float, profile: str = "ietf"
) -> list[Raw]:
    """``messages`` Kafka records: valid requests (``dup_ratio`` of them re-sends of a recent one: same
    ID, same payload) with ``invalid_ratio`` undecodable ones mixed in at seeded positions."""
    rng = random.Random(f"idv-chaos-records:{seed}")
    invalid = round(messages * invalid_ratio)
    valid = iter_sample_envelopes(messages - invalid, seed=seed, duplicate_ratio=dup_ratio)
    if profile == "didit":
        valid = (_for_didit(env) for env in valid)
    records: list[Raw] = [(env.key, encode(env), env.headers()) for env in valid]
    for i in range(invalid):
        kind = i % 3
        if kind == 0:
            value = b"{not json at all"
        elif kind == 1:
            value = orjson.dumps({"operation": "aml_screening", "subject_id": "x", "request": {}})
        else:
            value = orjson.dumps(
                {
                    "message_id": f"chaos-bad-{seed}-{i}",
                    "operation": "teleport",
                    "subject_id": "x",
                    "request": {},
                }
            )
        records.insert(rng.randrange(len(records) + 1), (f"chaos-invalid-{i}".encode(), value, []))
    return records


# -- the run -------------------------------------------------------------------------------------------


@dataclass
class Options:
    seed: int
    messages: int
    kills: int
    broker_restarts: int
    pg_restarts: int
    processes: int
    partitions: int
    duration: float
    spikes: int
    dup_ratio: float
    invalid_ratio: float
    error_rate: float
    rate_429: float
    drop_rate: float
    latency_ms: float
    latency_jitter_ms: float
    settle_timeout: float
    sample_interval: float
    max_in_flight: int
    kafka_port: int
    kafka_controller_port: int
    kafka_data_dir: str
    pg_port: int
    pg_data_dir: str
    run_dir: Path
    keep_services: bool
    json_path: Path | None
    mutant: str | None = None
    """Run the daemons from a copy of the tree with this mutant of tests/mutants.py applied."""
    profile: str = "ietf"
    """The provider profile: the sandbox's ``--profile`` and the daemons' ``IDV_PROVIDER``."""


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


def daemon_env(
    opts: Options, *, bootstrap: str, topic: str, group: str, store_url: str, provider_url: str, i: int
) -> dict[str, str]:
    return daemon_child_env(
        bootstrap,
        topic,
        group,
        store_url,
        provider_url,
        API_KEY,
        "bench-fingerprint-key-not-secret",
        instance_id=f"chaos-{i}",
        lease_s=4,
        provider_timeout_s=3,
        max_in_flight=opts.max_in_flight,
        commit_interval_s=0.5,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        rebalance_drain_s=3,
        drain_timeout_s=5,
        provider_backoff_base_s=0.1,
        provider_backoff_max_s=2,
        log_format="json",
        log_level="INFO",
        health_port=0,  # several daemons on one host: each takes a free port
        provider=opts.profile,
    )


@dataclass
class Outcome:
    violations: dict[str, list[str]]
    table: list[tuple[str, str]]
    summary: dict[str, Any]


def schedule_for(opts: Options) -> list[Event]:
    """The fault schedule of a run: a pure function of the seed and the options."""
    return make_schedule(
        opts.seed,
        duration=opts.duration,
        kills=opts.kills,
        broker_restarts=opts.broker_restarts,
        pg_restarts=opts.pg_restarts,
        processes=opts.processes,
        spikes=opts.spikes,
    )


async def run(opts: Options) -> Outcome:
    counts = Counts()
    schedule = schedule_for(opts)
    records = make_records(opts.seed, opts.messages, opts.dup_ratio, opts.invalid_ratio, opts.profile)
    run_id = opts.run_dir.name
    print(f"run dir: {opts.run_dir}")
    for event in schedule:
        print(f"  t+{event.at:7.2f}s  {event.describe()}")

    t_setup = time.monotonic()
    kafka = PrivateKafka(opts.kafka_port, opts.kafka_controller_port, opts.kafka_data_dir)
    pg = PrivatePostgres(ROOT / opts.pg_data_dir, opts.pg_port)
    started_kafka = not await asyncio.to_thread(kafka.running)
    if started_kafka:
        print(f"starting the private broker at {kafka.bootstrap}")
    await asyncio.to_thread(kafka.start)
    started_pg = not await asyncio.to_thread(pg.running)
    await asyncio.to_thread(pg.start)
    schema = "chaos_" + run_id.replace("-", "_")
    store_url = await asyncio.to_thread(pg.create_schema, schema)
    sandbox = await asyncio.to_thread(
        SandboxProcess,
        opts.run_dir,
        API_KEY,
        seed=opts.seed,
        profile=opts.profile,
        latency_ms=opts.latency_ms,
        latency_jitter_ms=opts.latency_jitter_ms,
    )
    topic = f"chaos-{run_id}"
    dlq, results = f"{topic}.dlq", f"{topic}.results"
    group = f"chaos-{run_id}"
    await create_topics(kafka.bootstrap, [topic, dlq, results], opts.partitions)

    deps = {"broker": False, "pg": False}
    daemon_tree = ROOT
    if opts.mutant is not None:
        # The checker's strength test: the daemons run a deliberately broken build (a text patch on a copy
        # of the tree), the checker and everything else run the real code; the run must fail.
        from tests.mutants import by_name, prepare_tree

        daemon_tree = await asyncio.to_thread(prepare_tree, by_name(opts.mutant), opts.run_dir / "src")
        print(f"MUTANT {opts.mutant}: the daemons run a broken build from {daemon_tree}")
    daemons = [
        DaemonProcess(
            {
                **daemon_env(
                    opts,
                    bootstrap=kafka.bootstrap,
                    topic=topic,
                    group=group,
                    store_url=store_url,
                    provider_url=sandbox.url,
                    i=i,
                ),
                "PYTHONPATH": str(daemon_tree),
            },
            opts.run_dir / f"daemon-{i}.log",
            cwd=daemon_tree,
        )
        for i in range(opts.processes)
    ]
    supervisor = Supervisor(daemons, counts, lambda: any(deps.values()))
    monitor = Monitor(kafka.bootstrap, group, topic, dlq, store_url)
    passed = False
    try:
        for d in daemons:
            d.start()
        deadline = time.monotonic() + 60
        while not all(d.started() for d in daemons):
            if time.monotonic() > deadline or any(not d.alive() for d in daemons):
                raise RuntimeError(
                    "daemons did not start:\n" + "\n".join(d.current_log()[-800:] for d in daemons)
                )
            await asyncio.sleep(0.1)
        await monitor.start(opts.partitions)
        setup_s = time.monotonic() - t_setup
        print(f"set-up took {setup_s:.1f}s; chaos window {opts.duration:.0f}s, {len(records)} records")

        await _sandbox_faults(
            sandbox.url,
            error_rate=opts.error_rate,
            rate_429=opts.rate_429,
            retry_after_s=1,
            drop_after_effect_rate=opts.drop_rate,
        )
        t0 = time.monotonic()
        stop_monitor = asyncio.Event()
        supervisor_task = asyncio.create_task(supervisor.run())
        monitor_task = asyncio.create_task(monitor.run(opts.sample_interval, stop_monitor))
        publisher = asyncio.create_task(publish(kafka.bootstrap, topic, records, opts.duration * 0.9, counts))

        async def outage(
            dep: str, stop: Callable[[], None], start: Callable[[], None], down_s: float
        ) -> None:
            # While ``deps[dep]`` is set the supervisor counts daemon exits as outage-caused, not crashes.
            deps[dep] = True
            try:
                await asyncio.to_thread(stop)
                await asyncio.sleep(down_s)
                await asyncio.to_thread(start)
            finally:
                deps[dep] = False

        async def broker_restart(e: Event) -> None:
            await outage("broker", kafka.stop, kafka.start, e.down_s)
            counts.broker_restarts += 1

        async def pg_restart(e: Event) -> None:
            await outage("pg", lambda: pg.stop(e.mode), pg.start, e.down_s)
            counts.pg_restarts += 1

        async def spike(e: Event) -> None:
            await _sandbox_faults(sandbox.url, latency_ms=e.latency_ms, latency_jitter_ms=500)
            counts.spikes += 1
            await asyncio.sleep(e.down_s)
            await _sandbox_faults(
                sandbox.url, latency_ms=opts.latency_ms, latency_jitter_ms=opts.latency_jitter_ms
            )

        handlers: dict[str, Callable[[Event], Coroutine[Any, Any, None]]] = {
            "kill": lambda e: supervisor.kill(e.target, e.down_s),
            "broker": broker_restart,
            "pg": pg_restart,
            "spike": spike,
        }
        tasks: list[asyncio.Task[None]] = []
        for event in schedule:
            await asyncio.sleep(max(0.0, t0 + event.at - time.monotonic()))
            print(f"  t+{time.monotonic() - t0:7.2f}s  {event.describe()}")
            tasks.append(asyncio.create_task(handlers[event.kind](event)))
        await asyncio.gather(*tasks)
        await publisher
        await asyncio.sleep(max(0.0, t0 + opts.duration - time.monotonic()))

        # Faults stop: the provider behaves, every dependency is up, every daemon runs.
        await _sandbox_faults(
            sandbox.url,
            error_rate=0.0,
            rate_429=0.0,
            drop_after_effect_rate=0.0,
            latency_ms=0.0,
            latency_jitter_ms=0.0,
        )
        chaos_s = time.monotonic() - t0
        print(f"faults stopped after {chaos_s:.1f}s; waiting for lag 0 (bound {opts.settle_timeout:.0f}s)")
        caught_up, settle_s, lag = await wait_caught_up(
            monitor, kafka.bootstrap, topic, opts.partitions, opts.settle_timeout
        )
        stop_monitor.set()
        await monitor_task
        supervisor_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor_task
        exit_codes = await asyncio.to_thread(stop_all, daemons)
        await monitor.sample()  # the final committed offsets, judged like every other sample
        await monitor.stop()

        outcome = await check(
            opts,
            sandbox=sandbox,
            bootstrap=kafka.bootstrap,
            topic=topic,
            dlq=dlq,
            results=results,
            store_url=store_url,
            monitor=monitor,
            counts=counts,
            caught_up=caught_up,
            settle_s=settle_s,
            lag=lag,
            exit_codes=exit_codes,
            elapsed_s=time.monotonic() - t0,
            setup_s=setup_s,
            schedule=schedule,
        )
        passed = not any(outcome.violations.values())
        return outcome
    finally:
        for d in daemons:
            d.kill()
        sandbox.stop()
        if passed:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(pg.drop_schema, schema)
        else:
            print(
                f"kept for inspection: schema {schema} in {pg.url}, topics {topic}*, logs in {opts.run_dir}"
            )
        if not opts.keep_services:
            if started_pg:
                await asyncio.to_thread(pg.stop)
            if started_kafka:
                await asyncio.to_thread(kafka.stop, wipe=passed)


def stop_all(daemons: list[DaemonProcess]) -> list[int | None]:
    """SIGTERM every daemon at once (each drains and commits), then collect the exit codes."""
    for d in daemons:
        if d.alive() and d.proc is not None:
            d.proc.send_signal(signal.SIGTERM)
    codes: list[int | None] = []
    for d in daemons:
        try:
            codes.append(d.proc.wait(30) if d.proc is not None else None)
        except subprocess.TimeoutExpired:
            d.kill()
            codes.append(-9)
    return codes


# -- the checker ---------------------------------------------------------------------------------------


async def check(
    opts: Options,
    *,
    sandbox: SandboxProcess,
    bootstrap: str,
    topic: str,
    dlq: str,
    results: str,
    store_url: str,
    monitor: Monitor,
    counts: Counts,
    caught_up: bool,
    settle_s: float,
    lag: dict[int, int],
    exit_codes: list[int | None],
    elapsed_s: float,
    setup_s: float,
    schedule: list[Event],
) -> Outcome:
    requests = await read_topic(bootstrap, topic, opts.partitions)
    dead = await read_topic(bootstrap, dlq, opts.partitions)
    result_events = await read_topic(bootstrap, results, opts.partitions)
    conn = await asyncpg.connect(store_url)
    try:
        rows = {
            r["key"]: r
            for r in await conn.fetch("SELECT key, message_id, state, attempts FROM idempotency_records")
        }
    finally:
        await conn.close()
    ledger = await asyncio.to_thread(sandbox.ledger)
    stats = await asyncio.to_thread(sandbox.stats)
    effects = {k: v["side_effects"] for k, v in ledger["keys"].items()}

    # The request topic as published: (partition, offset) → idempotency key (None when undecodable).
    published: dict[tuple[int, int], str | None] = {}
    unique: dict[str, str] = {}  # key → message ID
    copies: dict[str, list[tuple[int, int]]] = {}
    invalid = 0
    for partition, msgs in requests.items():
        for msg in msgs:
            try:
                env = decode(msg.value, msg.headers)
            except EnvelopeError:
                published[(partition, msg.offset)] = None
                invalid += 1
                continue
            key = idempotency_key(NAMESPACE, env.operation, env.message_id)
            published[(partition, msg.offset)] = key
            unique[key] = env.message_id
            copies.setdefault(key, []).append((partition, msg.offset))
    dlq_at: dict[tuple[int, int], str] = {}
    dlq_reasons: Counter[str] = Counter()
    for msgs in dead.values():
        for msg in msgs:
            headers = dict(msg.headers or ())
            where = (int(headers[H_PARTITION]), int(headers[H_OFFSET]))
            reason = headers[H_REASON].decode()
            dlq_at.setdefault(where, reason)
            dlq_reasons[reason] += 1
    results_by_id: dict[str, set[bytes]] = {}
    for msgs in result_events.values():
        for msg in msgs:
            mid = orjson.loads(msg.value)["message_id"]
            results_by_id.setdefault(mid, set()).add(msg.value)

    def state(key: str | None) -> str | None:
        row = rows.get(key) if key is not None else None
        return row["state"] if row is not None else None

    violations: dict[str, list[str]] = {"a": [], "b": [], "c": [], "d": []}

    # (a) side effects at the provider
    completed = failed = dead_only = 0
    extra = 0
    for key, mid in unique.items():
        side = effects.get(key, 0)
        st = state(key)
        if st == "completed":
            completed += 1
            if side != 1:
                violations["a"].append(f"{mid}: COMPLETED with {side} side effects")
        elif st == "failed":
            failed += 1
            if side > 1:
                violations["a"].append(f"{mid}: FAILED with {side} side effects")
        elif any(c in dlq_at for c in copies[key]):
            dead_only += 1
            if side > 1:
                violations["a"].append(f"{mid}: dead-lettered with {side} side effects")
        else:
            violations["a"].append(f"{mid}: no outcome (state {st}), {side} side effects")
        extra += max(0, side - 1)
    unknown = {k: v for k, v in effects.items() if k not in unique and v}
    for k, v in unknown.items():
        violations["a"].append(f"side effect under a key no message maps to: {k} ({v})")
        extra += v

    # (b) every record accounted for; results
    def accounted(where: tuple[int, int]) -> bool:
        return state(published[where]) in ("completed", "failed") or where in dlq_at

    lost = [where for where in published if not accounted(where)]
    for p, o in lost[:20]:
        violations["b"].append(f"{p}@{o}: no COMPLETED/FAILED record for its ID and no dead letter")
    if len(lost) > 20:
        violations["b"].append(f"... {len(lost) - 20} more unaccounted records")
    missing_results = [
        mid
        for key, mid in unique.items()
        if state(key) in ("completed", "failed") and mid not in results_by_id
    ]
    for mid in missing_results[:20]:
        violations["b"].append(f"{mid}: completed but no result event")
    differing = [mid for mid, values in results_by_id.items() if len(values) > 1]
    for mid in differing[:20]:
        violations["b"].append(f"{mid}: {len(results_by_id[mid])} different result events")
    stray_dlq = [where for where in dlq_at if where not in published]
    for where in stray_dlq[:20]:
        violations["b"].append(f"dead letter for {where}, which is not a record of the request topic")

    # (c) committed offsets never ahead of recorded outcomes
    inf = len(monitor.samples) + 1
    prefix_max: dict[int, list[int]] = {}
    for partition, msgs in requests.items():
        running, acc = -1, []
        for msg in msgs:
            where = (partition, msg.offset)
            record_key = published[where]
            first = min(
                monitor.key_first.get(record_key, inf) if record_key is not None else inf,
                monitor.dlq_first.get(where, inf),
            )
            running = max(running, first)
            acc.append(running)
        prefix_max[partition] = acc
    ahead = 0
    for index, (at, committed) in enumerate(monitor.samples):
        for partition, offset in committed.items():
            if offset <= 0:
                continue
            acc = prefix_max.get(partition, [])
            if offset > len(acc):
                violations["c"].append(
                    f"sample {index}: partition {partition} committed {offset} > end {len(acc)}"
                )
            elif acc[offset - 1] > index:
                ahead += 1
                if ahead <= 20:
                    bad = next(o for o in range(offset) if acc[o] > index)
                    violations["c"].append(
                        f"sample {index} (t={time.strftime('%H:%M:%S', time.localtime(at))}): partition "
                        f"{partition} committed {offset} while offset {bad} had no recorded outcome"
                    )
    if ahead > 20:
        violations["c"].append(f"... {ahead - 20} more (sample, partition) pairs committed ahead")
    regressions = 0
    last: dict[int, int] = {}
    for _, committed in monitor.samples:
        for p, o in committed.items():
            if o < last.get(p, 0):
                regressions += 1
            last[p] = o

    # (d) no stuck partition
    if not caught_up:
        violations["d"].append(f"lag not 0 {opts.settle_timeout:.0f}s after the faults stopped: {lag}")
    final = monitor.samples[-1][1] if monitor.samples else {}
    for partition, msgs in requests.items():
        end = msgs[-1].offset + 1 if msgs else 0
        if final.get(partition, 0) < end:
            violations["d"].append(
                f"partition {partition}: final committed {final.get(partition, 0)} < end {end}"
            )

    faults: dict[str, int] = dict(stats.get("faults", {}))
    side_total = sum(effects.values())
    taken_over = sum(1 for r in rows.values() if r["attempts"] > 1)
    valid_records = sum(1 for k in published.values() if k is not None)
    self_exits = counts.self_exits
    crashes = [e for e in self_exits if e["crash"]]
    refused = [e for e in self_exits if not e["crash"]]
    refused_other = [e for e in refused if e["code"] not in START_UP_CODES]
    table = [
        ("seed", str(opts.seed)),
        ("messages (records in the request topic)", str(len(published))),
        ("  published by the chaos publisher (acked)", str(counts.published)),
        ("  re-sent after a failed send", str(counts.publish_resends)),
        ("  invalid (dead-lettered by design)", str(invalid)),
        ("unique message IDs", str(len(unique))),
        ("duplicate records (same ID again)", str(valid_records - len(unique))),
        ("daemons", str(opts.processes)),
        (
            "SIGKILLs",
            f"{counts.kills}"
            + (f" ({counts.kills_skipped} skipped: target down)" * bool(counts.kills_skipped)),
        ),
        ("daemon restarts", str(counts.restarts)),
        (
            "daemon exits on their own: could not start (undocumented code) / crashed",
            f"{len(refused)} ({len(refused_other)}) / {len(crashes)}",
        ),
        ("broker restarts", str(counts.broker_restarts)),
        ("PostgreSQL restarts", str(counts.pg_restarts)),
        ("latency spikes", str(counts.spikes)),
        *[(f"provider faults: {kind}", str(n)) for kind, n in sorted(faults.items())],
        ("provider 409 in flight (same key, concurrent)", str(stats.get("conflicts_409", 0))),
        ("provider replays (same key answered from store)", str(stats.get("replays", 0))),
        ("provider requests", str(stats.get("requests", 0))),
        ("side effects (ledger)", str(side_total)),
        ("IDs COMPLETED / FAILED / only dead-lettered", f"{completed} / {failed} / {dead_only}"),
        ("records taken over (attempts > 1)", str(taken_over)),
        ("dead letters by reason", ", ".join(f"{r}={n}" for r, n in sorted(dlq_reasons.items())) or "0"),
        (
            "result events (distinct IDs)",
            f"{sum(len(m) for m in result_events.values())} ({len(results_by_id)})",
        ),
        ("duplicates (extra side effects)", str(extra)),
        ("lost (unaccounted records)", str(len(lost))),
        ("offset samples judged (discarded during outages)", f"{len(monitor.samples)} ({monitor.failed})"),
        ("commit regressions seen (redelivery, not loss)", str(regressions)),
        (
            "time to lag 0 after faults stopped",
            f"{settle_s:.1f}s" if caught_up else f"not within {opts.settle_timeout:.0f}s",
        ),
        ("daemon exit codes on SIGTERM", ", ".join(str(c) for c in exit_codes)),
        ("set-up", f"{setup_s:.1f}s"),
        ("chaos window + settle", f"{elapsed_s:.1f}s"),
    ]
    summary = {
        "seed": opts.seed,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "schedule": [asdict(e) for e in schedule],
        "table": table,
        "violations": violations,
        "self_exits": self_exits,
        "dead_letters": dict(dlq_reasons),
        "faults": faults,
        "stats": stats,
    }
    return Outcome(violations, table, summary)


# -- CLI -----------------------------------------------------------------------------------------------

INVARIANTS = {
    "a": "one side effect per completed ID, at most one per dead-lettered ID",
    "b": "every record completed, skipped duplicate or dead-lettered; a result per completed ID",
    "c": "committed offsets never ahead of recorded outcomes",
    "d": "no stuck partition: lag 0 after the faults stopped",
}


def print_table(table: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in table)
    print()
    print(f"| {'':<{width}} | value")
    print(f"|{'-' * (width + 2)}|{'-' * 30}")
    for name, value in table:
        print(f"| {name:<{width}} | {value}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Options]:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed first)")
    ap.add_argument("--messages", type=int, default=2000, help="records to publish (duplicates included)")
    ap.add_argument("--kills", type=int, default=4, help="SIGKILLs of daemons")
    ap.add_argument("--broker-restarts", type=int, default=1)
    ap.add_argument("--pg-restarts", type=int, default=0)
    ap.add_argument("--processes", type=int, default=3, help="daemons in the group")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument(
        "--duration", type=float, default=None, help="chaos window in seconds (default: messages/60, ≥ 40)"
    )
    ap.add_argument("--spikes", type=int, default=None, help="latency spikes (default: one per 10 s)")
    ap.add_argument("--dup-ratio", type=float, default=0.10)
    ap.add_argument("--invalid-ratio", type=float, default=0.005)
    ap.add_argument("--error-rate", type=float, default=0.05, help="provider gateway 500s")
    ap.add_argument("--rate-429", type=float, default=0.03, help="provider 429s with Retry-After: 1")
    ap.add_argument("--drop-rate", type=float, default=0.02, help="connection dropped after the side effect")
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--latency-jitter-ms", type=float, default=60.0)
    ap.add_argument("--settle-timeout", type=float, default=120.0, help="bound for lag 0 after faults stop")
    ap.add_argument("--sample-interval", type=float, default=1.0)
    ap.add_argument("--max-in-flight", type=int, default=32)
    ap.add_argument("--kafka-port", type=int, default=19192)
    ap.add_argument("--kafka-controller-port", type=int, default=19193)
    ap.add_argument("--kafka-data-dir", default=".run/kafka-chaos")
    ap.add_argument("--pg-port", type=int, default=5499)
    ap.add_argument("--pg-data-dir", default=".run/pg-chaos")
    ap.add_argument("--run-dir", type=Path, default=None, help="logs and summary (default .run/chaos/<id>)")
    ap.add_argument(
        "--keep-services", action="store_true", help="leave the private broker and PostgreSQL running"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    ap.add_argument(
        "--fail-on-crash",
        action="store_true",
        help="a daemon exit the harness did not cause (a crash after start-up, a start-up failure with an "
        "undocumented code) or an internal_error dead letter fails the run (CI sets it)",
    )
    ap.add_argument(
        "--mutant",
        default=None,
        help="run the daemons with this mutant of tests/mutants.py (e.g. new-key-on-takeover): the run "
        "must then fail (exit 1); shows the checker is not vacuous",
    )
    ap.add_argument(
        "--profile",
        choices=("ietf", "didit"),
        default="ietf",
        help="provider profile: the sandbox's --profile and the daemons' IDV_PROVIDER",
    )
    ap.add_argument("--schedule-only", action="store_true", help="print the seed and schedule, run nothing")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    duration = args.duration if args.duration is not None else max(40.0, args.messages / 60)
    spikes = args.spikes if args.spikes is not None else max(1, int(duration // 10))
    run_id = f"s{args.seed}-{uuid.uuid4().hex[:6]}"
    run_dir = args.run_dir or ROOT / ".run" / "chaos" / run_id
    opts = Options(
        seed=args.seed,
        messages=args.messages,
        kills=args.kills,
        broker_restarts=args.broker_restarts,
        pg_restarts=args.pg_restarts,
        processes=args.processes,
        partitions=args.partitions,
        duration=duration,
        spikes=spikes,
        dup_ratio=args.dup_ratio,
        invalid_ratio=args.invalid_ratio,
        error_rate=args.error_rate,
        rate_429=args.rate_429,
        drop_rate=args.drop_rate,
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        settle_timeout=args.settle_timeout,
        sample_interval=args.sample_interval,
        max_in_flight=args.max_in_flight,
        kafka_port=args.kafka_port,
        kafka_controller_port=args.kafka_controller_port,
        kafka_data_dir=args.kafka_data_dir,
        pg_port=args.pg_port,
        pg_data_dir=args.pg_data_dir,
        run_dir=run_dir,
        keep_services=args.keep_services,
        json_path=args.json,
        mutant=args.mutant,
        profile=args.profile,
    )
    return args, opts


def main(argv: list[str] | None = None) -> int:
    args, opts = parse_args(argv)
    print(f"seed: {opts.seed}", flush=True)
    if args.schedule_only:
        schedule = schedule_for(opts)
        for event in schedule:
            print(f"  t+{event.at:7.2f}s  {event.describe()}")
        return 0
    if opts.mutant is not None:
        from tests.mutants import MutantError, by_name

        try:
            by_name(opts.mutant)
        except MutantError as exc:
            print(f"chaos: {exc}", file=sys.stderr)
            return EXIT_SETUP
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    # The clients' own complaints while the broker or PostgreSQL is down go to a file, not the table.
    logging.basicConfig(
        filename=opts.run_dir / "chaos.log",
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # One run at a time per private broker/cluster: they are stopped and started under the run.
    lock_path = ROOT / ".run" / f"chaos-{opts.kafka_port}-{opts.pg_port}.lock"
    lock = open(lock_path, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"another chaos run holds {lock_path}; use other --kafka-port/--pg-port", file=sys.stderr)
        return EXIT_SETUP
    started = time.monotonic()
    try:
        outcome = asyncio.run(run(opts))
    except ToolMissing as exc:
        print(f"chaos: missing tool: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        return 130
    print_table(outcome.table)
    print(
        f"| {'total wall time':<{max(len(n) for n, _ in outcome.table)}} | {time.monotonic() - started:.1f}s"
    )
    print()
    failed = False
    for name, text in INVARIANTS.items():
        found = outcome.violations[name]
        print(f"({name}) {text}: {'FAIL' if found else 'ok'}")
        for line in found[:20]:
            print(f"      {line}")
        failed |= bool(found)
    crashes = [e for e in outcome.summary["self_exits"] if e["crash"]]
    if crashes:
        print(f"(!) {len(crashes)} daemon crash(es) after start-up:")
        for error, n in Counter(e["error"] or f"exit {e['code']}" for e in crashes).most_common():
            print(f"      {n}x {error}")
        failed |= args.fail_on_crash
    internal = outcome.summary["dead_letters"].get("internal_error", 0)
    if internal:
        print(
            f"(!) {internal} dead letter(s) for internal errors: messages set aside by a consumer error, "
            "not by their content (see the daemon logs)"
        )
        failed |= args.fail_on_crash
    odd = [e for e in outcome.summary["self_exits"] if not e["crash"] and e["code"] not in START_UP_CODES]
    if odd:
        print(f"(!) {len(odd)} start-up failure(s) with an undocumented exit code (not 2, 4, 5 or 6):")
        for error, n in Counter(f"exit {e['code']}: {e['error']}" for e in odd).most_common():
            print(f"      {n}x {error}")
        failed |= args.fail_on_crash
    outcome.summary["total_s"] = round(time.monotonic() - started, 1)
    summary = orjson.dumps(outcome.summary, option=orjson.OPT_INDENT_2)
    (opts.run_dir / "summary.json").write_bytes(summary)
    if opts.json_path is not None:
        opts.json_path.write_bytes(summary)
    if failed:
        print(f"\nFAILED with seed {opts.seed} (logs: {opts.run_dir})")
        return EXIT_VIOLATION
    print(f"\nall invariants hold (seed {opts.seed})")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
