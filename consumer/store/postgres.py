"""PostgreSQL dedupe store (asyncpg): the same contract as SQLite, for several daemons on several hosts.

Every transition is one SQL statement in autocommit mode, and every state change is a conditional
``UPDATE`` whose ``WHERE`` clause *is* the compare-and-set. The sessions run at READ COMMITTED (pinned
per connection), which is what makes that safe under concurrency: when two statements race for one row,
the second waits for the first to commit and then re-evaluates its ``WHERE`` clause against the row as
the first left it. So of twenty concurrent take-overs of an expired lease exactly one matches
``lease_until <= now``, and an owner whose lease was taken over finds ``owner = $2`` false and gets
:class:`~consumer.errors.LeaseLost`.

``claim`` works in at most a few round trips, usually one:

1. ``INSERT … ON CONFLICT (key) DO NOTHING RETURNING``, with a fallback ``SELECT`` of the existing row in
   the same statement. A new key is ACQUIRED here. For an existing key the row read decides: CONFLICT if
   the fingerprint differs (checked before anything else, on every path that could return a stored
   outcome), DONE for COMPLETED or FAILED, BUSY for a live lease.
2. RELEASED, or IN_PROGRESS with an expired lease: a take-over ``UPDATE`` that repeats those conditions
   (and the fingerprint) in its ``WHERE``. If another claimant got there first, it matches nothing and
   we look again.
3. The fallback read uses the statement's snapshot. A row inserted by a transaction that committed after
   the snapshot was taken (a concurrent claimant of the same key) makes the ``INSERT`` do nothing yet is
   invisible to the read; the statement then returns no row and we simply look again with a new one.

All times come from :attr:`DedupeStore.clock` and are sent as parameters, never ``now()`` in SQL, so one
clock decides every lease (and tests can move it). Daemons on different hosts compare each other's
``lease_until`` against their own clock: keep clocks synchronised and leases much longer than the skew.

Driver and network failures become :class:`~consumer.errors.StoreError` (retriable: the pipeline backs
off and the message waits). Each call is shielded from cancellation, like the SQLite writer: a caller
that is cancelled still learns whether its transition happened, so it can hand a claimed key back.
``command_timeout`` bounds how long that can take.

The schema is versioned: :data:`MIGRATIONS` is applied in order by :func:`migrate`, inside one
transaction holding an advisory lock, so daemons starting together do not race to create tables.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import anyio
import asyncpg

from consumer.errors import LeaseLost, StoreError
from consumer.store import redact
from consumer.store.base import (
    COLUMN_LIST,
    Claim,
    ClaimStatus,
    Clock,
    Decision,
    DedupeStore,
    Outcome,
    Record,
    State,
    decide_claim,
    dump_outcome,
    record_from_row,
)

__all__ = ["MIGRATIONS", "PostgresStore", "migrate", "migrate_url"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Schema steps, applied in order; step ``i`` brings the schema to version ``i + 1``. Append, never edit.
MIGRATIONS: list[str] = [
    # 1: the records, their reaper and lease indexes, and the conflict log.
    """
    CREATE TABLE idempotency_records (
        key          text PRIMARY KEY,
        message_id   text NOT NULL,
        operation    text NOT NULL,
        fingerprint  text NOT NULL,
        state        text NOT NULL CHECK (state IN ('in_progress', 'completed', 'failed', 'released')),
        owner        text,
        lease_until  double precision,
        attempts     integer NOT NULL DEFAULT 0,
        outcome      jsonb,
        last_error   text,
        created_at   double precision NOT NULL,
        updated_at   double precision NOT NULL,
        expires_at   double precision NOT NULL,
        CONSTRAINT idempotency_records_lease_held CHECK (
            (state = 'in_progress') = (owner IS NOT NULL AND lease_until IS NOT NULL)
        )
    );
    CREATE INDEX idempotency_records_expires ON idempotency_records (expires_at);
    CREATE INDEX idempotency_records_lease ON idempotency_records (state, lease_until);
    CREATE TABLE idempotency_conflicts (
        id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        key                 text NOT NULL,
        message_id          text NOT NULL,
        fingerprint         text NOT NULL,
        stored_fingerprint  text NOT NULL,
        source              text NOT NULL,
        seen_at             double precision NOT NULL
    );
    CREATE INDEX idempotency_conflicts_message ON idempotency_conflicts (message_id);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

# pg_advisory_xact_lock key shared by every daemon migrating this database ("idv-migr" as a bigint).
_MIGRATION_LOCK = int.from_bytes(b"idv-migr", "big")

_COLUMNS = COLUMN_LIST

# One statement: insert the record, or (when the key exists) return the existing row, flagged.
_CLAIM_SQL = f"""
WITH ins AS (
    INSERT INTO idempotency_records ({_COLUMNS})
    VALUES ($1, $2, $3, $4, 'in_progress', $5, $6, 1, NULL, NULL, $7, $7, $8)
    ON CONFLICT (key) DO NOTHING
    RETURNING {_COLUMNS}
)
SELECT {_COLUMNS}, true AS inserted FROM ins
UNION ALL
SELECT {_COLUMNS}, false AS inserted FROM idempotency_records
WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM ins)
"""  # noqa: S608 - only the module's own column list is interpolated

# The compare-and-set of a take-over: only RELEASED or an expired lease, only with the same fingerprint.
_TAKE_OVER_SQL = f"""
UPDATE idempotency_records
SET state = 'in_progress', owner = $3, lease_until = $4, attempts = attempts + 1, updated_at = $5,
    expires_at = GREATEST(expires_at, $6)
WHERE key = $1 AND fingerprint = ANY($2::text[])
  AND (state = 'released' OR (state = 'in_progress' AND lease_until <= $5))
RETURNING {_COLUMNS}
"""  # noqa: S608 - only the module's own column list is interpolated

# A claim re-entering our own live lease (an earlier claim's answer was lost): renew it, same attempt.
_REENTER_SQL = f"""
UPDATE idempotency_records SET lease_until = $4, updated_at = $5
WHERE key = $1 AND fingerprint = ANY($2::text[]) AND state = 'in_progress' AND owner = $3
  AND lease_until > $5
RETURNING {_COLUMNS}
"""  # noqa: S608 - only the module's own column list is interpolated

_GET_SQL = f"SELECT {_COLUMNS} FROM idempotency_records WHERE key = $1"  # noqa: S608 - as above

_COMPLETE_SQL = f"""
UPDATE idempotency_records
SET state = $3, outcome = $4::jsonb, owner = NULL, lease_until = NULL, updated_at = $5
WHERE key = $1 AND state = 'in_progress' AND owner = $2
RETURNING {_COLUMNS}
"""  # noqa: S608 - constant column list

_RELEASE_SQL = """
UPDATE idempotency_records
SET state = 'released', owner = NULL, lease_until = NULL, last_error = $3, updated_at = $4
WHERE key = $1 AND state = 'in_progress' AND owner = $2
"""

_RENEW_SQL = """
UPDATE idempotency_records SET lease_until = $3, updated_at = $4
WHERE key = $1 AND state = 'in_progress' AND owner = $2
"""

# The outer conditions repeat the inner ones on purpose: a row changed after the subquery's snapshot
# (e.g. taken over) is re-checked against them before it is deleted. SKIP LOCKED: never wait on a row a
# claimant is updating; it is not expired for long and the next batch or run gets it.
_PURGE_SQL = """
DELETE FROM idempotency_records
WHERE key IN (
    SELECT key FROM idempotency_records
    WHERE expires_at < $1 AND state <> 'in_progress'
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
AND expires_at < $1 AND state <> 'in_progress'
"""

# Conflict log entries go with their record (run after the records' purge).
_PURGE_CONFLICTS_SQL = """
DELETE FROM idempotency_conflicts
WHERE id IN (
    SELECT c.id FROM idempotency_conflicts c
    WHERE NOT EXISTS (SELECT 1 FROM idempotency_records r WHERE r.key = c.key)
    LIMIT $1
)
"""

# How many times claim looks again after losing a race before answering BUSY (the caller waits, retries).
_CLAIM_ROUNDS = 8

# Driver, server and network failures: the store is unavailable or the statement did not finish.
_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # Raised on a pooled connection the server has just terminated (restart, failover).
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

_OPEN_ERRORS: tuple[type[BaseException], ...] = (*_DB_ERRORS, ValueError)


class _StoreConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg ships no type stubs
    """A pooled connection released without asyncpg's reset query.

    By default every release to the pool sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL``: one more round trip per store call. This store sets no session state (settings come
    with the connection, the migration lock is transaction-scoped, no cursors, no LISTEN), and asyncpg
    still rolls back any open transaction on release, so there is nothing left to reset.
    """

    def get_reset_query(self) -> str:
        return ""


def _rowcount(status: str) -> int:
    # asyncpg returns the command tag, e.g. "UPDATE 1" or "DELETE 42".
    return int(status.rsplit(" ", 1)[-1])


def _where(url: str) -> str:
    """``host:port/db`` for messages: never the user or password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    return f"{host}{port}{parts.path or '/'}"


async def migrate(conn: Any) -> int:
    """Bring the schema on ``conn`` up to :data:`SCHEMA_VERSION`; returns the version. Safe to run
    concurrently from several processes (an advisory lock serialises them) and to run again."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS idv_schema_version ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current: int = await conn.fetchval("SELECT coalesce(max(version), 0) FROM idv_schema_version")
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"store schema version {current} is newer than this build ({SCHEMA_VERSION}); "
                "upgrade the consumer"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            await conn.execute(MIGRATIONS[version - 1])
            await conn.execute("INSERT INTO idv_schema_version (version) VALUES ($1)", version)
            log.info("dedupe store schema migrated to version %d", version)
    return SCHEMA_VERSION


async def migrate_url(url: str, *, connect_timeout: float = 10.0) -> int:
    """Connect to ``url``, run :func:`migrate`, disconnect; returns the schema version."""
    try:
        conn = await asyncpg.connect(url, timeout=connect_timeout)
    except _DB_ERRORS as exc:
        raise StoreError(redact(f"cannot connect to PostgreSQL at {_where(url)}: {exc}", url)) from None
    try:
        return await migrate(conn)
    except _DB_ERRORS as exc:
        message = f"migrating the PostgreSQL store at {_where(url)} failed: {exc}"
        raise StoreError(redact(message, url)) from None
    finally:
        await conn.close()


class PostgresStore(DedupeStore):
    #: Rows deleted per statement by :meth:`purge_expired` (short transactions, bounded lock time).
    purge_batch = 5000

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        clock: Clock | None = None,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
    ) -> None:
        super().__init__(clock or time.time)
        self.url = url
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._pool: Any = None

    def __repr__(self) -> str:
        return f"PostgresStore({_where(self.url)!r})"

    # -- lifecycle -------------------------------------------------------------------------------------

    def _server_settings(self) -> dict[str, str]:
        settings = {
            # The compare-and-set reasoning in the module docstring assumes READ COMMITTED; a stricter
            # server default would turn lost races into serialization errors (safe, but needless retries).
            "default_transaction_isolation": "read committed",
        }
        if "application_name" not in parse_qs(urlsplit(self.url).query):
            settings["application_name"] = "idv-consumer"
        return settings

    async def open(self) -> None:
        if self._pool is not None:
            return
        where = _where(self.url)
        try:
            pool = await asyncpg.create_pool(
                self.url,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                server_settings=self._server_settings(),
                connection_class=_StoreConnection,
            )
        except _OPEN_ERRORS as exc:  # with ValueError: asyncpg could not parse the DSN
            # `from None`: the driver's exception (and its traceback) may carry the DSN and password.
            raise StoreError(
                redact(f"cannot open the PostgreSQL store at {where}: {type(exc).__name__}: {exc}", self.url)
            ) from None
        try:
            async with pool.acquire(timeout=self.connect_timeout) as conn:
                version = await migrate(conn)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, _DB_ERRORS):
                raise StoreError(
                    redact(f"cannot migrate the PostgreSQL store at {where}: {exc}", self.url)
                ) from None
            raise
        self._pool = pool
        log.info("dedupe store open: PostgreSQL at %s, schema version %d", where, version)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            with anyio.fail_after(self.command_timeout):
                await pool.close()
        except TimeoutError:
            log.warning(
                "PostgreSQL pool did not close in %.0fs; terminating its connections", self.command_timeout
            )
            pool.terminate()

    async def _run(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        pool = self._pool
        if pool is None:
            raise StoreError("store is not open")
        try:
            # Shielded: a cancelled caller still learns whether its transition happened (see docstring).
            with anyio.CancelScope(shield=True):
                async with pool.acquire(timeout=self.connect_timeout) as conn:
                    result = await fn(conn)
        except _DB_ERRORS as exc:
            message = f"PostgreSQL {what} failed: {type(exc).__name__}: {exc}"
            raise StoreError(redact(message, self.url)) from exc
        return result

    # -- operations ------------------------------------------------------------------------------------

    async def _claim(
        self,
        *,
        key: str,
        message_id: str,
        operation: str,
        fingerprints: tuple[str, ...],
        owner: str,
        lease_s: float,
        retention_s: float,
        reentrant: bool,
    ) -> Claim:
        fingerprint, accepted = fingerprints[0], list(fingerprints)

        async def fn(conn: Any) -> Claim:
            record: Record | None = None
            for _ in range(_CLAIM_ROUNDS):
                now = self.clock()
                row = await conn.fetchrow(
                    _CLAIM_SQL,
                    *(key, message_id, operation, fingerprint, owner, now + lease_s, now, now + retention_s),
                )
                if row is None:
                    continue  # inserted concurrently, not yet visible to this statement's snapshot
                record = record_from_row(row)
                if row["inserted"]:
                    return Claim(ClaimStatus.ACQUIRED, record)
                decision = decide_claim(
                    record, fingerprints=fingerprints, owner=owner, now=now, reentrant=reentrant
                )
                if decision in (Decision.CONFLICT, Decision.DONE, Decision.BUSY):
                    return Claim(decision.status, record)
                if decision is Decision.REENTER:
                    # Our own live lease that no caller holds: a claim whose answer was lost. Renew it.
                    row = await conn.fetchrow(_REENTER_SQL, key, accepted, owner, now + lease_s, now)
                    if row is not None:
                        return Claim(ClaimStatus.ACQUIRED, record_from_row(row))
                    continue  # changed since we read it (expired, taken over): look again
                # RELEASED, or a lease that has run out: take it over if nobody else does first.
                row = await conn.fetchrow(
                    _TAKE_OVER_SQL, key, accepted, owner, now + lease_s, now, now + retention_s
                )
                if row is not None:
                    return Claim(ClaimStatus.ACQUIRED, record_from_row(row))
                # Lost the race (or the row changed since we read it): look again.
            if record is None:
                raise StoreError(f"claim of {key} kept racing with concurrent writers")
            return Claim(ClaimStatus.BUSY, record)

        return await self._run("claim", fn)

    async def _transition(self, what: str, sql: str, *args: Any) -> None:
        async def fn(conn: Any) -> str:
            status: str = await conn.execute(sql, *args)
            return status

        if _rowcount(await self._run(what, fn)) != 1:
            raise LeaseLost(f"record {args[0]} is not in progress under this owner")

    async def _complete(self, key: str, owner: str, outcome: Outcome, *, failed: bool = False) -> Record:
        state = State.FAILED if failed else State.COMPLETED
        payload = dump_outcome(outcome)
        args = (key, owner, state.value, payload, self.clock())

        async def fn(conn: Any) -> Any:
            return await conn.fetchrow(_COMPLETE_SQL, *args)

        row = await self._run("complete", fn)
        if row is None:
            raise LeaseLost(f"record {key} is not in progress under this owner")
        return record_from_row(row)

    async def _release(self, key: str, owner: str, error: str) -> None:
        await self._transition("release", _RELEASE_SQL, key, owner, error[:200], self.clock())

    async def _renew(self, key: str, owner: str, lease_s: float) -> None:
        now = self.clock()
        await self._transition("renew", _RENEW_SQL, key, owner, now + lease_s, now)

    async def record_conflict(
        self, *, key: str, message_id: str, fingerprint: str, stored_fingerprint: str, source: str
    ) -> None:
        async def fn(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO idempotency_conflicts"
                " (key, message_id, fingerprint, stored_fingerprint, source, seen_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                *(key, message_id, fingerprint, stored_fingerprint, source, self.clock()),
            )

        await self._run("record_conflict", fn)

    async def get(self, key: str) -> Record | None:
        async def fn(conn: Any) -> Record | None:
            row = await conn.fetchrow(_GET_SQL, key)
            return record_from_row(row) if row is not None else None

        return await self._run("get", fn)

    async def conflicts(self, message_id: str | None = None) -> list[dict[str, Any]]:
        sql = (
            "SELECT key, message_id, fingerprint, stored_fingerprint, source, seen_at"
            " FROM idempotency_conflicts"
        )
        args: tuple[Any, ...] = ()
        if message_id is not None:
            sql += " WHERE message_id = $1"
            args = (message_id,)

        async def fn(conn: Any) -> list[dict[str, Any]]:
            return [dict(row.items()) for row in await conn.fetch(sql + " ORDER BY id", *args)]

        return await self._run("conflicts", fn)

    async def counts(self) -> dict[str, int]:
        async def fn(conn: Any) -> dict[str, int]:
            out = {state.value: 0 for state in State}
            rows = await conn.fetch("SELECT state, count(*) AS n FROM idempotency_records GROUP BY state")
            for row in rows:
                out[row["state"]] = row["n"]
            return out

        return await self._run("counts", fn)

    async def purge_expired(self) -> int:
        async def fn(conn: Any) -> str:
            status: str = await conn.execute(_PURGE_SQL, self.clock(), self.purge_batch)
            return status

        async def conflicts(conn: Any) -> str:
            status: str = await conn.execute(_PURGE_CONFLICTS_SQL, self.purge_batch)
            return status

        total = 0
        while True:
            deleted = _rowcount(await self._run("purge_expired", fn))
            total += deleted
            if deleted < self.purge_batch:
                break
        gone = 0
        while True:
            deleted = _rowcount(await self._run("purge_expired", conflicts))
            gone += deleted
            if deleted < self.purge_batch:
                break
        if gone:
            log.info("purged %d conflict log entries whose record expired", gone)
        return total
