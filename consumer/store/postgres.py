"""PostgreSQL dedupe store (asyncpg): the same contract as SQLite, for several daemons on several hosts.

Every state change is a conditional ``UPDATE`` (autocommit) whose ``WHERE`` clause *is* the
compare-and-set. The sessions run at READ COMMITTED (pinned per connection), which is what makes that
safe under concurrency: when two statements race for one row, the second waits for the first to commit
and then re-evaluates its ``WHERE`` clause against the row as the first left it. So of twenty concurrent
take-overs of an expired lease exactly one matches ``lease_until <= now``, and an owner whose lease was
taken over finds ``owner = v.owner`` false and gets :class:`~consumer.errors.LeaseLost`.

**Batched writer.** Like the SQLite writer's group commit, callers queue their transitions (claim,
complete, release, renew) and a batch runs *one statement per kind* for everything queued of that kind
(up to ``max_batch``), each field passed as an array and joined with ``unnest``; up to ``max_inflight``
batches run at once, each on its own pooled connection. Each row keeps its own compare-and-set in the
statement's ``WHERE``; a key the statement did not return is that caller's LeaseLost (or, for a claim,
a lost race: it looks again). A key appears at most once in running batches: its next operation waits
for the next batch, so one key's transitions run one after the other, in order. Keys are sorted, so two
daemons lock shared rows in the same order.

A batch of claims works in at most a few statements, usually one, decided by
:func:`~consumer.store.base.decide_claim`:

1. ``INSERT … SELECT FROM unnest(…) ON CONFLICT (key) DO NOTHING RETURNING``, with a fallback read of the
   existing rows in the same statement. New keys are ACQUIRED here. For an existing key the row read
   decides: CONFLICT if the fingerprint differs (checked before anything else, on every path that could
   return a stored outcome), DONE for COMPLETED or FAILED, BUSY for a live lease.
2. RELEASED, or IN_PROGRESS with an expired lease: one take-over ``UPDATE`` for all of them that repeats
   those conditions (and the fingerprint) in its ``WHERE``; our own live lease whose claim's answer was
   lost: one re-enter ``UPDATE``. A key another claimant got first matches nothing and looks again.
3. The fallback read uses the statement's snapshot. A row inserted by a transaction that committed after
   the snapshot was taken (a concurrent claimant of the same key) makes the ``INSERT`` do nothing yet is
   invisible to the read; that key is in neither half of the answer and simply looks again.

All times come from :attr:`DedupeStore.clock` and are sent as parameters, never ``now()`` in SQL, so one
clock decides every lease (and tests can move it). Daemons on different hosts compare each other's
``lease_until`` against their own clock: keep clocks synchronised and leases much longer than the skew.

Driver and network failures become :class:`~consumer.errors.StoreError` (retriable: the pipeline backs
off and the message waits); a failed batch fails each caller in it that had no answer yet, with a
StoreError of its own. Callers are shielded from cancellation, like the SQLite writer's: a caller
cancelled while its batch runs still learns whether its transition happened, so it can hand a claimed key
back. ``command_timeout`` bounds how long that can take.

The schema is versioned: :data:`MIGRATIONS` is applied in order by :func:`migrate`, inside one
transaction holding an advisory lock, so daemons starting together do not race to create tables.
"""

from __future__ import annotations

import asyncio
import collections
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
    COLUMNS,
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
_R_COLUMNS = ", ".join(f"r.{c}" for c in COLUMNS)  # the same, qualified (UPDATE … FROM also has a `key`)

# The batched writer's statements. Each takes one array per field (one element per caller, keys distinct
# and sorted, so two daemons lock shared rows in the same order) and handles the whole batch in one
# autocommit statement. Only the module's own column lists are interpolated (noqa: S608 below).

# Claims: insert the records that do not exist; return those rows flagged `inserted`, and the existing
# rows of the other keys as read by the statement's snapshot (a row inserted by a concurrent claimant
# that committed after the snapshot is in neither: that key simply looks again).
_CLAIM_SQL = f"""
WITH v AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[],
                         $7::float8[])
        AS v(key, message_id, operation, fingerprint, owner, lease_until, expires_at)
), ins AS (
    INSERT INTO idempotency_records ({_COLUMNS})
    SELECT key, message_id, operation, fingerprint, 'in_progress'::text, owner, lease_until, 1,
           NULL::jsonb, NULL::text, $8::float8, $8::float8, expires_at
    FROM v ORDER BY key
    ON CONFLICT (key) DO NOTHING
    RETURNING {_COLUMNS}
)
SELECT {_COLUMNS}, true AS inserted FROM ins
UNION ALL
SELECT {_R_COLUMNS}, false AS inserted
FROM v CROSS JOIN LATERAL (SELECT * FROM idempotency_records WHERE key = v.key OFFSET 0) r
WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.key = r.key)
"""  # noqa: S608

# The compare-and-set of take-overs: only RELEASED or an expired lease, only with the fingerprint read
# (one the claim accepted). At READ COMMITTED a row another claimant changed first is re-checked against
# these conditions as that claimant left it: of racing take-overs exactly one matches.
_TAKE_OVER_SQL = f"""
UPDATE idempotency_records r
SET state = 'in_progress', owner = v.owner, lease_until = v.lease_until, attempts = r.attempts + 1,
    updated_at = $6, expires_at = GREATEST(r.expires_at, v.expires_at)
FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::float8[])
    AS v(key, fingerprint, owner, lease_until, expires_at)
WHERE r.key = v.key AND r.fingerprint = v.fingerprint
  AND (r.state = 'released' OR (r.state = 'in_progress' AND r.lease_until <= $6))
RETURNING {_R_COLUMNS}
"""  # noqa: S608

# Claims re-entering our own live lease (an earlier claim's answer was lost): renew it, same attempt.
_REENTER_SQL = f"""
UPDATE idempotency_records r SET lease_until = v.lease_until, updated_at = $5
FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[]) AS v(key, fingerprint, owner, lease_until)
WHERE r.key = v.key AND r.fingerprint = v.fingerprint AND (r.state = 'in_progress') IS TRUE
  AND r.owner = v.owner AND r.lease_until > $5
RETURNING {_R_COLUMNS}
"""  # noqa: S608

# Owner transitions: a key missing from RETURNING was not IN_PROGRESS under that owner (LeaseLost).
# `(state = 'in_progress') IS TRUE` (state is NOT NULL: the same test) keeps the planner off the lease
# index, whose in-progress entries include every dead version since the last vacuum: the rows are found
# by key.
_COMPLETE_SQL = f"""
UPDATE idempotency_records r
SET state = v.state, outcome = v.outcome::jsonb, owner = NULL, lease_until = NULL, updated_at = $5
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS v(key, owner, state, outcome)
WHERE r.key = v.key AND (r.state = 'in_progress') IS TRUE AND r.owner = v.owner
RETURNING {_R_COLUMNS}
"""  # noqa: S608

_RELEASE_SQL = """
UPDATE idempotency_records r
SET state = 'released', owner = NULL, lease_until = NULL, last_error = v.error, updated_at = $4
FROM unnest($1::text[], $2::text[], $3::text[]) AS v(key, owner, error)
WHERE r.key = v.key AND (r.state = 'in_progress') IS TRUE AND r.owner = v.owner
RETURNING r.key
"""

_RENEW_SQL = """
UPDATE idempotency_records r SET lease_until = v.lease_until, updated_at = $4
FROM unnest($1::text[], $2::text[], $3::float8[]) AS v(key, owner, lease_until)
WHERE r.key = v.key AND (r.state = 'in_progress') IS TRUE AND r.owner = v.owner
RETURNING r.key
"""

_GET_SQL = f"SELECT {_COLUMNS} FROM idempotency_records WHERE key = $1"  # noqa: S608 - as above

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


class _Op:
    """One caller's queued transition; ``done`` resolves once its batch has finished (or failed)."""

    __slots__ = ("args", "done", "error", "finished", "key", "kind", "result")

    def __init__(self, kind: str, key: str, args: tuple[Any, ...], done: asyncio.Future[None]) -> None:
        self.kind = kind
        self.key = key
        self.args = args
        self.done = done
        self.finished = False  # the outcome is known (result or error): later failures do not touch it
        self.result: Any = None
        self.error: BaseException | None = None

    def set(self, result: Any) -> None:
        self.result, self.finished = result, True

    def lost(self) -> None:
        self.error = LeaseLost(f"record {self.key} is not in progress under this owner")
        self.finished = True


def _acquired(pending: list[tuple[_Op, Record]], rows: list[Any]) -> list[_Op]:
    """ACQUIRED for the claims whose key a write returned; the others (lost a race) are returned."""
    found = {row["key"]: row for row in rows}
    again = []
    for op, _ in pending:
        row = found.get(op.key)
        if row is None:
            again.append(op)
        else:
            op.set(Claim(ClaimStatus.ACQUIRED, record_from_row(row)))
    return again


def _owned(ops: list[_Op], rows: list[Any]) -> None:
    returned = {row["key"] for row in rows}
    for op in ops:
        if op.key in returned:
            op.set(None)
        else:
            op.lost()


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
        max_batch: int = 256,
        max_inflight: int | None = None,
    ) -> None:
        super().__init__(clock or time.time)
        self.url = url
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._pool: Any = None
        # The batched writer (event-loop side only): queued transitions, the keys of running batches,
        # the running batches (at most `max_inflight`, each on its own pooled connection).
        self.max_batch = max_batch
        self.max_inflight = max_inflight or min(max_size, 4)
        self._pending: collections.deque[_Op] = collections.deque()
        self._running_keys: set[str] = set()
        self._batches: set[asyncio.Task[None]] = set()
        self._kick_scheduled = False
        self.batches = 0
        self.ops = 0

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
        if self._pool is None:
            return
        # Queued and running transitions finish first (their callers are waiting for the answer).
        with anyio.CancelScope(shield=True):
            while self._batches or self._pending:
                if not self._batches:
                    self._kick()
                await asyncio.wait(set(self._batches))
        pool, self._pool = self._pool, None
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

    # -- the batched writer ----------------------------------------------------------------------------

    def _submit(self, kind: str, key: str, args: tuple[Any, ...]) -> Awaitable[Any]:
        if self._pool is None:
            raise StoreError("store is not open")
        loop = asyncio.get_running_loop()
        op = _Op(kind, key, args, loop.create_future())
        self._pending.append(op)
        if not self._kick_scheduled:
            # Not at once: every operation queued in this turn of the event loop joins the same batch.
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        return self._wait(op)

    async def _wait(self, op: _Op) -> Any:
        try:
            await op.done
        except asyncio.CancelledError:
            # As each call was shielded before batching: a cancelled caller still learns whether its
            # transition happened (its batch runs on regardless), so it can hand a claimed key back. The
            # batch resolves whichever future `op.done` is when it finishes; `finished` tells whether it
            # already has (both are only touched on the event loop's thread). The cancellation is
            # delivered again at the caller's next checkpoint (anyio's cancel scopes are level-triggered).
            if not op.finished:
                op.done = asyncio.get_running_loop().create_future()
                with anyio.CancelScope(shield=True):
                    await op.done
        if op.error is not None:
            raise op.error
        return op.result

    def _kick(self) -> None:
        """Start batches while batch slots are free and queued operations can run."""
        self._kick_scheduled = False
        while self._pending and len(self._batches) < self.max_inflight:
            ops = self._take()
            if not ops:
                return  # every queued operation waits for its key's running batch
            task = asyncio.get_running_loop().create_task(self._run_batch(ops))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _take(self) -> list[_Op]:
        """Up to ``max_batch`` queued operations of the oldest runnable one's kind, one per key: a key
        with an operation in a running batch (or already in this one) keeps its next one for a later
        batch, so each key's operations run one after the other, in order."""
        batch: list[_Op] = []
        keep: list[_Op] = []
        kind = None
        taken = self._running_keys
        waiting: set[str] = set()  # keys with an older operation left queued: later ones wait behind it
        for op in self._pending:
            key = op.key
            if (
                len(batch) < self.max_batch
                and key not in taken
                and key not in waiting
                and kind in (None, op.kind)
            ):
                kind = op.kind
                batch.append(op)
                taken.add(key)
            else:
                keep.append(op)
                waiting.add(key)
        self._pending = collections.deque(keep)
        return batch

    async def _run_batch(self, ops: list[_Op]) -> None:
        kind, pool = ops[0].kind, self._pool
        try:
            ops.sort(key=lambda op: op.key)  # rows locked in key order by every daemon: no deadlocks
            async with pool.acquire(timeout=self.connect_timeout) as conn:
                await _BATCH_HANDLERS[kind](self, conn, ops)
        except _DB_ERRORS as exc:
            message = redact(f"PostgreSQL {kind} failed: {type(exc).__name__}: {exc}", self.url)
            for op in ops:
                if not op.finished:
                    op.error = StoreError(message)  # one per caller: each raises (and chains) its own
                    op.error.__cause__ = exc
        except BaseException as exc:  # a bug, or the loop shutting down: callers must not wait forever
            log.exception("PostgreSQL store failed a %s batch", kind)
            for op in ops:
                if not op.finished:
                    op.error = StoreError(f"PostgreSQL {kind} failed: {type(exc).__name__}")
            if not isinstance(exc, Exception):
                raise
        finally:
            self.batches += 1
            self.ops += len(ops)
            for op in ops:
                self._running_keys.discard(op.key)
                op.finished = True
                if not op.done.done():
                    op.done.set_result(None)
            self._batches.discard(asyncio.current_task())
            self._kick()

    async def _claim_batch(self, conn: Any, ops: list[_Op]) -> None:
        """Claims: one insert-or-read statement, then one take-over and one re-enter statement for the
        keys that need them, all decided by :func:`~consumer.store.base.decide_claim`. A key that lost a
        race (its row changed, or was inserted by a concurrent claimant after the statement's snapshot)
        looks again in the next round, with the others that did."""
        seen: dict[int, Record] = {}
        todo = ops
        for _ in range(_CLAIM_ROUNDS):
            if not todo:
                return
            now = self.clock()
            # args: (message_id, operation, fingerprints, owner, lease_s, retention_s, reentrant)
            rows = await conn.fetch(
                _CLAIM_SQL,
                [op.key for op in todo],
                [op.args[0] for op in todo],
                [op.args[1] for op in todo],
                [op.args[2][0] for op in todo],
                [op.args[3] for op in todo],
                [now + op.args[4] for op in todo],
                [now + op.args[5] for op in todo],
                now,
            )
            found = {row["key"]: row for row in rows}
            again: list[_Op] = []
            take_over: list[tuple[_Op, Record]] = []
            reenter: list[tuple[_Op, Record]] = []
            for op in todo:
                row = found.get(op.key)
                if row is None:
                    again.append(op)  # inserted concurrently, not yet visible to this snapshot
                    continue
                record = record_from_row(row)
                seen[id(op)] = record
                if row["inserted"]:
                    op.set(Claim(ClaimStatus.ACQUIRED, record))
                    continue
                _, _, fingerprints, owner, _, _, reentrant = op.args
                decision = decide_claim(
                    record, fingerprints=fingerprints, owner=owner, now=now, reentrant=reentrant
                )
                if decision is Decision.TAKE_OVER:
                    take_over.append((op, record))
                elif decision is Decision.REENTER:
                    reenter.append((op, record))
                else:  # CONFLICT, DONE, BUSY: nothing to write
                    op.set(Claim(decision.status, record))
            if take_over:
                rows = await conn.fetch(
                    _TAKE_OVER_SQL,
                    [op.key for op, _ in take_over],
                    [record.fingerprint for _, record in take_over],
                    [op.args[3] for op, _ in take_over],
                    [now + op.args[4] for op, _ in take_over],
                    [now + op.args[5] for op, _ in take_over],
                    now,
                )
                again.extend(_acquired(take_over, rows))
            if reenter:
                rows = await conn.fetch(
                    _REENTER_SQL,
                    [op.key for op, _ in reenter],
                    [record.fingerprint for _, record in reenter],
                    [op.args[3] for op, _ in reenter],
                    [now + op.args[4] for op, _ in reenter],
                    now,
                )
                again.extend(_acquired(reenter, rows))  # changed since read (expired, taken over)
            todo = sorted(again, key=lambda op: op.key)
        for op in todo:  # still racing after every round: BUSY (the caller waits and retries)
            if (last := seen.get(id(op))) is not None:
                op.set(Claim(ClaimStatus.BUSY, last))
            else:
                op.error = StoreError(f"claim of {op.key} kept racing with concurrent writers")
                op.finished = True

    async def _complete_batch(self, conn: Any, ops: list[_Op]) -> None:
        # args: (owner, state, outcome JSON)
        rows = await conn.fetch(
            _COMPLETE_SQL,
            [op.key for op in ops],
            [op.args[0] for op in ops],
            [op.args[1] for op in ops],
            [op.args[2] for op in ops],
            self.clock(),
        )
        found = {row["key"]: row for row in rows}
        for op in ops:
            row = found.get(op.key)
            if row is None:
                op.lost()
            else:
                op.set(record_from_row(row))

    async def _release_batch(self, conn: Any, ops: list[_Op]) -> None:
        # args: (owner, error)
        rows = await conn.fetch(
            _RELEASE_SQL, [op.key for op in ops], [op.args[0] for op in ops], [op.args[1] for op in ops],
            self.clock(),
        )  # fmt: skip
        _owned(ops, rows)

    async def _renew_batch(self, conn: Any, ops: list[_Op]) -> None:
        # args: (owner, lease_s)
        now = self.clock()
        rows = await conn.fetch(
            _RENEW_SQL, [op.key for op in ops], [op.args[0] for op in ops],
            [now + op.args[1] for op in ops], now,
        )  # fmt: skip
        _owned(ops, rows)

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
        args = (message_id, operation, fingerprints, owner, lease_s, retention_s, reentrant)
        claim: Claim = await self._submit("claim", key, args)
        return claim

    async def _complete(self, key: str, owner: str, outcome: Outcome, *, failed: bool = False) -> Record:
        state = State.FAILED if failed else State.COMPLETED
        record: Record = await self._submit("complete", key, (owner, state.value, dump_outcome(outcome)))
        return record

    async def _release(self, key: str, owner: str, error: str) -> None:
        await self._submit("release", key, (owner, error[:200]))

    async def _renew(self, key: str, owner: str, lease_s: float) -> None:
        await self._submit("renew", key, (owner, lease_s))

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


_BATCH_HANDLERS: dict[str, Callable[[PostgresStore, Any, list[_Op]], Awaitable[None]]] = {
    "claim": PostgresStore._claim_batch,
    "complete": PostgresStore._complete_batch,
    "release": PostgresStore._release_batch,
    "renew": PostgresStore._renew_batch,
}
