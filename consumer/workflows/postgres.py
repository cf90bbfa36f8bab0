"""PostgreSQL backend of the workflow store (asyncpg): the same SQL, numbered placeholders.

:meth:`write` runs in one transaction at READ COMMITTED: the event upsert's ``WHERE effect IS NULL``
and the row's ``WHERE version = ?`` are re-checked against a concurrent writer's committed row, so of
two racing writers exactly one succeeds; the loser's transaction is rolled back whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import asyncpg

from consumer.errors import StoreError
from consumer.store import redact
from consumer.workflows import store as s
from consumer.workflows.model import Event, Workflow
from consumer.workflows.rules import Change, Result

__all__ = ["PostgresWorkflowStore"]

T = TypeVar("T")

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def _numbered(sql: str) -> str:
    counter = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


_SCHEMA = s.SCHEMA.replace(" BLOB ", " bytea ").replace(" REAL", " double precision")
_SQL = {name: _numbered(getattr(s, name)) for name in dir(s) if name.startswith("SQL_")}


class _Abort(Exception):
    def __init__(self, status: s.WriteStatus) -> None:
        self.status = status


def _count(tag: str) -> int:
    return int(tag.rsplit(" ", 1)[-1])


class PostgresWorkflowStore(s.WorkflowStore):
    def __init__(self, url: str, *, max_size: int = 8, clock: Callable[[], float] | None = None) -> None:
        super().__init__(*(() if clock is None else (clock,)))
        self.url = url
        self.max_size = max_size
        self._pool: Any = None

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.max_size,
                command_timeout=30,
                server_settings={"default_transaction_isolation": "read committed"},
            )
            async with self._pool.acquire() as conn:
                # Only when missing: CREATE INDEX IF NOT EXISTS still locks its table (SHARE), which would
                # wait on (and deadlock with) running transitions of another daemon or a tool.
                if await conn.fetchval("SELECT to_regclass('idv_workflow_results_source')") is None:
                    async with conn.transaction():
                        await conn.execute(
                            "SELECT pg_advisory_xact_lock($1)", int.from_bytes(b"idv-wflw", "big")
                        )
                        await conn.execute(_SCHEMA)
        except (*_DB_ERRORS, ValueError) as exc:
            raise StoreError(redact(f"cannot open the PostgreSQL workflow store: {exc}", self.url)) from None

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with anyio.CancelScope(shield=True):
                await pool.close()

    async def _run(self, fn: Callable[[Any], Any], *, write: bool = False) -> Any:
        if self._pool is None:
            raise StoreError("workflow store is not open")
        try:
            with anyio.CancelScope(shield=True):
                async with self._pool.acquire() as conn:
                    if not write:
                        return await fn(conn)
                    async with conn.transaction():
                        return await fn(conn)
        except _DB_ERRORS as exc:
            raise StoreError(
                redact(f"PostgreSQL workflow store: {type(exc).__name__}: {exc}", self.url)
            ) from exc

    async def create(self, wf: Workflow) -> Workflow:
        async def fn(conn: Any) -> Workflow:
            await conn.execute(_SQL["SQL_INSERT"], *s.workflow_values(wf))
            return s.row_to_workflow(await conn.fetchrow(_SQL["SQL_GET"], wf.message_id))

        result: Workflow = await self._run(fn, write=True)
        return result

    async def get(self, message_id: str) -> Workflow | None:
        return await self._one("SQL_GET", message_id)

    async def by_session(self, session_id: str) -> Workflow | None:
        return await self._one("SQL_BY_SESSION", session_id)

    async def _one(self, query: str, arg: str) -> Workflow | None:
        """The workflow row ``query`` finds for ``arg``, or None."""

        async def fn(conn: Any) -> Workflow | None:
            row = await conn.fetchrow(_SQL[query], arg)
            return s.row_to_workflow(row) if row else None

        result: Workflow | None = await self._run(fn)
        return result

    async def _write(
        self, old: Workflow, change: Change | None, event: Event | None, source: str
    ) -> s.WriteStatus:
        async def fn(conn: Any) -> s.WriteStatus:
            now = self.clock()
            if event is not None:
                effect = change.effect if change is not None else "ignored"
                args = [*s.event_args(event, source, now), old.message_id, effect]
                if _count(await conn.execute(_SQL["SQL_EVENT_APPLY"], *args)) != 1:
                    raise _Abort(s.WriteStatus.DUPLICATE)
            if change is None:
                tag = await conn.execute(_SQL["SQL_TOUCH"], old.message_id, old.version)
            else:
                tag = await conn.execute(_SQL["SQL_CAS"], *s.cas_args(old, change.new))
            if _count(tag) != 1:
                raise _Abort(s.WriteStatus.STALE)
            for result in change.results if change is not None else ():
                await conn.execute(_SQL["SQL_RESULT_INSERT"], *s.result_args(result, now))
            return s.WriteStatus.OK

        try:
            status: s.WriteStatus = await self._run(fn, write=True)
        except _Abort as abort:  # the transaction was rolled back
            return abort.status
        return status

    async def add_pending(self, event: Event, source: str) -> bool:
        async def fn(conn: Any) -> bool:
            tag = await conn.execute(_SQL["SQL_EVENT_PENDING"], *s.event_args(event, source, self.clock()))
            return _count(tag) == 1

        result: bool = await self._run(fn)
        return result

    async def pending(self, session_id: str) -> list[Event]:
        async def fn(conn: Any) -> list[Event]:
            return [Event(*row.values()) for row in await conn.fetch(_SQL["SQL_PENDING"], session_id)]

        result: list[Event] = await self._run(fn)
        return result

    async def _results(self, sql: str, arg: str) -> list[Result]:
        async def fn(conn: Any) -> list[Result]:
            return [Result(r[0], r[1], r[2], bytes(r[3]), bytes(r[4])) for r in await conn.fetch(sql, arg)]

        result: list[Result] = await self._run(fn)
        return result

    async def results_at(self, source: str) -> list[Result]:
        return await self._results(_SQL["SQL_RESULTS_AT"], source)

    async def results_of(self, message_id: str) -> list[Result]:
        return await self._results(_SQL["SQL_RESULTS_OF"], message_id)

    async def events(self, message_id: str, session_id: str | None) -> list[dict[str, Any]]:
        async def fn(conn: Any) -> list[dict[str, Any]]:
            return [
                dict(r.items()) for r in await conn.fetch(_SQL["SQL_EVENTS"], message_id, session_id or "")
            ]

        result: list[dict[str, Any]] = await self._run(fn)
        return result

    async def due(self, now: float, limit: int) -> list[Workflow]:
        async def fn(conn: Any) -> list[Workflow]:
            return [s.row_to_workflow(r) for r in await conn.fetch(_SQL["SQL_DUE"], now, limit)]

        result: list[Workflow] = await self._run(fn)
        return result

    async def stalled(self, before: float, limit: int) -> list[Workflow]:
        async def fn(conn: Any) -> list[Workflow]:
            return [s.row_to_workflow(r) for r in await conn.fetch(_SQL["SQL_STALLED"], before, limit)]

        result: list[Workflow] = await self._run(fn)
        return result

    async def purge(self, before: float) -> int:
        async def fn(conn: Any) -> int:
            await conn.execute(_SQL["SQL_PURGE_RESULTS"], before)
            await conn.execute(_SQL["SQL_PURGE_EVENTS"], before, before)
            return _count(await conn.execute(_SQL["SQL_PURGE_WORKFLOWS"], before))

        result: int = await self._run(fn, write=True)
        return result

    async def counts(self) -> dict[str, int]:
        async def fn(conn: Any) -> dict[str, int]:
            return {r[0]: r[1] for r in await conn.fetch(_SQL["SQL_COUNTS"])}

        result: dict[str, int] = await self._run(fn)
        return result
