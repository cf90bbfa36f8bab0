"""How a SQLite file is opened here (the dedupe store and the workflow store): WAL, synchronous, busy wait."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import anyio

from consumer.errors import StoreError

__all__ = ["close_connection", "connect", "open_connection", "synchronous_mode"]

_MODES = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})


def synchronous_mode(mode: str) -> str:
    """``mode`` as SQLite's ``PRAGMA synchronous`` takes it; ValueError for anything else."""
    if mode.upper() not in _MODES:
        raise ValueError(f"invalid SQLite synchronous mode {mode!r}")
    return mode.upper()


def connect(path: str, synchronous: str, schema: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit ``BEGIN IMMEDIATE``), WAL, the given
    ``synchronous`` mode, a 30 s busy wait for the other writer of the file, and ``schema`` applied."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.executescript(schema)
    return conn


async def open_connection(connect: Callable[[], sqlite3.Connection], what: str) -> sqlite3.Connection:
    """``connect()`` in a worker thread; a failure is a :class:`StoreError` "cannot open ``what``"."""
    try:
        return await anyio.to_thread.run_sync(connect)
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"cannot open {what}: {exc}") from exc


async def close_connection(conn: sqlite3.Connection | None) -> None:
    if conn is not None:
        await anyio.to_thread.run_sync(conn.close)
