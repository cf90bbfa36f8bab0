"""SQLite backend of the workflow store: one connection, one thread at a time, ``BEGIN IMMEDIATE``.

The connection is separate from the dedupe store's writer (same file, WAL): ``BEGIN IMMEDIATE`` takes
the write lock up front, so the event upsert, the compare-and-set and the outbox insert of one
:meth:`write` are one atomic transaction; ``busy_timeout`` waits for the other writer.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from consumer.errors import StoreError
from consumer.store import sqlitefile
from consumer.workflows import store as s
from consumer.workflows.model import Event, Workflow
from consumer.workflows.rules import Change, Result

__all__ = ["SqliteWorkflowStore"]

T = TypeVar("T")


class SqliteWorkflowStore(s.WorkflowStore):
    def __init__(self, path: str, *, synchronous: str = "FULL", clock: Callable[[], float] | None = None):
        super().__init__(*(() if clock is None else (clock,)))
        self.path = path
        self.synchronous = sqlitefile.synchronous_mode(synchronous)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        self._conn = await sqlitefile.open_connection(
            lambda: sqlitefile.connect(self.path, self.synchronous, s.SCHEMA),
            f"the SQLite workflow store at {self.path}",
        )

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        await sqlitefile.close_connection(conn)

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
        conn = self._conn
        if conn is None:
            raise StoreError("workflow store is not open")

        def run() -> T:
            with self._lock:
                if not write:
                    return fn(conn)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result

        try:
            # Shielded: a cancelled caller still learns whether its transition happened.
            with anyio.CancelScope(shield=True):
                result: T = await anyio.to_thread.run_sync(run)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite workflow store: {exc}") from exc
        return result

    async def create(self, wf: Workflow) -> Workflow:
        def fn(conn: sqlite3.Connection) -> Workflow:
            conn.execute(s.SQL_INSERT, s.workflow_values(wf))
            return s.row_to_workflow(conn.execute(s.SQL_GET, (wf.message_id,)).fetchone())

        return await self._run(fn, write=True)

    async def get(self, message_id: str) -> Workflow | None:
        return await self._one(s.SQL_GET, message_id)

    async def by_session(self, session_id: str) -> Workflow | None:
        return await self._one(s.SQL_BY_SESSION, session_id)

    async def _one(self, query: str, arg: str) -> Workflow | None:
        """The workflow row ``query`` finds for ``arg``, or None."""

        def fn(conn: sqlite3.Connection) -> Workflow | None:
            row = conn.execute(query, (arg,)).fetchone()
            return s.row_to_workflow(row) if row else None

        return await self._run(fn)

    async def _write(
        self, old: Workflow, change: Change | None, event: Event | None, source: str
    ) -> s.WriteStatus:
        class _Abort(Exception):
            def __init__(self, status: s.WriteStatus) -> None:
                self.status = status

        def fn(conn: sqlite3.Connection) -> s.WriteStatus:
            now = self.clock()
            if event is not None:
                effect = change.effect if change is not None else "ignored"
                args = [*s.event_args(event, source, now), old.message_id, effect]
                if conn.execute(s.SQL_EVENT_APPLY, args).rowcount != 1:
                    raise _Abort(s.WriteStatus.DUPLICATE)
            if change is None:
                cur = conn.execute(s.SQL_TOUCH, (old.message_id, old.version))
            else:
                cur = conn.execute(s.SQL_CAS, s.cas_args(old, change.new))
            if cur.rowcount != 1:
                raise _Abort(s.WriteStatus.STALE)
            for result in change.results if change is not None else ():
                conn.execute(s.SQL_RESULT_INSERT, s.result_args(result, now))
            return s.WriteStatus.OK

        try:
            return await self._run(fn, write=True)
        except _Abort as abort:  # rolled back
            return abort.status

    async def add_pending(self, event: Event, source: str) -> bool:
        def fn(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(s.SQL_EVENT_PENDING, s.event_args(event, source, self.clock()))
            return cur.rowcount == 1

        return await self._run(fn, write=True)

    async def pending(self, session_id: str) -> list[Event]:
        def fn(conn: sqlite3.Connection) -> list[Event]:
            return [Event(*row) for row in conn.execute(s.SQL_PENDING, (session_id,))]

        return await self._run(fn)

    async def results_at(self, source: str) -> list[Result]:
        def fn(conn: sqlite3.Connection) -> list[Result]:
            return [Result(*row) for row in conn.execute(s.SQL_RESULTS_AT, (source,))]

        return await self._run(fn)

    async def results_of(self, message_id: str) -> list[Result]:
        def fn(conn: sqlite3.Connection) -> list[Result]:
            return [Result(*row) for row in conn.execute(s.SQL_RESULTS_OF, (message_id,))]

        return await self._run(fn)

    async def events(self, message_id: str, session_id: str | None) -> list[dict[str, Any]]:
        names = ("session_id", "event_id", "webhook_type", "status", "provider_ts", "source",
                 "received_at", "message_id", "effect")  # fmt: skip

        def fn(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(s.SQL_EVENTS, (message_id, session_id or ""))
            return [dict(zip(names, row, strict=True)) for row in rows]

        return await self._run(fn)

    async def due(self, now: float, limit: int) -> list[Workflow]:
        def fn(conn: sqlite3.Connection) -> list[Workflow]:
            return [s.row_to_workflow(row) for row in conn.execute(s.SQL_DUE, (now, limit))]

        return await self._run(fn)

    async def stalled(self, before: float, limit: int) -> list[Workflow]:
        def fn(conn: sqlite3.Connection) -> list[Workflow]:
            return [s.row_to_workflow(row) for row in conn.execute(s.SQL_STALLED, (before, limit))]

        return await self._run(fn)

    async def purge(self, before: float) -> int:
        def fn(conn: sqlite3.Connection) -> int:
            conn.execute(s.SQL_PURGE_RESULTS, (before,))
            conn.execute(s.SQL_PURGE_EVENTS, (before, before))
            return conn.execute(s.SQL_PURGE_WORKFLOWS, (before,)).rowcount

        return await self._run(fn, write=True)

    async def counts(self) -> dict[str, int]:
        def fn(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(conn.execute(s.SQL_COUNTS).fetchall())

        return await self._run(fn)
