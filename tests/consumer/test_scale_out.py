"""Scale-out: several daemon processes in one consumer group sharing one PostgreSQL dedupe store.

Real broker, real PostgreSQL, the sandbox provider over HTTP, daemons as real processes
(``python -m consumer run``). The shared PostgreSQL gets a fresh schema per test (``?search_path=``);
the outage test runs its own PostgreSQL cluster (``bench/chaos_env.PrivatePostgres``) because it stops it,
and the shared server must never be stopped.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from consumer.keys import idempotency_key
from producer.envelope import Envelope, decode, encode
from tests.conftest import create_topic, free_port, random_topic_name, service_missing
from tests.consumer.conftest import (
    DaemonProcess,
    Sandbox,
    claim_key,
    committed_offsets,
    daemon_args,
    daemon_env,
    end_offsets,
    keys_for,
    kill_all,
    pg_schema,
    publish,
    publish_raw,
    read_all,
    start_daemon,
    wait_assigned,
    wait_committed_to_end,
)
from tests.consumer.test_exactly_once import make_envelopes, publish_new, with_duplicates
from tests.ledger import assert_ledger_exactly_once

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.postgres]


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
async def store_url(pg_url: str) -> AsyncIterator[str]:
    """The shared PostgreSQL, in a fresh schema of this test's own (dropped afterwards)."""
    async with pg_schema(pg_url, "idv_scale_") as url:
        yield url


@pytest.fixture
def private_pg() -> Iterator[Any]:
    """A PostgreSQL cluster of this test's own, which it may stop and start."""
    from bench.chaos_env import PrivatePostgres, ToolMissing

    # Not pytest's tmp_path: the postgres user must be able to reach the data directory.
    base = Path(tempfile.mkdtemp(prefix="idv-pg-"))
    base.chmod(0o755)
    try:
        try:
            pg = PrivatePostgres(base / "data", free_port())
        except ToolMissing as exc:
            service_missing(str(exc), "apt-get install postgresql-15")
        pg.start()
        try:
            yield pg
        finally:
            pg.wipe()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- helpers -------------------------------------------------------------------------------------------


async def _records(url: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT key, state, attempts, updated_at FROM idempotency_records")
    finally:
        await conn.close()
    return {row["key"]: row for row in rows}


async def assert_exactly_once_pg(sb: Sandbox, url: str, unique: list[Envelope]) -> dict[str, Any]:
    """One side effect per unique message ID, none under other keys, every record COMPLETED."""
    expected = keys_for(unique)
    assert_ledger_exactly_once(sb.ledger(), expected)
    records = await _records(url)
    not_done = [k for k in expected if k not in records or records[k]["state"] != "completed"]
    assert not not_done, f"{len(not_done)} records not COMPLETED, e.g. {not_done[:3]}"
    return records


async def wait_side_effects(sb: Sandbox, at_least: int, deadline: float) -> None:
    while sum(sb.side_effects().values()) < at_least:
        assert time.monotonic() < deadline, f"fewer than {at_least} side effects in time"
        await anyio.sleep(0.1)


async def wait_in_flight(sb: Sandbox, at_least: int, timeout: float = 20.0) -> int:
    """Until the provider is holding at least ``at_least`` requests (its idempotency layer's in-flight)."""
    deadline = time.monotonic() + timeout
    while True:
        in_flight = int(sb.ledger()["totals"]["in_flight"])
        if in_flight >= at_least:
            return in_flight
        assert time.monotonic() < deadline, f"provider never held {at_least} requests (had {in_flight})"
        await anyio.sleep(0.05)


def stop_all(*procs: DaemonProcess) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        assert proc.wait(30) == 0, proc.log()[-2000:]


# -- tests ---------------------------------------------------------------------------------------------


async def publish_one_per_partition(
    bootstrap: str, topic: str, id_prefix: str, subject_prefix: str, partitions: int = 12
) -> list[Envelope]:
    """One AML request per partition (subject ``<subject_prefix>-<p>`` on partition ``p``)."""
    envelopes = [
        Envelope(
            message_id=f"{id_prefix}-{uuid.uuid4()}",
            operation="aml_screening",
            subject_id=f"{subject_prefix}-{p}",
            request={"full_name": f"Held Person {p}"},
        )
        for p in range(partitions)
    ]
    for p, env in enumerate(envelopes):
        await publish_raw(bootstrap, topic, [(env.key, encode(env), env.headers())], partition=p)
    return envelopes


@pytest.mark.timeout(300)
async def test_three_processes_share_twelve_partitions_through_joins_and_leaves(
    kafka_bootstrap: str, sb: Sandbox, store_url: str, tmp_path: Path
) -> None:
    """Three daemons in one group on a 12-partition topic, one PostgreSQL store, 10 % duplicates.

    Membership changes while the provider holds calls (100 ms each): a third process joins, the first
    leaves (SIGTERM), comes back, the second leaves. Each change is an eager rebalance with calls in flight.
    """
    sb.faults(latency_ms=100)
    topic = await create_topic(kafka_bootstrap, random_topic_name("scale"), 12, with_sinks=True)
    unique = make_envelopes(1200, subjects=600, seed=11)
    stream = with_duplicates(unique, 0.1, seed=12)
    await publish(kafka_bootstrap, topic, stream)
    group = "g-" + uuid.uuid4().hex[:8]
    common: dict[str, Any] = daemon_args(
        kafka_bootstrap, topic, group, store_url, sb.url,
        max_in_flight=8, rebalance_drain_s=3, lease_s=10, provider_timeout_s=5, health_port=0,
    )  # fmt: skip
    procs: list[DaemonProcess] = []

    def start(name: str) -> DaemonProcess:
        proc = start_daemon(daemon_env(**common, instance_id=name), tmp_path / f"{name}-{len(procs)}.log")
        procs.append(proc)
        return proc

    try:
        deadline = time.monotonic() + 180
        a, b = start("a"), start("b")
        await wait_assigned(a)
        await wait_assigned(b)
        await wait_side_effects(sb, 100, deadline)
        await wait_in_flight(sb, 1)
        c = start("c")  # joins with calls in flight: a and b revoke everything, drain, rejoin
        await wait_assigned(c)
        await wait_side_effects(sb, 400, deadline)
        await wait_in_flight(sb, 1)
        a.terminate()  # leaves with calls in flight: drains them, commits, lets go
        assert a.wait(30) == 0, a.log()[-2000:]
        a2 = start("a")  # the same instance comes back
        await wait_assigned(a2)
        await wait_side_effects(sb, 700, deadline)
        await wait_in_flight(sb, 1)
        b.stop_cleanly()
        sb.faults(latency_ms=0)
        await wait_committed_to_end(kafka_bootstrap, group, topic, 120)
        stop_all(c, a2)
    finally:
        for proc in procs:
            proc.kill()

    await assert_exactly_once_pg(sb, store_url, unique)
    assert await committed_offsets(kafka_bootstrap, group, topic) == await end_offsets(kafka_bootstrap, topic)
    for proc in procs:
        assert "partitions assigned" in proc.log(), proc.log_path
    assert "partitions revoked" in a.log() and "partitions revoked" in b.log()
    # Work really was spread: every process recorded outcomes.
    assert all("outcome recorded" in proc.log() for proc in procs), [p.log_path.name for p in procs]
    # Every duplicate was recognised: COMPLETED records are never called again.
    assert sum(sb.side_effects().values()) == len(unique) < len(stream)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("variant", "latency_ms", "rebalance_drain_s"),
    [
        # Drain first: the revoked partitions' calls finish inside the drain bound, their offsets are
        # committed, the new owner never sees those messages: one attempt at the provider.
        ("drained", 3000, 15),
        # Abandoned: the drain bound is shorter than the call. The old owner cancels and releases its
        # lease; the new owner takes the key over and calls with the same Idempotency-Key while the first
        # request is still held: 409 (in flight), retry, then the provider's stored answer is replayed.
        ("abandoned", 6000, 1),
    ],
)
async def test_partition_moving_mid_call_is_not_repeated_at_the_provider(
    kafka_bootstrap: str,
    sb: Sandbox,
    store_url: str,
    tmp_path: Path,
    variant: str,
    latency_ms: int,
    rebalance_drain_s: float,
    group: str,
) -> None:
    sb.faults(latency_ms=latency_ms)
    topic = await create_topic(kafka_bootstrap, random_topic_name("move"), 12, with_sinks=True)
    # One message per partition, so whichever half of the partitions moves, some held call moves with it.
    envelopes = await publish_one_per_partition(kafka_bootstrap, topic, f"move-{variant}", "mover")
    common: dict[str, Any] = daemon_args(
        kafka_bootstrap,
        topic,
        group,
        store_url,
        sb.url,
        max_in_flight=16,
        rebalance_drain_s=rebalance_drain_s,
        session_timeout_ms=20000,
        lease_s=30,
        provider_timeout_s=20,
        provider_max_attempts=30,
        breaker_min_calls=1000,  # the 409s while the first request is held are expected, not an outage
        health_port=0,
    )
    first = start_daemon(daemon_env(**common, instance_id="first"), tmp_path / "first.log")
    second = None
    try:
        await wait_in_flight(sb, 12)  # every call is held by the provider
        before = sb.ledger()["totals"]["side_effects"]
        assert before == 0
        second = start_daemon(daemon_env(**common, instance_id="second"), tmp_path / "second.log")
        await wait_committed_to_end(kafka_bootstrap, group, topic, 90)
        stop_all(first, second)
    finally:
        kill_all(first, second)

    records = await assert_exactly_once_pg(sb, store_url, envelopes)
    assert "partitions revoked" in first.log()
    ledger = sb.ledger()["keys"]
    for env in envelopes:
        key = idempotency_key("idv", env.operation, env.message_id)
        attempts = ledger[key]["attempts"]
        assert ledger[key]["side_effects"] == 1
        assert sum(a["side_effect"] for a in attempts) == 1, attempts
        if variant == "drained":
            assert len(attempts) == 1, attempts
            assert records[key]["attempts"] == 1
        else:
            # The held call, then the new claimant's: 409 while held, then the stored answer replayed.
            assert len(attempts) >= 2, attempts
            others = [a for a in attempts if not a["side_effect"]]
            assert all(a["status"] == 409 or a["replayed"] for a in others), attempts
            assert sum(a["replayed"] for a in attempts) == 1, attempts
            assert records[key]["attempts"] == 2  # one take-over of the released lease
    if variant == "drained":
        assert "abandoned" not in first.log()
        assert "outcome recorded" not in second.log()  # nothing left for the new owner
    else:
        assert "abandoned" in first.log()
        assert "outcome recorded" in second.log()  # the moved partitions' messages finished there


@pytest.mark.timeout(180)
async def test_drain_bound_longer_than_the_session_timeout_still_drains_first(
    kafka_bootstrap: str, sb: Sandbox, store_url: str, tmp_path: Path, group: str
) -> None:
    """IDV_REBALANCE_DRAIN_S (15 s) above IDV_SESSION_TIMEOUT_MS (6 s), calls held 11 s: the old owner
    should finish them inside its drain bound and commit before the partitions move, so the new owner never
    sees those messages."""
    sb.faults(latency_ms=11000)
    topic = await create_topic(kafka_bootstrap, random_topic_name("slowdrain"), 12, with_sinks=True)
    envelopes = await publish_one_per_partition(kafka_bootstrap, topic, "slow-drain", "slow")
    common: dict[str, Any] = daemon_args(
        kafka_bootstrap, topic, group, store_url, sb.url,
        max_in_flight=16, rebalance_drain_s=15, session_timeout_ms=6000, lease_s=30, provider_timeout_s=20,
        health_port=0,
    )  # fmt: skip
    first = start_daemon(daemon_env(**common, instance_id="first"), tmp_path / "first.log")
    second = None
    try:
        await wait_in_flight(sb, 12)
        second = start_daemon(daemon_env(**common, instance_id="second"), tmp_path / "second.log")
        await wait_committed_to_end(kafka_bootstrap, group, topic, 90)
        stop_all(first, second)
    finally:
        kill_all(first, second)
    await assert_exactly_once_pg(sb, store_url, envelopes)
    assert "abandoned" not in first.log()
    # Drain first: the revoked partitions' offsets were committed before they moved, so the new owner got
    # none of the held messages back (not even as duplicates to skip).
    assert "commit (revoke) failed" not in first.log(), first.log()[-3000:]
    assert "duplicate skipped" not in second.log() and "outcome recorded" not in second.log()


@pytest.mark.timeout(60)
async def test_server_terminated_connections_are_store_errors(store_url: str) -> None:
    """Every failure of a store call while the server drops connections is a (retriable) StoreError.

    ``pg_terminate_backend`` sends each backend's client the same FATAL (57P01, admin shutdown) as a fast
    server shutdown or a failover does, without stopping the shared server: only this test's own
    connections (its ``application_name``) are terminated.
    """
    import asyncpg

    from consumer.errors import LeaseLost, StoreError
    from consumer.store import Outcome, open_store

    app = "idv-term-" + uuid.uuid4().hex[:8]
    pg_admin_url = store_url.split("?", 1)[0]
    admin = await asyncpg.connect(pg_admin_url)
    escaped: list[str] = []
    done = 0
    try:
        async with open_store(f"{store_url}&application_name={app}") as store:
            stop = anyio.Event()

            async def worker() -> None:
                nonlocal done
                while not stop.is_set():
                    key = "idv_term_" + uuid.uuid4().hex
                    try:
                        await claim_key(store, key, owner="o", fp="fp")
                        await store.complete(key, "o", Outcome("approved"))
                        done += 1
                    except (StoreError, LeaseLost):
                        await anyio.sleep(0.01)
                    except Exception as exc:
                        escaped.append(f"{type(exc).__name__}: {exc}")
                        await anyio.sleep(0.01)

            async with anyio.create_task_group() as tg:
                for _ in range(16):
                    tg.start_soon(worker)
                for _ in range(10):
                    await anyio.sleep(0.2)
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                        app,
                    )
                await anyio.sleep(0.5)
                stop.set()
    finally:
        await admin.close()
    assert done > 0
    assert not escaped, f"{len(escaped)} store calls failed with a non-StoreError, e.g. {escaped[0]}"


@pytest.mark.timeout(180)
async def test_store_outage_holds_commits_and_resumes(
    kafka_bootstrap: str, sb: Sandbox, private_pg: Any, tmp_path: Path, group: str
) -> None:
    """PostgreSQL stops for ~5 s under a running daemon: it keeps running, commits nothing past an
    outcome that is not recorded, and carries on when the store is back.

    The server is stopped with ``-m immediate`` (a crash, as far as clients and recovery are concerned). A
    ``-m fast`` stop currently kills the daemon instead (exit 1): see
    ``test_server_terminated_connections_are_store_errors``.
    """
    from aiokafka.admin import AIOKafkaAdminClient

    sb.faults(latency_ms=200)
    topic = await create_topic(kafka_bootstrap, random_topic_name("pgdown"), 8, with_sinks=True)
    unique = await publish_new(kafka_bootstrap, topic, 400, subjects=400, seed=21)
    url = private_pg.url
    env = daemon_env(
        kafka_bootstrap, topic, group, url, sb.url,
        max_in_flight=8, lease_s=10, provider_timeout_s=5, health_port=0,
    )  # fmt: skip
    proc = start_daemon(env, tmp_path / "daemon.log")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    samples: list[dict[int, int]] = []
    try:
        await wait_side_effects(sb, 80, time.monotonic() + 60)
        effects_at_stop = sum(sb.side_effects().values())
        await anyio.to_thread.run_sync(private_pg.stop, "immediate")
        down_until = time.monotonic() + 5
        while time.monotonic() < down_until:
            offsets = await admin.list_consumer_group_offsets(group)
            samples.append({tp.partition: om.offset for tp, om in offsets.items() if tp.topic == topic})
            assert proc.proc.poll() is None, (
                "the daemon died while the store was down:\n" + proc.log()[-2000:]
            )
            await anyio.sleep(0.25)
        restarted_at = time.time()
        await anyio.to_thread.run_sync(private_pg.start)
        sb.faults(latency_ms=0)
        await wait_committed_to_end(kafka_bootstrap, group, topic, 90)
        proc.stop_cleanly()
    finally:
        await admin.close()
        proc.kill()

    assert effects_at_stop < len(unique)
    assert "dedupe store" in proc.log()  # it saw the outage and retried
    records = await assert_exactly_once_pg(sb, url, unique)
    # Outcomes recorded only after the store came back: work really was held up by the outage.
    assert any(r["updated_at"] >= restarted_at for r in records.values())
    # Nothing committed during the outage passes a message whose outcome was not recorded before it.
    messages = await read_all(kafka_bootstrap, topic)
    key_at = {}
    for msg in messages:
        envelope = decode(msg.value, msg.headers)
        key_at[(msg.partition, msg.offset)] = idempotency_key("idv", envelope.operation, envelope.message_id)
    assert samples and max(sum(s.values()) for s in samples) > 0
    for sample in samples:
        for partition, committed in sample.items():
            for offset in range(committed):
                record = records[key_at[(partition, offset)]]
                assert record["updated_at"] < restarted_at, (partition, offset, "committed before recorded")


@pytest.mark.timeout(60)
async def test_daemon_started_while_the_store_is_down_exits_5_with_one_line(
    kafka_bootstrap: str, sandbox: object, tmp_path: Path
) -> None:
    """A daemon (re)started during a store outage: a supervisor sees exit 5 and one line, then retries."""
    topic = await create_topic(kafka_bootstrap, random_topic_name("nostore"), 2, with_sinks=True)
    env = daemon_env(
        bootstrap=kafka_bootstrap,
        topic=topic,
        group="g-" + uuid.uuid4().hex[:8],
        store_url=f"postgresql://idv:idv@127.0.0.1:{free_port()}/idv",  # nothing listens there
        provider_url=sandbox.url,  # type: ignore[attr-defined]
        health_port=0,
    )
    proc = start_daemon(env, tmp_path / "daemon.log")
    try:
        code = proc.wait(45)
    finally:
        proc.kill()
    log = proc.log()
    assert "cannot open the PostgreSQL store" in log
    assert "Traceback" not in log, log[-1500:]
    assert code == 5  # StoreUnavailable
