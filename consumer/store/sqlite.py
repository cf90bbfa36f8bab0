"""SQLite dedupe store (the embedded default): WAL, one writer, group commit.

All operations go through one queue to one connection. The writer takes whatever operations are waiting
(up to ``max_batch``), runs each inside its own SAVEPOINT within a single ``BEGIN IMMEDIATE`` transaction,
commits, and only then wakes the callers. So a caller that got an answer knows its transition is durable
(``synchronous=FULL`` by default), while the fsync cost is shared by every operation in the batch: with
100 messages in flight that is one fsync for up to 100 transitions instead of 100.

``BEGIN IMMEDIATE`` takes the write lock up front, so the read-then-CAS inside ``claim`` is atomic even if
another process shares the file.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from consumer.errors import LeaseLost, StoreError
from consumer.store.base import Claim, ClaimStatus, Clock, DedupeStore, Outcome, Record, State

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
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
"""

_COLUMNS = (
    "key, message_id, operation, fingerprint, state, owner, lease_until, attempts, outcome, "
    "last_error, created_at, updated_at, expires_at"
)


def _row_to_record(row: tuple[Any, ...]) -> Record:
    outcome = Outcome.from_json(orjson.loads(row[8])) if row[8] else None
    return Record(
        key=row[0],
        message_id=row[1],
        operation=row[2],
        fingerprint=row[3],
        state=State(row[4]),
        owner=row[5],
        lease_until=row[6],
        attempts=row[7],
        outcome=outcome,
        last_error=row[9],
        created_at=row[10],
        updated_at=row[11],
        expires_at=row[12],
    )


class _Op(Generic[T]):
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[sqlite3.Connection], T]) -> None:
        self.fn = fn
        self.done = anyio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


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
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"invalid SQLite synchronous mode {synchronous!r}")
        self.path = str(path)
        self.synchronous = synchronous.upper()
        self.max_batch = max_batch
        self._conn: sqlite3.Connection | None = None
        self._send: MemoryObjectSendStream[_Op[Any]] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.batches = 0
        self.ops = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"store schema version {row[0]} is newer than this build ({SCHEMA_VERSION})")
        return conn

    async def open(self) -> None:
        try:
            self._conn = await anyio.to_thread.run_sync(self._connect)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open SQLite store at {self.path}: {exc}") from exc
        send, receive = anyio.create_memory_object_stream[_Op[Any]](math.inf)
        self._send = send
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._writer, receive)

    async def close(self) -> None:
        if self._send is not None:
            await self._send.aclose()
            self._send = None
        if self._tg is not None:
            await self._tg.__aexit__(None, None, None)
            self._tg = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await anyio.to_thread.run_sync(conn.close)

    # -- the writer ------------------------------------------------------------------------------------

    def _run_batch(self, ops: list[_Op[Any]]) -> None:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in ops:
                conn.execute("SAVEPOINT op")
                try:
                    op.result = op.fn(conn)
                except Exception as exc:  # noqa: BLE001 - handed to the waiting caller, not swallowed
                    conn.execute("ROLLBACK TO SAVEPOINT op")
                    op.error = exc
                conn.execute("RELEASE SAVEPOINT op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            err = StoreError(f"SQLite transaction failed: {exc}")
            for op in ops:
                op.result = None
                op.error = err

    async def _writer(self, receive: MemoryObjectReceiveStream[_Op[Any]]) -> None:
        async with receive:
            async for first in receive:
                ops: list[_Op[Any]] = [first]
                while len(ops) < self.max_batch:
                    try:
                        ops.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                # Shielded: once a batch is handed to the thread its callers must hear the result.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._run_batch, ops)
                self.batches += 1
                self.ops += len(ops)
                for op in ops:
                    op.done.set()

    async def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._send is None:
            raise StoreError("store is not open")
        op: _Op[T] = _Op(fn)
        await self._send.send(op)
        with anyio.CancelScope(shield=True):
            # A cancelled caller must not leave before its transition is known to be durable or not.
            await op.done.wait()
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[return-value]

    # -- operations ------------------------------------------------------------------------------------

    async def claim(
        self,
        *,
        key: str,
        message_id: str,
        operation: str,
        fingerprint: str,
        owner: str,
        lease_s: float,
        retention_s: float,
    ) -> Claim:
        def fn(conn: sqlite3.Connection) -> Claim:
            now = self.clock()
            cur = conn.execute(
                f"INSERT INTO idempotency_records ({_COLUMNS}) "  # noqa: S608 - constant column list
                "VALUES (?, ?, ?, ?, 'in_progress', ?, ?, 1, NULL, NULL, ?, ?, ?) "
                "ON CONFLICT (key) DO NOTHING",
                (key, message_id, operation, fingerprint, owner, now + lease_s, now, now, now + retention_s),
            )
            if cur.rowcount == 1:
                return Claim(ClaimStatus.ACQUIRED, _fetch(conn, key))
            row = _fetch(conn, key)
            if row.fingerprint != fingerprint:
                return Claim(ClaimStatus.CONFLICT, row)
            if row.state in (State.COMPLETED, State.FAILED):
                return Claim(ClaimStatus.DONE, row)
            if row.state == State.IN_PROGRESS and (row.lease_until or 0.0) > now:
                return Claim(ClaimStatus.BUSY, row)
            # RELEASED, or IN_PROGRESS whose lease has run out: take it over, conditioned on what we read.
            cur = conn.execute(
                "UPDATE idempotency_records SET state = 'in_progress', owner = ?, lease_until = ?, "
                "attempts = attempts + 1, updated_at = ?, expires_at = MAX(expires_at, ?) "
                "WHERE key = ? AND state = ? AND owner IS ? AND attempts = ?",
                (owner, now + lease_s, now, now + retention_s, key, row.state.value, row.owner, row.attempts),
            )
            if cur.rowcount != 1:  # pragma: no cover - impossible under BEGIN IMMEDIATE, kept as a guard
                return Claim(ClaimStatus.BUSY, _fetch(conn, key))
            return Claim(ClaimStatus.ACQUIRED, _fetch(conn, key))

        return await self._submit(fn)

    async def complete(self, key: str, owner: str, outcome: Outcome, *, failed: bool = False) -> Record:
        state = State.FAILED if failed else State.COMPLETED
        payload = orjson.dumps(outcome.to_json()).decode()

        def fn(conn: sqlite3.Connection) -> Record:
            cur = conn.execute(
                "UPDATE idempotency_records SET state = ?, outcome = ?, owner = NULL, lease_until = NULL, "
                "updated_at = ? WHERE key = ? AND state = 'in_progress' AND owner = ?",
                (state.value, payload, self.clock(), key, owner),
            )
            if cur.rowcount != 1:
                raise LeaseLost(f"record {key} is not in progress under this owner")
            return _fetch(conn, key)

        return await self._submit(fn)

    async def release(self, key: str, owner: str, error: str) -> None:
        def fn(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE idempotency_records SET state = 'released', owner = NULL, lease_until = NULL, "
                "last_error = ?, updated_at = ? WHERE key = ? AND state = 'in_progress' AND owner = ?",
                (error[:200], self.clock(), key, owner),
            )
            if cur.rowcount != 1:
                raise LeaseLost(f"record {key} is not in progress under this owner")

        await self._submit(fn)

    async def renew(self, key: str, owner: str, lease_s: float) -> None:
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
            sql = f"SELECT {_COLUMNS} FROM idempotency_records WHERE key = ?"  # noqa: S608 - constant columns
            row = conn.execute(sql, (key,)).fetchone()
            return _row_to_record(row) if row else None

        return await self._submit(fn)

    async def conflicts(self, message_id: str | None = None) -> list[dict[str, Any]]:
        def fn(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = (
                "SELECT key, message_id, fingerprint, stored_fingerprint, source, seen_at "
                "FROM idempotency_conflicts"
            )
            args: tuple[Any, ...] = ()
            if message_id is not None:
                sql += " WHERE message_id = ?"
                args = (message_id,)
            names = ("key", "message_id", "fingerprint", "stored_fingerprint", "source", "seen_at")
            return [dict(zip(names, row, strict=True)) for row in conn.execute(sql + " ORDER BY id", args)]

        return await self._submit(fn)

    async def counts(self) -> dict[str, int]:
        def fn(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT state, COUNT(*) FROM idempotency_records GROUP BY state")
            return {state.value: 0 for state in State} | dict(rows.fetchall())

        return await self._submit(fn)

    async def purge_expired(self) -> int:
        def fn(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM idempotency_records WHERE expires_at < ? AND state != 'in_progress'",
                (self.clock(),),
            )
            return cur.rowcount

        return await self._submit(fn)


def _fetch(conn: sqlite3.Connection, key: str) -> Record:
    sql = f"SELECT {_COLUMNS} FROM idempotency_records WHERE key = ?"  # noqa: S608 - constant columns
    row = conn.execute(sql, (key,)).fetchone()
    if row is None:
        raise StoreError(f"record {key} vanished inside a transaction")
    return _row_to_record(row)
