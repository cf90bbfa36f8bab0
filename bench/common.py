"""Shared pieces of the throughput benchmark: the sandbox process, topics, messages, store and process probes.

Everything here talks to real services: the local Kafka broker, a sandbox provider started as its own
process (one per measured variant, so its ledger counts that variant alone) and the SQLite dedupe store
that the variant under test writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer.keys import idempotency_key
from producer.envelope import Envelope, encode
from producer.samples import iter_sample_envelopes
from sandbox.testing import SandboxProcess

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = os.environ.get("IDV_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
API_KEY = "bench-key"
NAMESPACE = "idv"


# -- messages ------------------------------------------------------------------------------------------


def make_envelopes(count: int, keys: int, *, seed: int = 0) -> list[Envelope]:
    """``count`` valid, distinct requests whose Kafka key (the subject) takes ``keys`` distinct values.

    The payloads are the deterministic samples of :mod:`producer.samples`; only the subject is replaced so
    the key cardinality is exact: message ``i`` belongs to subject ``i % keys``.
    """
    out = []
    for i, env in enumerate(iter_sample_envelopes(count, seed=seed, duplicate_ratio=0.0)):
        out.append(dataclasses.replace(env, subject_id=f"bench-subject-{i % keys:06d}"))
    return out


def expected_keys(envelopes: Sequence[Envelope]) -> set[str]:
    return {idempotency_key(NAMESPACE, e.operation, e.message_id) for e in envelopes}


# -- Kafka ---------------------------------------------------------------------------------------------


def random_topic(prefix: str) -> str:
    return f"bench-{prefix}-{uuid.uuid4().hex[:10]}"


async def create_topic(name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        # Wait until the metadata shows every partition with a leader.
        for _ in range(100):
            (desc,) = await admin.describe_topics([name])
            parts = desc.get("partitions") or []
            if len(parts) == partitions and all(p.get("leader", -1) >= 0 for p in parts):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"topic {name} has no leaders after 5 s")
    finally:
        await admin.close()


async def delete_topics(names: Sequence[str]) -> None:
    if not names:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.delete_topics(list(names))
    except Exception as exc:  # noqa: BLE001 - clean-up only; a leftover topic is harmless
        print(f"  (could not delete bench topics: {type(exc).__name__})", file=sys.stderr)
    finally:
        await admin.close()


def _producer() -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=BOOTSTRAP,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        max_batch_size=512 * 1024,
    )


async def publish(topic: str, envelopes: Sequence[Envelope]) -> None:
    """Publish everything as fast as the producer goes (the backlog a variant then drains)."""
    producer = _producer()
    await producer.start()
    try:
        futures = []
        for env in envelopes:
            futures.append(await producer.send(topic, encode(env), key=env.key, headers=env.headers()))
            if len(futures) >= 2000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def publish_paced(topic: str, envelopes: Sequence[Envelope], rate: float) -> dict[str, float]:
    """Publish at ``rate`` records/s; returns message ID → the record's Kafka timestamp (seconds).

    The timestamp is set explicitly to the send time, so the record's CreateTime is exactly the moment the
    request entered the system; end-to-end latency is measured from it.
    """
    producer = _producer()
    await producer.start()
    sent: dict[str, float] = {}
    try:
        futures = []
        start = time.monotonic()
        for i, env in enumerate(envelopes):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            ts_ms = int(time.time() * 1000)
            futures.append(
                await producer.send(
                    topic, encode(env), key=env.key, headers=env.headers(), timestamp_ms=ts_ms
                )
            )
            sent[env.message_id] = ts_ms / 1000.0
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


async def read_values(bootstrap: str, topic: str, isolation: str = "read_committed") -> list[bytes]:
    """Every value of ``topic`` visible at ``isolation``, read until the topic has been quiet for 2 s
    (also the tests' reader of result topics)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation,
    )
    await consumer.start()
    out: list[bytes] = []
    try:
        idle = 0
        while idle < 4:
            batch = await consumer.getmany(timeout_ms=500)
            got = [m.value for msgs in batch.values() for m in msgs]
            out.extend(got)
            idle = 0 if got else idle + 1
    finally:
        await consumer.stop()
    return out


async def end_offsets(topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in sorted(parts)])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await asyncio.sleep(0)
        await consumer.stop()


async def committed_offsets(group: str, topic: str, partitions: Sequence[int]) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) or 0 for p in partitions}
    finally:
        await asyncio.sleep(0)
        await consumer.stop()


# -- the sandbox provider ------------------------------------------------------------------------------


class Sandbox(SandboxProcess):
    """A sandbox provider process (``python -m sandbox``) and its admin API."""

    def __init__(self, latency_ms: float, workdir: Path) -> None:
        self.latency_ms = latency_ms
        super().__init__(workdir / "sandbox.log", API_KEY, "--latency-ms", str(latency_ms), start_timeout=20)

    def reset(self) -> None:
        """Clear the ledger and idempotency store; ``/_admin/reset`` also clears faults, so the latency
        is set again."""
        super().reset()
        self.set_latency(self.latency_ms)

    def set_latency(self, latency_ms: float) -> None:
        self.faults(latency_ms=latency_ms)

    def rate_limit(self, **config: float) -> dict[str, Any]:
        """``POST /_admin/rate-limit`` (``per_second``, ``burst``, …): the new settings."""
        return self._call("POST", "/_admin/rate-limit", json=config)


def ledger_check(ledger: dict[str, Any], expected: set[str]) -> dict[str, int]:
    """Duplicate side effects per key, read from the real ledger.

    ``duplicates``: side effects beyond the first, summed over keys (must be 0). ``missing``: expected keys
    (messages the variant reported as recorded) with no side effect. ``unexpected``: keys the benchmark
    never sent.
    """
    keys: dict[str, Any] = ledger["keys"]
    duplicates = sum(max(0, rec["side_effects"] - 1) for rec in keys.values())
    keys_over_one = sum(1 for rec in keys.values() if rec["side_effects"] > 1)
    missing = sum(1 for k in expected if keys.get(k, {}).get("side_effects", 0) == 0)
    unexpected = sum(1 for k in keys if k not in expected)
    return {
        "side_effects": int(ledger["totals"]["side_effects"]),
        "requests": int(ledger["totals"]["requests"]),
        "duplicates": duplicates,
        "keys_with_duplicates": keys_over_one,
        "missing": missing,
        "unexpected": unexpected,
    }


# -- the dedupe store (read from outside) --------------------------------------------------------------


class StoreProbe:
    """Reads the SQLite dedupe store that a variant writes (WAL: readers never block its writer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection | None:
        if self._conn is None:
            if not self.path.exists():
                return None
            self._conn = sqlite3.connect(self.path, timeout=5)
        return self._conn

    def progress(self) -> tuple[int, float | None, float | None]:
        """(records with a recorded outcome, first claim time, last outcome time)."""
        conn = self._connect()
        if conn is None:
            return 0, None, None
        try:
            row = conn.execute(
                "SELECT COUNT(*), MIN(created_at), MAX(updated_at) FROM idempotency_records "
                "WHERE state IN ('completed', 'failed')"
            ).fetchone()
        except sqlite3.OperationalError:  # schema not created yet
            return 0, None, None
        return int(row[0]), row[1], row[2]

    def mean_in_flight(self) -> float:
        """Average number of messages between claim and recorded outcome (Little's law over the run)."""
        conn = self._connect()
        if conn is None:
            return float("nan")
        busy, first, last = conn.execute(
            "SELECT SUM(updated_at - created_at), MIN(created_at), MAX(updated_at) FROM idempotency_records "
            "WHERE state IN ('completed', 'failed')"
        ).fetchone()
        if not busy or last is None or last <= first:
            return float("nan")
        return float(busy / (last - first))

    def outcome_times(self, message_ids: Sequence[str]) -> dict[str, tuple[float, float]]:
        """message ID → (first claim, outcome recorded), i.e. ``created_at``/``updated_at``."""
        conn = self._connect()
        assert conn is not None
        out: dict[str, tuple[float, float]] = {}
        ids = list(message_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT message_id, created_at, updated_at FROM idempotency_records "
                f"WHERE state IN ('completed', 'failed') AND message_id IN ({marks})",
                chunk,
            )
            out.update({mid: (created, updated) for mid, created, updated in rows})
        return out

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- the process under test ----------------------------------------------------------------------------


class ProcessProbe:
    """CPU seconds and peak RSS of a subprocess (and of its children, if it has any)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def cpu_s(self) -> float:
        try:
            t = self.proc.cpu_times()
            total = t.user + t.system
            for child in self.proc.children(recursive=True):
                ct = child.cpu_times()
                total += ct.user + ct.system
        except psutil.NoSuchProcess:
            return float("nan")
        return total

    def thread_cpu_s(self) -> dict[str, float]:
        """CPU seconds of the main thread and of all other threads (SQLite writer, to_thread pool, ...)."""
        try:
            threads = self.proc.threads()
        except psutil.NoSuchProcess:
            return {}
        main = sum(t.user_time + t.system_time for t in threads if t.id == self.proc.pid)
        rest = sum(t.user_time + t.system_time for t in threads if t.id != self.proc.pid)
        return {"main_thread": main, "other_threads": rest}

    def peak_rss_mib(self) -> float:
        """VmHWM: the kernel's high-water mark of resident memory over the process's life."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return float("nan")
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
        return float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[idx]


def workdir(prefix: str = "idv-bench-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def broker_pid() -> int | None:
    """The local broker's pid (scripts/kafka.sh writes it), to count its CPU apart from other load."""
    path = ROOT / ".run" / "kafka" / "kafka.pid"
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


class MachineProbe:
    """Where the machine's CPU went during a window: the variant, the sandbox, the broker, everything else.

    The benchmark shares 2 cores with whatever else runs; ``other_cores`` makes that visible per run.
    """

    def __init__(self, variant: ProcessProbe, sandbox_pid: int) -> None:
        self.variant = variant
        self.sandbox = ProcessProbe(sandbox_pid)
        pid = broker_pid()
        self.broker = ProcessProbe(pid) if pid else None
        self._start: tuple[float, float, float, float, float, float] | None = None

    def _sample(self) -> tuple[float, float, float, float, float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        broker = self.broker.cpu_s() if self.broker else 0.0
        # Steal: time the hypervisor gave this VM's CPUs to someone else (0 on bare metal).
        steal = getattr(t, "steal", 0.0)
        return time.monotonic(), busy, self.variant.cpu_s(), self.sandbox.cpu_s(), broker, steal

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        if self._start is None:
            return {}
        end = self._sample()
        wall = end[0] - self._start[0]
        if wall <= 0:
            return {}
        busy, variant, sandbox, broker, steal = (end[i] - self._start[i] for i in range(1, 6))
        return {
            "variant_cores": round(variant / wall, 2),
            "sandbox_cores": round(sandbox / wall, 2),
            "broker_cores": round(broker / wall, 2),
            "other_cores": round(max(0.0, busy - variant - sandbox - broker) / wall, 2),
            "machine_busy_cores": round(busy / wall, 2),
            "steal_cores": round(steal / wall, 2),
        }


# -- the daemon's own metrics over time ---------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric_values(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


async def sample_metrics(port: int, out: list[list[float]], every_s: float = 0.25) -> None:
    """Append ``[time, limit, provider in flight, call seconds sum, calls, 429s, all calls, event-loop lag
    s]`` from the
    daemon's ``/metrics`` every ``every_s`` until cancelled (errors before it listens are skipped)."""
    url = f"http://127.0.0.1:{port}/metrics"
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            try:
                m = _metric_values((await client.get(url)).text)
            except httpx.HTTPError:
                m = {}
            if "idv_concurrency_limit" in m:
                calls = sum(v for k, v in m.items() if k.startswith("idv_provider_calls_total{"))
                out.append(
                    [
                        round(time.time(), 3),
                        m["idv_concurrency_limit"],
                        m.get("idv_provider_in_flight", 0.0),
                        m.get("idv_provider_call_duration_seconds_sum", 0.0),
                        m.get("idv_provider_call_duration_seconds_count", 0.0),
                        m.get('idv_provider_calls_total{status="429"}', 0.0),
                        calls,
                        m.get("idv_event_loop_lag_seconds", math.nan),
                    ]
                )
            await asyncio.sleep(every_s)


# -- results files -------------------------------------------------------------------------------------


def code_version() -> str:
    """The commit measured, with ``+dirty`` when the work tree differed from it (the daemon runs from it)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "consumer", "producer", "sandbox"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_results(
    path: Path, text: str, *, code: str, goals: Sequence[tuple[str, bool, str]], **sections: Any
) -> None:
    """A table's ``.txt`` (``text``) and the JSON beside it: when, which code, which machine, ``sections``
    (runs, parameters, …) and the targets with their verdicts."""
    import json
    import platform

    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".txt").write_text(text + "\n")
    payload = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        **sections,
        "targets": [{"target": n, "met": ok, "measured": d} for n, ok, d in goals],
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
