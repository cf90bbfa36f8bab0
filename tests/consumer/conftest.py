"""Helpers for end-to-end tests: publish, run the daemon (in-process or as a real process), read offsets,
read the sandbox ledger."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.chaos_env import daemon_child_env
from bench.common import read_values
from consumer.keys import fingerprint, idempotency_key
from producer.envelope import Envelope, encode
from sandbox.testing import SandboxAdmin
from tests.conftest import service_missing

API_KEY = "test-key"
FINGERPRINT_KEY = "test-fingerprint-key-0123456789"  # a development HMAC key (IDV_FINGERPRINT_KEY)


async def publish(bootstrap: str, topic: str, envelopes: Iterable[Envelope]) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    n = 0
    try:
        futures = []
        for env in envelopes:
            futures.append(await producer.send(topic, encode(env), key=env.key, headers=env.headers()))
            n += 1
        for fut in futures:
            await fut
    finally:
        await producer.stop()
    return n


async def publish_raw(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
    partition: int | None = None,
) -> list[tuple[int, int]]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", max_request_size=16 * 1024 * 1024
    )
    await producer.start()
    out = []
    try:
        for key, value, headers in records:
            md = await producer.send_and_wait(topic, value, key=key, headers=headers, partition=partition)
            out.append((md.partition, md.offset))
    finally:
        await producer.stop()
    return out


async def partitions_of(bootstrap: str, topic: str) -> list[int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (desc,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    parts = sorted(p["partition"] for p in desc["partitions"])
    assert parts, f"topic {topic} has no partitions"
    return parts


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = await partitions_of(bootstrap, topic)
        tps = [TopicPartition(topic, p) for p in parts]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        # aiokafka 0.14: stop() right after start() awaits a background task cancelled before it ran,
        # which raises CancelledError in the caller; one scheduling round lets it start first.
        await anyio.lowlevel.checkpoint()
        await consumer.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = await partitions_of(bootstrap, topic)
        out = {}
        for p in parts:
            off = await consumer.committed(TopicPartition(topic, p))
            out[p] = off if off is not None else 0
        return out
    finally:
        await consumer.stop()


async def read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record of the topic, from the beginning (no group)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    ends = await end_offsets(bootstrap, topic)
    total = sum(ends.values())
    out: list[Any] = []
    try:
        with anyio.fail_after(60):
            while len(out) < total:
                batch = await consumer.getmany(timeout_ms=500)
                for msgs in batch.values():
                    out.extend(msgs)
    finally:
        await consumer.stop()
    return out


async def wait_committed_to_end(
    bootstrap: str, group: str, topic: str, timeout: float = 60.0
) -> dict[int, int]:
    ends = await end_offsets(bootstrap, topic)
    deadline = time.monotonic() + timeout
    committed: dict[int, int] = {}
    while time.monotonic() < deadline:
        committed = await committed_offsets(bootstrap, group, topic)
        if all(committed.get(p, 0) >= end for p, end in ends.items()):
            return committed
        await anyio.sleep(0.5)
    raise AssertionError(f"offsets not committed to the end in {timeout}s: committed={committed} ends={ends}")


class Sandbox(SandboxAdmin):
    """Admin view of the sandbox provider over HTTP."""

    def __init__(self, url: str) -> None:
        super().__init__(url, timeout=30)


@pytest.fixture
def sb(sandbox: Any) -> Sandbox:
    """Admin client of the session's sandbox provider (the ``sandbox`` fixture)."""
    return Sandbox(sandbox.url)


@pytest.fixture(params=["ietf", "didit"])
def profile(request: pytest.FixtureRequest) -> str:
    """The provider profile (``IDV_PROVIDER``) a test runs against, with the sandbox in the same profile."""
    return str(request.param)


def sandbox_in(profile: str) -> Iterator[Sandbox]:
    """The sandbox provider over real HTTP in ``profile`` (``--profile ietf`` or ``--profile didit``)."""
    from sandbox import SandboxConfig, run_in_thread

    config = SandboxConfig(port=0, api_keys=(API_KEY,), out_of_credit_keys=("broke-key",), profile=profile)
    with run_in_thread(config) as handle:
        yield Sandbox(handle.url)


@pytest.fixture
def psb(profile: str) -> Iterator[Sandbox]:
    """The sandbox in the test's ``profile``."""
    yield from sandbox_in(profile)


@pytest.fixture
def didit() -> Iterator[Sandbox]:
    """The sandbox in its ``didit`` profile, which workflows talk to (session dedupe by vendor_data and
    workflow, the decision endpoint, side effects filed under ``metadata.idv_key``)."""
    yield from sandbox_in("didit")


@pytest.fixture
def group() -> str:
    """A fresh consumer group name."""
    return "g-" + uuid.uuid4().hex[:8]


async def claim_for(store: Any, key: str, envelope: Envelope, owner: str, lease_s: float) -> Any:
    """``store.claim`` of ``key`` for ``envelope`` as ``owner``: what a daemon leaves before its call."""
    return await store.claim(
        key=key,
        message_id=envelope.message_id,
        operation=envelope.operation,
        fingerprint=fingerprint(envelope),
        owner=owner,
        lease_s=lease_s,
        retention_s=3600,
    )


async def claim_key(
    store: Any, key: str, owner: str = "a", fp: str = "fp1", lease: float = 30.0, retention: float = 3600.0
) -> Any:
    """A store claim of ``key`` for an ``aml_screening`` message whose ID ends like the key."""
    return await store.claim(
        key=key, message_id="m-" + key[-6:], operation="aml_screening", fingerprint=fp, owner=owner,
        lease_s=lease, retention_s=retention,
    )  # fmt: skip


def postgres_url() -> str:
    """The test PostgreSQL (``IDV_TEST_POSTGRES_URL``); without it a failure under ``CI``, else a skip."""
    url = os.environ.get("IDV_TEST_POSTGRES_URL", "")
    if not url:
        service_missing("PostgreSQL (IDV_TEST_POSTGRES_URL is not set)", "bash scripts/postgres.sh start")
    return url


@pytest.fixture
def pg_url() -> str:
    return postgres_url()


@contextlib.asynccontextmanager
async def pg_schema(pg_url: str, prefix: str) -> AsyncIterator[str]:
    """``pg_url`` whose connections work in a fresh, empty schema of their own, dropped afterwards (the
    database is shared and outlives the run, while some tests look rows up by a fixed message ID or purge
    by fake time: each gets an empty schema, like SQLite's fresh file)."""
    import asyncpg

    schema = prefix + uuid.uuid4().hex[:12]
    try:
        admin = await asyncpg.connect(pg_url, timeout=30)
    except (OSError, asyncpg.PostgresError) as exc:
        service_missing(f"PostgreSQL ({type(exc).__name__})", "bash scripts/postgres.sh start")
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        yield pg_url + ("&" if "?" in pg_url else "?") + f"search_path={schema}"
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


@contextlib.asynccontextmanager
async def backend_url(backend: str, tmp_path: Path, name: str) -> AsyncIterator[str]:
    """A fresh store for ``backend`` (``sqlite`` or ``postgres``): the file ``name``.db in ``tmp_path``, or
    a schema of its own (``idv_<name>_…``) in the shared PostgreSQL, dropped after."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / (name + '.db')}"
        return
    async with pg_schema(postgres_url(), f"idv_{name}_") as url:
        yield url


def keys_for(envelopes: Iterable[Envelope], namespace: str = "idv") -> set[str]:
    return {idempotency_key(namespace, e.operation, e.message_id) for e in envelopes}


def daemon_args(
    bootstrap: str, topic: str, group: str, store_url: str, provider_url: str, **extra: Any
) -> dict[str, Any]:
    """The keyword arguments of :func:`daemon_env`, to share between the daemons of one test."""
    return dict(
        bootstrap=bootstrap, topic=topic, group=group, store_url=store_url, provider_url=provider_url, **extra
    )


def daemon_env(
    bootstrap: str, topic: str, group: str, store_url: str, provider_url: str, **extra: Any
) -> dict[str, str]:
    base: dict[str, Any] = dict(
        commit_interval_s=0.2,
        log_format="json",
        provider_backoff_base_s=0.05,
        provider_backoff_max_s=0.5,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        health_port=0,  # several daemons run at once in tests
    )
    return daemon_child_env(
        bootstrap, topic, group, store_url, provider_url, API_KEY, FINGERPRINT_KEY, **(base | extra)
    )


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def terminate(self) -> None:
        """SIGTERM once the daemon runs (a signal during interpreter start-up would kill it outright)."""
        deadline = time.monotonic() + 30
        while "consumer started" not in self.log() and self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError("daemon did not start:\n" + self.log()[-2000:])
            time.sleep(0.05)
        self.proc.send_signal(signal.SIGTERM)

    def stop_cleanly(self) -> None:
        """SIGTERM once it runs, then it must exit 0 within 30 s."""
        self.terminate()
        assert self.wait(30) == 0, self.log()[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def kill_all(*procs: DaemonProcess | None) -> None:
    """SIGKILL each daemon that was started (None: never started)."""
    for proc in procs:
        if proc is not None:
            proc.kill()


def start_daemon(env: Mapping[str, str], log_path: Path) -> DaemonProcess:
    """The daemon as a real process (``python -m consumer run``), stderr to ``log_path``."""
    fh = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumer", "run"],
        env=dict(env),
        stdout=fh,
        stderr=fh,
        stdin=subprocess.DEVNULL,
    )
    fh.close()
    return DaemonProcess(proc, log_path)


async def run_to_end(env: Mapping[str, str], log_path: Path, *, timeout: float = 90.0) -> DaemonProcess:
    """Run the daemon until its group has committed to the end of the topic, then SIGTERM: exit 0 expected."""
    proc = start_daemon(env, log_path)
    try:
        await wait_committed_to_end(
            env["IDV_KAFKA_BOOTSTRAP"], env["IDV_GROUP_ID"], env["IDV_TOPIC"], timeout
        )
        proc.terminate()
        code = proc.wait(30)
        assert code == 0, f"exit {code}\n{proc.log()[-3000:]}"
    finally:
        proc.kill()
    return proc


async def wait_assigned(proc: DaemonProcess, timeout: float = 60.0) -> None:
    """Until ``proc`` got its partitions: the rebalance its joining started is complete (every member
    rejoined, so every old member ran its revoke first)."""
    deadline = time.monotonic() + timeout
    while "partitions assigned" not in proc.log():
        assert proc.proc.poll() is None, proc.log()[-2000:]
        assert time.monotonic() < deadline, "no partitions assigned in time:\n" + proc.log()[-2000:]
        await anyio.sleep(0.05)


def run_until_killed(env: Mapping[str, str], log_path: Path, *, timeout: float = 90.0) -> DaemonProcess:
    """Run a daemon armed with IDV_FAULT_KILL_AT until the fault point SIGKILLs it."""
    proc = start_daemon(env, log_path)
    try:
        code = proc.wait(timeout)
    finally:
        proc.kill()
    assert code == -9, f"fault point did not fire (exit {code})\n{proc.log()[-2000:]}"
    return proc


async def wait_until(predicate: Any, what: str, *, timeout: float = 60.0, interval: float = 0.1) -> None:
    """Poll ``predicate()`` (sync or async) until true; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for: {what}"
        await anyio.sleep(interval)


def kill_line(log: str) -> dict[str, Any]:
    """The JSON log line of the fault point that SIGKILLed the daemon (stamped with the message's
    partition/offset/message ID when it fired inside a message's journey)."""
    import orjson

    for line in reversed(log.splitlines()):
        if "fault point" in line and line.startswith("{"):
            return orjson.loads(line)  # type: ignore[no-any-return]
    raise AssertionError("no fault-point line in the log:\n" + log[-2000:])


def log_records(log: str) -> list[dict[str, Any]]:
    import orjson

    out = []
    for line in log.splitlines():
        if line.startswith("{"):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return out


async def read_results(bootstrap: str, topic: str, isolation: str) -> list[bytes]:
    """Every value of ``topic`` visible at ``isolation``, read until the topic has been quiet for 2 s."""
    return await read_values(bootstrap, topic, isolation)
