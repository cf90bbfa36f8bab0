"""SQLite dedupe store (the embedded default): WAL, one writer, group commit.

All operations go through one queue to one connection, owned by one writer thread. The writer takes
whatever operations are waiting (up to ``max_batch``), runs them in a single ``BEGIN IMMEDIATE``
transaction (each in its own SAVEPOINT only if one of them fails unexpectedly), commits, and only then
wakes the callers (one hop to the event loop per batch, not per operation). So a caller that got an
answer knows its transition is durable (``synchronous=FULL`` by default), while the fsync cost is shared
by every operation in the batch: with 100 messages in flight that is one fsync for up to 100 transitions
instead of 100.

``BEGIN IMMEDIATE`` takes the write lock up front, so the read-then-CAS inside ``claim`` is atomic even if
another process shares the file.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio

from consumer.errors import LeaseLost, StoreError
from consumer.store import sqlitefile
from consumer.store.base import (
    COLUMN_LIST,
    CONFLICT_COLUMNS,
    CONFLICT_LIST,
    Claim,
    ClaimRequest,
    ClaimStatus,
    Clock,
    Decision,
    DedupeStore,
    Outcome,
    Record,
    State,
    dump_outcome,
    empty_counts,
    record_from_row,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_records (
    key          TEXT PRIMARY KEY,
    message_id   TEXT NOT NULL,
    operation    TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('in_progress', 'completed', 'failed', 'released')),
    owner        TEXT,
    lease_until  REAL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    outcome      TEXT,
    last_error   TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    expires_at   REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_records_expires ON idempotency_records (expires_at);
CREATE TABLE IF NOT EXISTS idempotency_conflicts (
    id                  INTEGER PRIMARY KEY,
    key                 TEXT NOT NULL,
    message_id          TEXT NOT NULL,
    fingerprint         TEXT NOT NULL,
    stored_fingerprint  TEXT NOT NULL,
    source              TEXT NOT NULL,
    seen_at             REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_conflicts_message ON idempotency_conflicts (message_id);
CREATE INDEX IF NOT EXISTS idempotency_conflicts_key ON idempotency_conflicts (key);
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
"""

# Statements built once (the column list is a constant, never input).
_SQL_FETCH = f"SELECT {COLUMN_LIST} FROM idempotency_records WHERE key = ?"  # noqa: S608
_SQL_INSERT = (
    f"INSERT INTO idempotency_records ({COLUMN_LIST}) "  # noqa: S608
    "VALUES (?, ?, ?, ?, 'in_progress', ?, ?, 1, NULL, NULL, ?, ?, ?) "
    "ON CONFLICT (key) DO NOTHING"
)
_SQL_TAKE_OVER = (
    "UPDATE idempotency_records SET state = 'in_progress', owner = ?, lease_until = ?, "
    "attempts = attempts + 1, updated_at = ?, expires_at = MAX(expires_at, ?) "
    "WHERE key = ? AND state = ? AND owner IS ? AND attempts = ?"
)
# A claim re-entering our own live lease (its first answer was lost): renew it, same attempt.
_SQL_REENTER = (
    "UPDATE idempotency_records SET lease_until = ?, updated_at = ? "
    "WHERE key = ? AND state = 'in_progress' AND owner = ?"
)
_SQL_COMPLETE = (
    "UPDATE idempotency_records SET state = ?, outcome = ?, owner = NULL, lease_until = NULL, "
    "updated_at = ? WHERE key = ? AND state = 'in_progress' AND owner = ?"
)
# A record this store claimed and has not completed or released yet is kept in memory (only by the writer
# thread), so ``complete`` knows the resulting row without reading it back. Bounded: past this many the
# cache is dropped and rows are read back instead.
_CLAIMED_CACHE_MAX = 100_000


class _Op(Generic[T]):
    __slots__ = ("done", "error", "finished", "fn", "result")

    def __init__(self, fn: Callable[[sqlite3.Connection], T], done: asyncio.Future[None]) -> None:
        self.fn = fn
        self.done = done  # resolved on the event loop once the batch holding this operation committed
        self.finished = False  # set on the event loop, with `done`, once the outcome is known
        self.result: T | None = None
        self.error: BaseException | None = None


def _wake(ops: list[_Op[Any]]) -> None:
    for op in ops:
        op.finished = True
        if not op.done.done():  # cancelled: its caller is about to wait on a fresh future, or has left
            op.done.set_result(None)


def _next_batch(ops_queue: queue.SimpleQueue[_Op[Any] | None], max_batch: int) -> tuple[list[_Op[Any]], bool]:
    """Whatever is queued (waiting for the first), up to ``max_batch``; True once the sentinel was met."""
    first = ops_queue.get()
    if first is None:
        return [], True
    ops: list[_Op[Any]] = [first]
    while len(ops) < max_batch:
        try:
            nxt = ops_queue.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            return ops, True
        ops.append(nxt)
    return ops, False


def _run_fast(conn: sqlite3.Connection, ops: list[_Op[Any]]) -> bool:
    """Every operation writes with at most one statement, and raises :class:`LeaseLost` only when that
    statement changed nothing, so no per-operation SAVEPOINT is needed. Any other exception means an
    operation may have stopped half-way: returns False and the batch is re-run isolated."""
    for op in ops:
        try:
            op.result = op.fn(conn)
            op.error = None
        except LeaseLost as exc:
            op.result, op.error = None, exc
        except Exception:  # noqa: BLE001 - re-run below, each operation in its own SAVEPOINT
            return False
    return True


def _run_isolated(conn: sqlite3.Connection, ops: list[_Op[Any]]) -> None:
    for op in ops:
        conn.execute("SAVEPOINT op")
        try:
            op.result, op.error = op.fn(conn), None
        except Exception as exc:  # noqa: BLE001 - handed to the waiting caller, not swallowed
            conn.execute("ROLLBACK TO SAVEPOINT op")
            op.result, op.error = None, exc
        conn.execute("RELEASE SAVEPOINT op")


class SqliteStore(DedupeStore):
    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        max_batch: int = 512,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(clock or time.time)
        self.path = str(path)
        self.synchronous = sqlitefile.synchronous_mode(synchronous)
        self.max_batch = max_batch
        self._conn: sqlite3.Connection | None = None
        self._queue: queue.SimpleQueue[_Op[Any] | None] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._claimed: dict[str, Record] = {}  # writer thread only; see _CLAIMED_CACHE_MAX
        self.batches = 0
        self.ops = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlitefile.connect(self.path, self.synchronous, _SCHEMA)
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"store schema version {row[0]} is newer than this build ({SCHEMA_VERSION})")
        return conn

    async def open(self) -> None:
        self._conn = await sqlitefile.open_connection(self._connect, f"SQLite store at {self.path}")
        self._loop = asyncio.get_running_loop()
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._writer, args=(self._queue, self._loop), name="idv-sqlite-writer", daemon=True
        )
        self._thread.start()

    async def close(self) -> None:
        if self._queue is not None:
            # Operations already queued run first: the writer stops at the sentinel, in FIFO order.
            self._queue.put(None)
            self._queue = None
        if self._thread is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._thread.join)
            self._thread = None
        conn, self._conn = self._conn, None
        await sqlitefile.close_connection(conn)

    # -- the writer ------------------------------------------------------------------------------------

    def _run_batch(self, ops: list[_Op[Any]]) -> None:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            if not _run_fast(conn, ops):
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                _run_isolated(conn, ops)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            err = StoreError(f"SQLite transaction failed: {exc}")
            for op in ops:
                op.result = None
                op.error = err

    def _writer(self, ops_queue: queue.SimpleQueue[_Op[Any] | None], loop: asyncio.AbstractEventLoop) -> None:
        """The writer thread: group commit of whatever is queued, then one wake-up call for the batch."""
        stop = False
        while not stop:
            ops, stop = _next_batch(ops_queue, self.max_batch)
            if not ops:
                return
            try:
                self._run_batch(ops)
            except BaseException as exc:  # the thread must outlive a bug: callers wait
                log.exception("SQLite writer failed a batch")
                for op in ops:
                    op.error = StoreError(f"SQLite writer failed: {type(exc).__name__}")
            self.batches += 1
            self.ops += len(ops)
            try:
                # One wake-up per batch, without waiting for the loop to run it (anyio.from_thread.run_sync
                # waits, and holding the writer back costs a third of the transitions per second).
                loop.call_soon_threadsafe(_wake, ops)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                return

    async def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        ops_queue, loop = self._queue, self._loop
        if ops_queue is None or loop is None:
            raise StoreError("store is not open")
        op: _Op[T] = _Op(fn, loop.create_future())
        ops_queue.put(op)
        try:
            await op.done
        except asyncio.CancelledError:
            # A cancelled caller must not leave before its transition is known to be durable or not. The
            # cancellation may have come before the batch finished (it then cancelled op.done too) or just
            # after (op.done resolved, this task not yet resumed). `finished` tells which; it and op.done
            # are only touched on this thread, so nothing can happen between the check and the swap.
            if not op.finished:
                op.done = loop.create_future()
                with anyio.CancelScope(shield=True):
                    await op.done
            raise
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[return-value]

    # -- operations ------------------------------------------------------------------------------------

    def _remember(self, record: Record) -> Record:
        if len(self._claimed) >= _CLAIMED_CACHE_MAX:
            self._claimed.clear()
        self._claimed[record.key] = record
        return record

    async def _claim(self, *, request: ClaimRequest) -> Claim:
        key, owner, fingerprint = request.key, request.owner, request.fingerprints[0]
        message_id, operation = request.message_id, request.operation

        def fn(conn: sqlite3.Connection) -> Claim:
            now = self.clock()
            lease_until, expires_at = now + request.lease_s, now + request.retention_s
            cur = conn.execute(
                _SQL_INSERT,
                (key, message_id, operation, fingerprint, owner, lease_until, now, now, expires_at),
            )
            if cur.rowcount == 1:
                # Exactly the row just inserted; no need to read it back.
                record = Record(
                    key, message_id, operation, fingerprint, State.IN_PROGRESS, owner, lease_until, 1,
                    None, None, now, now, expires_at,
                )  # fmt: skip
                return Claim(ClaimStatus.ACQUIRED, self._remember(record))
            row = _fetch(conn, key)
            decision = request.decide(row, now)
            if decision is Decision.REENTER:
                # Our own live lease that no caller holds: an earlier claim whose answer was lost.
                cur = conn.execute(_SQL_REENTER, (lease_until, now, key, owner))
                if cur.rowcount == 1:
                    return Claim(ClaimStatus.ACQUIRED, self._remember(_fetch(conn, key)))
                return Claim(ClaimStatus.BUSY, row)
            if decision is not Decision.TAKE_OVER:  # CONFLICT, DONE or BUSY: nothing to write
                return Claim(decision.status, row)
            # RELEASED, or IN_PROGRESS whose lease has run out: take it over, conditioned on what we read.
            cur = conn.execute(
                _SQL_TAKE_OVER,
                (owner, lease_until, now, expires_at, key, row.state.value, row.owner, row.attempts),
            )
            if cur.rowcount != 1:  # pragma: no cover - impossible under BEGIN IMMEDIATE, kept as a guard
                return Claim(ClaimStatus.BUSY, _fetch(conn, key))
            return Claim(ClaimStatus.ACQUIRED, self._remember(_fetch(conn, key)))

        return await self._submit(fn)

    async def _complete(self, key: str, owner: str, outcome: Outcome, *, failed: bool = False) -> Record:
        state = State.FAILED if failed else State.COMPLETED
        payload = dump_outcome(outcome)

        def fn(conn: sqlite3.Connection) -> Record:
            now = self.clock()
            cur = conn.execute(_SQL_COMPLETE, (state.value, payload, now, key, owner))
            claimed = self._claimed.pop(key, None)
            if cur.rowcount != 1:
                raise LeaseLost(f"record {key} is not in progress under this owner")
            if claimed is not None and claimed.owner == owner:
                # The CAS matched our in-progress row, which only this owner changed since the claim
                # (renew moves lease_until, overwritten here): the new row is the claim plus these columns.
                c = claimed
                return Record(
                    key, c.message_id, c.operation, c.fingerprint, state, None, None, c.attempts, outcome,
                    c.last_error, c.created_at, now, c.expires_at,
                )  # fmt: skip
            return _fetch(conn, key)

        return await self._submit(fn)

    async def _release(self, key: str, owner: str, error: str) -> None:
        def fn(conn: sqlite3.Connection) -> None:
            self._claimed.pop(key, None)
            cur = conn.execute(
                "UPDATE idempotency_records SET state = 'released', owner = NULL, lease_until = NULL, "
                "last_error = ?, updated_at = ? WHERE key = ? AND state = 'in_progress' AND owner = ?",
                (error[:200], self.clock(), key, owner),
            )
            if cur.rowcount != 1:
                raise LeaseLost(f"record {key} is not in progress under this owner")

        await self._submit(fn)

    async def _renew(self, key: str, owner: str, lease_s: float) -> None:
        def fn(conn: sqlite3.Connection) -> None:
            now = self.clock()
            cur = conn.execute(
                "UPDATE idempotency_records SET lease_until = ?, updated_at = ? "
                "WHERE key = ? AND state = 'in_progress' AND owner = ?",
                (now + lease_s, now, key, owner),
            )
            if cur.rowcount != 1:
                raise LeaseLost(f"record {key} is not in progress under this owner")

        await self._submit(fn)

    async def record_conflict(
        self, *, key: str, message_id: str, fingerprint: str, stored_fingerprint: str, source: str
    ) -> None:
        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO idempotency_conflicts "
                "(key, message_id, fingerprint, stored_fingerprint, source, "
                "seen_at) VALUES (?, ?, ?, ?, ?, ?)",
                (key, message_id, fingerprint, stored_fingerprint, source, self.clock()),
            )

        await self._submit(fn)

    async def get(self, key: str) -> Record | None:
        def fn(conn: sqlite3.Connection) -> Record | None:
            row = conn.execute(_SQL_FETCH, (key,)).fetchone()
            return record_from_row(row) if row else None

        return await self._submit(fn)

    async def conflicts(self, message_id: str | None = None) -> list[dict[str, Any]]:
        def fn(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = f"SELECT {CONFLICT_LIST} FROM idempotency_conflicts"  # noqa: S608 - constant columns
            args: tuple[Any, ...] = ()
            if message_id is not None:
                sql += " WHERE message_id = ?"
                args = (message_id,)
            rows = conn.execute(sql + " ORDER BY id", args)
            return [dict(zip(CONFLICT_COLUMNS, row, strict=True)) for row in rows]

        return await self._submit(fn)

    async def counts(self) -> dict[str, int]:
        def fn(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT state, COUNT(*) FROM idempotency_records GROUP BY state")
            return empty_counts() | dict(rows.fetchall())

        return await self._submit(fn)

    async def purge_expired(self) -> int:
        def fn(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM idempotency_records WHERE expires_at < ? AND state != 'in_progress'",
                (self.clock(),),
            )
            # The conflict log goes with its record (it names the record's key and fingerprint).
            conn.execute(
                "DELETE FROM idempotency_conflicts WHERE NOT EXISTS "
                "(SELECT 1 FROM idempotency_records r WHERE r.key = idempotency_conflicts.key)"
            )
            return cur.rowcount

        return await self._submit(fn)


def _fetch(conn: sqlite3.Connection, key: str) -> Record:
    row = conn.execute(_SQL_FETCH, (key,)).fetchone()
    if row is None:
        raise StoreError(f"record {key} vanished inside a transaction")
    return record_from_row(row)
