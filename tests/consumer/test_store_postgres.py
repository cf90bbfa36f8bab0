"""PostgreSQL-specific store behaviour: migrations, several pools racing, outages.

The shared contract lives in ``test_store_contract.py``; these tests cover what only a server backend has.
They need ``IDV_TEST_POSTGRES_URL`` (``bash scripts/postgres.sh start`` prints it): skipped without it,
failed without it when ``CI`` is set. The database is shared and persistent (and other runs may purge it
by real time while these use a fake clock), so each test works in an empty schema of its own
(``?search_path=…``), dropped afterwards.
Outages are made with a TCP proxy between the store and the server, never by stopping the shared server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
import anyio.lowlevel
import asyncpg
import pytest
from anyio.abc import SocketAttribute

from consumer.errors import LeaseLost, StoreError
from consumer.store import Claim, ClaimStatus, Outcome, State, open_store
from consumer.store.postgres import SCHEMA_VERSION, PostgresStore, migrate, migrate_url
from tests.conftest import FakeClock, free_port
from tests.consumer.conftest import claim_key, pg_schema

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = "&".join([parts.query] * bool(parts.query) + [f"{k}={v}" for k, v in params.items()])
    return urlunsplit(parts._replace(query=query))


@pytest.fixture
async def schema_url(pg_url: str) -> AsyncIterator[str]:
    """A URL whose connections work in a fresh, empty schema of their own."""
    async with pg_schema(pg_url, "idv_test_") as url:
        yield url


def _key() -> str:
    return "idv_pg_" + uuid.uuid4().hex


_claim = claim_key


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the server; ``stop()`` is an outage (listener and connections gone)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self._scope: anyio.CancelScope | None = None

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        await tg.start(self._serve)

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.CancelScope() as scope:
            self._scope = scope
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
            self.port = listener.extra(SocketAttribute.local_port)
            task_status.started()
            async with listener:
                await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            try:
                upstream = await anyio.connect_tcp(*self.upstream)
            except OSError:
                return
            async with upstream, anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, upstream, tg.cancel_scope)
                tg.start_soon(self._answer, upstream, client, tg.cancel_scope)

    async def _answer(
        self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, scope: anyio.CancelScope
    ) -> None:
        """The server's replies, to the client (a subclass may interfere)."""
        await self._pump(src, dst, scope)

    @staticmethod
    async def _pump(
        src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, scope: anyio.CancelScope
    ) -> None:
        try:
            async for chunk in src:
                await dst.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            scope.cancel()

    def url(self, base: str) -> str:
        return _on_port(base, self.port)


def _on_port(url: str, port: int) -> str:
    """``url`` pointed at 127.0.0.1:``port``, keeping credentials, database and query."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _upstream(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


async def _lock_row(url: str, key: str) -> Any:
    """Open a connection holding ``key``'s row lock (a slow concurrent writer); close it to let go."""
    conn = await asyncpg.connect(url)
    await conn.execute("BEGIN")
    await conn.execute("SELECT 1 FROM idempotency_records WHERE key = $1 FOR UPDATE", key)
    return conn


async def _wait_until_blocked(locker: Any) -> None:
    """Return once some other backend is waiting for ``locker``'s lock (our statement is in flight)."""
    sql = "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
    pid = locker.get_server_pid()
    with anyio.fail_after(10):
        while not await locker.fetchval(sql, pid):
            await anyio.sleep(0.02)


# -- migrations ---------------------------------------------------------------------------------------


async def test_migrate_is_idempotent(schema_url: str) -> None:
    assert await migrate_url(schema_url) == SCHEMA_VERSION
    assert await migrate_url(schema_url) == SCHEMA_VERSION
    conn = await asyncpg.connect(schema_url)
    try:
        assert await migrate(conn) == SCHEMA_VERSION
        versions = [
            r["version"] for r in await conn.fetch("SELECT version FROM idv_schema_version ORDER BY 1")
        ]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        schema = await conn.fetchval("SELECT current_schema()")
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
        }
        assert tables == {"idv_schema_version", "idempotency_records", "idempotency_conflicts"}
        indexes = {
            r["indexname"]
            for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = $1", schema)
        }
        assert "idempotency_records_expires" in indexes
        # migration 2 dropped the unread (state, lease_until) index so that completions can be HOT updates
        assert "idempotency_records_lease" not in indexes
        options = await conn.fetchval(
            "SELECT reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relname = 'idempotency_records'",
            schema,
        )
        assert options == ["fillfactor=80"]
    finally:
        await conn.close()


async def test_concurrent_migrations_do_not_race(schema_url: str) -> None:
    """Daemons starting together on an empty database: all succeed, every step is applied once."""
    results: list[int] = []

    async def one() -> None:
        conn = await asyncpg.connect(schema_url)
        try:
            results.append(await migrate(conn))
        finally:
            await conn.close()

    async def open_store_once() -> None:
        async with PostgresStore(schema_url, max_size=2):
            results.append(SCHEMA_VERSION)

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(one)
            tg.start_soon(open_store_once)
    assert results == [SCHEMA_VERSION] * 12
    conn = await asyncpg.connect(schema_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM idv_schema_version") == SCHEMA_VERSION
    finally:
        await conn.close()


async def test_newer_schema_refuses_to_open(schema_url: str) -> None:
    await migrate_url(schema_url)
    conn = await asyncpg.connect(schema_url)
    try:
        await conn.execute("INSERT INTO idv_schema_version (version) VALUES ($1)", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="newer than this build"):
        await PostgresStore(schema_url).open()


async def test_open_store_picks_postgres(pg_url: str) -> None:
    assert isinstance(open_store(pg_url), PostgresStore)
    assert isinstance(open_store("postgres://u:p@127.0.0.1:1/db"), PostgresStore)
    # The password never shows in the store's repr (it ends up in logs and error messages).
    assert "p@" not in repr(open_store("postgresql://user:secret@127.0.0.1:5432/idv"))
    assert "secret" not in repr(open_store("postgresql://user:secret@127.0.0.1:5432/idv"))


# -- several pools, as several daemons ----------------------------------------------------------------


async def test_two_pools_claiming_the_same_keys_have_one_winner_per_key(schema_url: str) -> None:
    keys = [_key() for _ in range(25)]
    results: dict[str, list[ClaimStatus]] = {k: [] for k in keys}
    async with PostgresStore(schema_url, max_size=8) as s1, PostgresStore(schema_url, max_size=8) as s2:

        async def claim(store: PostgresStore, key: str, owner: str) -> None:
            results[key].append((await _claim(store, key, owner=owner)).status)

        async with anyio.create_task_group() as tg:
            for i in range(4):
                for key in keys:
                    tg.start_soon(claim, s1, key, f"d1-{i}")
                    tg.start_soon(claim, s2, key, f"d2-{i}")
        for key in keys:
            assert results[key].count(ClaimStatus.ACQUIRED) == 1, results[key]
            assert results[key].count(ClaimStatus.BUSY) == 7
            record = await s1.get(key)
            assert record is not None and record.attempts == 1 and record.state is State.IN_PROGRESS


async def test_two_pools_racing_to_take_over_an_expired_lease(schema_url: str) -> None:
    clock = FakeClock(2_000_000.0)
    key = _key()
    async with PostgresStore(schema_url, clock=clock) as s1, PostgresStore(schema_url, clock=clock) as s2:
        await _claim(s1, key, owner="dead", lease=10)
        clock.now += 11
        claims: list[Claim] = []

        async def claim(store: PostgresStore, owner: str) -> None:
            claims.append(await _claim(store, key, owner=owner))

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(claim, s1, f"d1-{i}")
                tg.start_soon(claim, s2, f"d2-{i}")
        winners = [c for c in claims if c.status is ClaimStatus.ACQUIRED]
        assert len(winners) == 1
        assert sorted(c.status.value for c in claims if c.status is not ClaimStatus.ACQUIRED) == ["busy"] * 19
        record = await s2.get(key)
        assert record is not None
        assert record.owner == winners[0].record.owner and record.attempts == 2
        with pytest.raises(LeaseLost):
            await s1.complete(key, "dead", Outcome("approved"))


async def test_racing_releases_and_claims_stay_consistent(schema_url: str) -> None:
    """Owners keep releasing while others claim: never two live owners, attempts count every acquisition."""
    key = _key()
    acquired = 0
    holders: set[str] = set()
    async with PostgresStore(schema_url) as s1, PostgresStore(schema_url) as s2:

        async def worker(store: PostgresStore, owner: str) -> None:
            nonlocal acquired
            for _ in range(15):
                claim = await _claim(store, key, owner=owner)
                if claim.status is ClaimStatus.ACQUIRED:
                    assert not holders, f"{owner} acquired while {holders} held the lease"
                    holders.add(owner)
                    acquired += 1
                    await anyio.lowlevel.checkpoint()
                    holders.discard(owner)
                    await store.release(key, owner, "again")
                else:
                    assert claim.status is ClaimStatus.BUSY
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(worker, s1, f"d1-{i}")
                tg.start_soon(worker, s2, f"d2-{i}")
        record = await s1.get(key)
        assert record is not None and record.state is State.RELEASED
        assert acquired >= 1 and record.attempts == acquired


# -- retention ----------------------------------------------------------------------------------------


async def test_purge_works_in_batches_and_keeps_in_progress(schema_url: str) -> None:
    clock = FakeClock(2_000_000.0)
    async with PostgresStore(schema_url, clock=clock) as store:
        store.purge_batch = 7
        for i in range(30):
            key = _key()
            await _claim(store, key, retention=100)
            await store.record_conflict(
                key=key, message_id=f"m-{i}", fingerprint="fp2", stored_fingerprint="fp1", source="t/0@1"
            )
            if i % 3:
                await store.complete(key, "a", Outcome("approved", 200, f"ref-{i}"))
            else:
                await store.release(key, "a", "retries_exhausted")
        live = [_key() for _ in range(4)]
        for key in live:
            await _claim(store, key, lease=1e9, retention=100)
        fresh = _key()
        clock.now += 101
        await _claim(store, fresh, retention=100)
        await store.record_conflict(
            key=fresh, message_id="m-fresh", fingerprint="fp2", stored_fingerprint="fp1", source="t/0@2"
        )
        assert await store.purge_expired() == 30
        assert await store.counts() == {"in_progress": 5, "completed": 0, "failed": 0, "released": 0}
        # The conflict log went with its records, in batches too; the live record's entry stays.
        assert [c["message_id"] for c in await store.conflicts()] == ["m-fresh"]
        assert await store.purge_expired() == 0


# -- outages ------------------------------------------------------------------------------------------


async def test_unreachable_server_is_a_store_error(pg_url: str) -> None:
    nowhere = _on_port(pg_url, free_port())
    store = PostgresStore(nowhere, connect_timeout=2)
    with pytest.raises(StoreError, match="cannot open") as info:
        await store.open()
    assert info.value.retriable
    assert "idv:idv" not in str(info.value)
    with pytest.raises(StoreError, match="not open"):
        await _claim(store, _key())
    with pytest.raises(StoreError):
        await migrate_url(nowhere, connect_timeout=2)


async def test_outage_is_a_store_error_and_the_store_recovers(schema_url: str) -> None:
    async with anyio.create_task_group() as tg:
        proxy = TcpProxy(*_upstream(schema_url))
        await proxy.start(tg)
        key = _key()
        async with PostgresStore(proxy.url(schema_url), connect_timeout=2) as store:
            assert (await _claim(store, key)).status is ClaimStatus.ACQUIRED

            proxy.stop()
            for op in (lambda: _claim(store, _key()), lambda: store.renew(key, "a", 30), store.counts):
                with pytest.raises(StoreError) as info:
                    await op()
                assert info.value.__cause__ is not None

            await proxy.start(tg)  # same port: the server is back
            record = await _retry_store(lambda: store.get(key))
            assert record is not None and record.state is State.IN_PROGRESS and record.owner == "a"
            await store.complete(key, "a", Outcome("approved", 200, "ref"))
            assert (await _claim(store, key, owner="b")).status is ClaimStatus.DONE
        proxy.stop()


async def _retry_store(fn: Callable[[], Awaitable[Any]]) -> Any:
    """What the pipeline does: retry on StoreError (a pooled connection may still be the dead one)."""
    for _ in range(20):
        try:
            return await fn()
        except StoreError:
            await anyio.sleep(0.1)
    return await fn()


async def test_connection_lost_mid_statement_is_a_store_error(schema_url: str) -> None:
    """The reply is lost, the outcome ambiguous; a retry then succeeds or raises LeaseLost, and either way
    the record ends COMPLETED with our outcome (the pipeline re-checks after LeaseLost and finds it DONE)."""
    key = _key()
    async with anyio.create_task_group() as tg:
        proxy = TcpProxy(*_upstream(schema_url))
        await proxy.start(tg)
        async with PostgresStore(proxy.url(schema_url), connect_timeout=2) as store:
            await _claim(store, key)
            locker = await _lock_row(schema_url, key)
            errors: list[BaseException] = []

            async def complete() -> None:
                try:
                    await store.complete(key, "a", Outcome("approved", 200, "ref"))
                except StoreError as exc:
                    errors.append(exc)

            try:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(complete)
                    await _wait_until_blocked(locker)  # the UPDATE is waiting for the row lock
                    proxy.stop()
            finally:
                await locker.close()
            assert len(errors) == 1 and isinstance(errors[0], StoreError)

            await proxy.start(tg)
            try:
                await _retry_store(lambda: store.complete(key, "a", Outcome("approved", 200, "ref")))
            except LeaseLost:
                pass  # the orphaned statement committed after all
            record = await _retry_store(lambda: store.get(key))
            assert record is not None and record.state is State.COMPLETED
            assert record.outcome == Outcome("approved", 200, "ref")
        proxy.stop()


async def test_command_timeout_is_a_store_error(schema_url: str) -> None:
    key = _key()
    async with PostgresStore(schema_url, command_timeout=0.5) as store:
        await _claim(store, key)
        locker = await _lock_row(schema_url, key)
        try:
            with pytest.raises(StoreError, match="renew"):
                await store.renew(key, "a", 30)
        finally:
            await locker.close()
        await store.renew(key, "a", 30)  # the pool's connection is still usable
        record = await store.get(key)
        assert record is not None and record.owner == "a"


async def test_cancelled_caller_still_gets_its_transition(schema_url: str) -> None:
    """Like the SQLite writer, a call is shielded: a cancelled claim still finishes and reports back,
    so the caller can release the key instead of leaving it locked until the lease runs out."""
    key = _key()
    got: list[Claim] = []
    async with PostgresStore(schema_url) as store:
        with anyio.CancelScope() as scope:
            scope.cancel()
            got.append(await _claim(store, key))
            await anyio.lowlevel.checkpoint()
            pytest.fail("not cancelled")  # pragma: no cover
        assert scope.cancelled_caught
        assert got and got[0].status is ClaimStatus.ACQUIRED
        await store.release(key, "a", "abandoned")
        record = await store.get(key)
        assert record is not None and record.state is State.RELEASED


# -- the URL's password never shows ---------------------------------------------------------------------

PASSWORD = "Sup3r-S3cret-pw"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://idv:{PASSWORD}@no-such-host.invalid:5432/idv",  # DNS failure
        f"postgresql://idv:{PASSWORD}@127.0.0.1:1/idv",  # connection refused
        f"postgresql://idv:{PASSWORD}@127.0.0.1:5432/idv?sslmode=bogus",  # the driver rejects the DSN
    ],
)
async def test_a_failing_open_never_shows_the_password(url: str) -> None:
    store = open_store(url)
    assert PASSWORD not in repr(store)
    with pytest.raises(StoreError) as info:
        await store.open()
    assert PASSWORD not in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is None  # the driver's exception (which may hold the DSN) is not chained


async def test_a_wrong_password_is_reported_without_it(pg_url: str) -> None:
    parts = urlsplit(pg_url)
    wrong = urlunsplit(parts._replace(netloc=f"{parts.username}:{PASSWORD}@{parts.hostname}:{parts.port}"))
    with pytest.raises(StoreError, match="password authentication failed") as info:
        await open_store(wrong).open()
    assert PASSWORD not in str(info.value)


def test_an_unparsable_url_is_a_configuration_error_without_the_password() -> None:
    from consumer.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as info:
        open_store(f"postgresql://idv:{PASSWORD}@127.0.0.1:port/idv")
    assert PASSWORD not in str(info.value)


def test_the_cli_prints_the_store_error_without_the_password(tmp_path: Any) -> None:
    import subprocess
    import sys

    url_file = tmp_path / "store-url"
    url_file.write_text(f"postgresql://idv:{PASSWORD}@127.0.0.1:1/idv\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDV_")}
    env.update(
        IDV_STORE_URL_FILE=str(url_file),
        IDV_FINGERPRINT_KEY="cli-test-fingerprint-key",
        IDV_PROVIDER_API_KEY="k",
    )
    result = subprocess.run(
        [sys.executable, "-m", "consumer", "status"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 2
    assert "127.0.0.1:1/idv" in result.stderr  # it reads the URL from the file
    assert PASSWORD not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


# -- a claim whose reply is lost on the wire -----------------------------------------------------------


class ReplyCutter(TcpProxy):
    """A proxy that, when armed, drops the connection at the server's next reply instead of forwarding
    it: the statement ran (and, in autocommit, committed), the client never hears of it."""

    cut_next_reply = False

    async def _answer(
        self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, scope: anyio.CancelScope
    ) -> None:
        try:
            async for chunk in src:
                if self.cut_next_reply:
                    self.cut_next_reply = False
                    return  # finally: both sides dropped, the reply never forwarded
                await dst.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            scope.cancel()


async def test_a_claim_retried_after_its_reply_was_lost_does_not_wait_a_lease(schema_url: str) -> None:
    async with anyio.create_task_group() as tg:
        proxy = ReplyCutter(*_upstream(schema_url))
        await proxy.start(tg)
        # One connection, its claim statement already prepared: the cut hits the execution's reply.
        async with PostgresStore(proxy.url(schema_url), min_size=1, max_size=1, connect_timeout=2) as store:
            assert (await _claim(store, _key())).status is ClaimStatus.ACQUIRED
            key = _key()
            proxy.cut_next_reply = True
            with pytest.raises(StoreError):
                await _claim(store, key, owner="a", lease=60.0)
            stored = await store.get(key)  # the insert committed although the answer was lost
            assert stored is not None and stored.state is State.IN_PROGRESS and stored.owner == "a"
            started = anyio.current_time()
            claim = await _claim(store, key, owner="a", lease=60.0)
            assert claim.status is ClaimStatus.ACQUIRED  # not BUSY for the 60 s lease
            assert claim.record.attempts == 1 and claim.record.owner == "a"
            assert anyio.current_time() - started < 5
            # Another owner still finds it busy; completing works as usual.
            assert (await _claim(store, key, owner="b")).status is ClaimStatus.BUSY
            await store.complete(key, "a", Outcome("approved", 200, "ref"))
        tg.cancel_scope.cancel()


# -- the batched writer ---------------------------------------------------------------------------------


async def test_concurrent_transitions_share_batches(schema_url: str) -> None:
    keys = [_key() for _ in range(64)]
    async with PostgresStore(schema_url, max_size=4) as store:
        claims: list[Claim] = []

        async def claim(key: str) -> None:
            claims.append(await _claim(store, key))

        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(claim, key)
        assert [c.status for c in claims] == [ClaimStatus.ACQUIRED] * 64
        assert store.batches < 64  # many claims per statement
        done: list[State | str] = []

        async def complete(key: str) -> None:
            try:
                done.append((await store.complete(key, "a", Outcome("approved", 200, key[-6:]))).state)
            except LeaseLost:
                done.append("lease lost")

        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(complete, key)
            tg.start_soon(complete, keys[0])  # the same key twice: run one after the other, in order
        assert done.count(State.COMPLETED) == 64 and done.count("lease lost") == 1
        for key in keys:
            record = await store.get(key)
            assert record is not None and record.outcome == Outcome("approved", 200, key[-6:])


async def test_a_failed_batch_fails_every_caller_in_it(schema_url: str) -> None:
    async with anyio.create_task_group() as tg:
        proxy = TcpProxy(*_upstream(schema_url))
        await proxy.start(tg)
        async with PostgresStore(proxy.url(schema_url), connect_timeout=2, max_size=2) as store:
            assert (await _claim(store, _key())).status is ClaimStatus.ACQUIRED
            proxy.stop()
            errors: list[BaseException] = []

            async def claim() -> None:
                try:
                    await _claim(store, _key())
                except StoreError as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as inner:
                for _ in range(10):
                    inner.start_soon(claim)
            assert len(errors) == 10 and len({id(e) for e in errors}) == 10  # one error each
            assert all(e.__cause__ is not None for e in errors)
            await proxy.start(tg)
            assert (await _retry_store(lambda: _claim(store, _key()))).status is ClaimStatus.ACQUIRED
        proxy.stop()


async def test_a_caller_cancelled_while_its_batch_runs_still_gets_the_answer(schema_url: str) -> None:
    key = _key()
    async with PostgresStore(schema_url) as store:
        await _claim(store, key)
        locker = await _lock_row(schema_url, key)
        got: list[Any] = []
        scope = anyio.CancelScope()

        async def complete() -> None:
            with scope:
                got.append(await store.complete(key, "a", Outcome("approved", 200, "ref")))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(complete)
                await _wait_until_blocked(locker)  # the batch's UPDATE waits for the row lock
                scope.cancel()
                await anyio.sleep(0.1)
                assert not got  # still waiting for its batch, not gone
                await locker.close()
        finally:
            if not locker.is_closed():
                await locker.close()
        assert got and got[0].state is State.COMPLETED
        record = await store.get(key)
        assert record is not None and record.state is State.COMPLETED


async def test_a_keys_operations_run_in_order_across_kinds(schema_url: str) -> None:
    """Queued together: claim(k2), complete(k1), claim(k1). The claim of k1 must not join k2's claim
    batch ahead of k1's complete: it runs after it and finds k1 DONE."""
    k1, k2 = _key(), _key()
    async with PostgresStore(schema_url) as store:
        assert (await _claim(store, k1)).status is ClaimStatus.ACQUIRED
        got: dict[str, Any] = {}

        async def claim(name: str, key: str, owner: str) -> None:
            got[name] = (await _claim(store, key, owner=owner)).status

        async def complete() -> None:
            got["complete"] = (await store.complete(k1, "a", Outcome("approved", 200, "ref"))).state

        async with anyio.create_task_group() as tg:
            tg.start_soon(claim, "k2", k2, "b")
            tg.start_soon(complete)
            tg.start_soon(claim, "k1", k1, "b")
        assert got == {"k2": ClaimStatus.ACQUIRED, "complete": State.COMPLETED, "k1": ClaimStatus.DONE}
