"""The PostgreSQL store's schema and statements: migrations, the batched writer's SQL, driver errors.

:mod:`consumer.store.postgres` runs them; they live here so the store's module holds its behaviour (the
batched writer and the transitions) and this one its dialect. Only the module's own column lists are
interpolated into the SQL (``noqa: S608`` below).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from consumer.errors import StoreError
from consumer.store import redact
from consumer.store.base import COLUMN_LIST, COLUMNS

log = logging.getLogger(__name__)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate", "migrate_url"]

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
    # 2: no query reads (state, lease_until); without it a completion changes no indexed column, so it can
    # be a HOT update (no new index entries), and every transition writes one index fewer.
    """
    DROP INDEX IF EXISTS idempotency_records_lease;
    ALTER TABLE idempotency_records SET (fillfactor = 80);
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
