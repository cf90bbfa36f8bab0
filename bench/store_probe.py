"""Reading a variant's dedupe store from outside while it runs, on SQLite or PostgreSQL (one async API).

The benchmark measures every variant by what it recorded: records with an outcome, the first claim and the
last outcome (``created_at`` / ``updated_at``), and the keys recorded. :class:`SqliteProbe` reads the WAL
file a variant writes (readers never block its writer); :class:`PgProbe` reads the variant's own schema of
the shared PostgreSQL, which :func:`throwaway_schema` creates and drops.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from bench.common import StoreProbe

_DONE = "state IN ('completed', 'failed')"


class Probe(Protocol):
    async def progress(self) -> tuple[int, float | None, float | None]: ...
    async def mean_in_flight(self) -> float: ...
    async def outcome_times(self, message_ids: Sequence[str]) -> dict[str, tuple[float, float]]: ...
    async def recorded_keys(self) -> set[str]: ...
    async def close(self) -> None: ...


def with_search_path(url: str, schema: str) -> str:
    """``url`` whose connections work in ``schema`` (asyncpg passes the query on as a server setting)."""
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


@contextlib.asynccontextmanager
async def throwaway_schema(url: str, prefix: str = "idv_bench_") -> AsyncIterator[str]:
    """A fresh schema of the shared database for one run, dropped afterwards; yields the store URL."""
    import asyncpg

    schema = prefix + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(url)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(url, schema)
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


class SqliteProbe:
    """:class:`bench.common.StoreProbe` (synchronous, cheap local reads) behind the async API."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sync = StoreProbe(path)

    async def progress(self) -> tuple[int, float | None, float | None]:
        return self._sync.progress()

    async def mean_in_flight(self) -> float:
        return self._sync.mean_in_flight()

    async def outcome_times(self, message_ids: Sequence[str]) -> dict[str, tuple[float, float]]:
        return self._sync.outcome_times(message_ids)

    async def recorded_keys(self) -> set[str]:
        conn = self._sync._connect()
        if conn is None:
            return set()
        return {r[0] for r in conn.execute(f"SELECT key FROM idempotency_records WHERE {_DONE}")}

    async def close(self) -> None:
        self._sync.close()


class PgProbe:
    """The same reads on a PostgreSQL store URL (one connection, opened on first use)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None

    async def _fetch(self, sql: str, *args: object) -> list[Any]:
        import asyncpg

        if self._conn is None:
            self._conn = await asyncpg.connect(self.url)
        try:
            return list(await self._conn.fetch(sql, *args))
        except asyncpg.UndefinedTableError:  # the daemon has not migrated the schema yet
            return []

    async def progress(self) -> tuple[int, float | None, float | None]:
        rows = await self._fetch(
            f"SELECT count(*), min(created_at), max(updated_at) FROM idempotency_records WHERE {_DONE}"
        )
        return (int(rows[0][0]), rows[0][1], rows[0][2]) if rows else (0, None, None)

    async def mean_in_flight(self) -> float:
        rows = await self._fetch(
            "SELECT sum(updated_at - created_at), min(created_at), max(updated_at) "
            f"FROM idempotency_records WHERE {_DONE}"
        )
        if not rows or not rows[0][0] or rows[0][2] is None or rows[0][2] <= rows[0][1]:
            return float("nan")
        busy, first, last = rows[0]
        return float(busy / (last - first))

    async def outcome_times(self, message_ids: Sequence[str]) -> dict[str, tuple[float, float]]:
        rows = await self._fetch(
            "SELECT message_id, created_at, updated_at FROM idempotency_records "
            f"WHERE {_DONE} AND message_id = ANY($1::text[])",
            list(message_ids),
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    async def recorded_keys(self) -> set[str]:
        return {r[0] for r in await self._fetch(f"SELECT key FROM idempotency_records WHERE {_DONE}")}

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def probe_for(store_url: str) -> Probe:
    if store_url.startswith("sqlite:///"):
        return SqliteProbe(Path(store_url.removeprefix("sqlite:///").split("?", 1)[0]))
    return PgProbe(store_url)
