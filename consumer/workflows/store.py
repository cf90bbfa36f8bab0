"""The workflow store: rows, applied events and the result outbox, on SQLite or PostgreSQL.

Three tables live beside the dedupe store's, in the same database (SQL below, one text for both
dialects; the backends only translate placeholders and types):

* ``idv_workflows`` — one row per message ID (:class:`~consumer.workflows.model.Workflow`);
* ``idv_workflow_events`` — every provider event seen, keyed by (session_id, event identity): the
  applied-event dedupe. ``effect`` NULL means *pending* (its session was not recorded yet);
* ``idv_workflow_results`` — the outbox of result events, keyed by (message_id, revision), each with the
  position of the Kafka message whose handling wrote it.

:meth:`WorkflowStore.write` is the one write: in one transaction it marks the event applied (only if it
was not already), runs the row's compare-and-set (``WHERE message_id = ? AND version = ?``) and inserts
the result events. All or nothing: an event is applied to its workflow exactly once, and a result event
exists exactly when the transition that produced it does. The transition itself is checked by
:func:`~consumer.workflows.model.check_transition` first, for both backends.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Callable, Sequence
from typing import Any

from consumer.errors import ConfigurationError
from consumer.store.base import Durable
from consumer.workflows.model import COLUMNS, Event, Workflow, WState, check_transition
from consumer.workflows.rules import Change, Result

__all__ = ["SCHEMA", "WorkflowStore", "WriteStatus", "open_workflow_store"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS idv_workflows (
    message_id            TEXT PRIMARY KEY,
    subject_id            TEXT NOT NULL,
    provider_workflow_id  TEXT NOT NULL,
    steps                 TEXT NOT NULL,
    fingerprint           TEXT NOT NULL,
    state                 TEXT NOT NULL,
    version               INTEGER NOT NULL,
    session_id            TEXT,
    session_key           TEXT NOT NULL,
    aml_key               TEXT NOT NULL,
    decision_status       TEXT,
    decision_source       TEXT,
    latest_status         TEXT,
    latest_ts             REAL,
    aml_status            TEXT,
    aml_ref               TEXT,
    revision              INTEGER NOT NULL,
    polls                 INTEGER NOT NULL,
    due_at                REAL,
    deadline              REAL NOT NULL,
    created_at            REAL NOT NULL,
    updated_at            REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idv_workflows_session ON idv_workflows (session_id);
CREATE INDEX IF NOT EXISTS idv_workflows_due ON idv_workflows (state, due_at);
CREATE TABLE IF NOT EXISTS idv_workflow_events (
    session_id    TEXT NOT NULL,
    event_id      TEXT NOT NULL,
    webhook_type  TEXT NOT NULL,
    status        TEXT NOT NULL,
    provider_ts   REAL,
    source        TEXT NOT NULL,
    received_at   REAL NOT NULL,
    message_id    TEXT,
    effect        TEXT,
    PRIMARY KEY (session_id, event_id)
);
CREATE INDEX IF NOT EXISTS idv_workflow_events_message ON idv_workflow_events (message_id);
CREATE TABLE IF NOT EXISTS idv_workflow_results (
    message_id  TEXT NOT NULL,
    revision    INTEGER NOT NULL,
    source      TEXT NOT NULL,
    key         BLOB NOT NULL,
    body        BLOB NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (message_id, revision)
);
CREATE INDEX IF NOT EXISTS idv_workflow_results_source ON idv_workflow_results (source);
"""

_COLS = ", ".join(COLUMNS)
_MUTABLE = [c for c in COLUMNS if c != "message_id"]
_STATE_AT = COLUMNS.index("state")

# Statements with `?` placeholders; PostgreSQL's backend numbers them. Only constant column lists are
# interpolated (noqa: S608).
SQL_INSERT = (
    f"INSERT INTO idv_workflows ({_COLS}) VALUES ({', '.join('?' for _ in COLUMNS)}) "  # noqa: S608
    "ON CONFLICT (message_id) DO NOTHING"
)
SQL_GET = f"SELECT {_COLS} FROM idv_workflows WHERE message_id = ?"  # noqa: S608
SQL_BY_SESSION = f"SELECT {_COLS} FROM idv_workflows WHERE session_id = ?"  # noqa: S608
SQL_CAS = (
    f"UPDATE idv_workflows SET {', '.join(f'{c} = ?' for c in _MUTABLE)} "  # noqa: S608
    "WHERE message_id = ? AND version = ?"
)
# An event that changes nothing is still recorded as applied, guarded by the version it was decided on.
SQL_TOUCH = "UPDATE idv_workflows SET version = version WHERE message_id = ? AND version = ?"
# Applied once: a new row, or a pending one (effect NULL) claimed; an applied one matches nothing.
SQL_EVENT_APPLY = (
    "INSERT INTO idv_workflow_events (session_id, event_id, webhook_type, status, provider_ts, source, "
    "received_at, message_id, effect) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (session_id, event_id) DO UPDATE SET message_id = excluded.message_id, "
    "effect = excluded.effect WHERE idv_workflow_events.effect IS NULL"
)
SQL_EVENT_PENDING = (
    "INSERT INTO idv_workflow_events (session_id, event_id, webhook_type, status, provider_ts, source, "
    "received_at, message_id, effect) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL) "
    "ON CONFLICT (session_id, event_id) DO NOTHING"
)
SQL_PENDING = (
    "SELECT session_id, event_id, webhook_type, status, provider_ts FROM idv_workflow_events "
    "WHERE session_id = ? AND effect IS NULL ORDER BY provider_ts, received_at"
)
SQL_EVENTS = (
    "SELECT session_id, event_id, webhook_type, status, provider_ts, source, received_at, message_id, "
    "effect FROM idv_workflow_events WHERE message_id = ? OR session_id = ? ORDER BY received_at"
)
SQL_RESULT_INSERT = (
    "INSERT INTO idv_workflow_results (message_id, revision, source, key, body, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (message_id, revision) DO NOTHING"
)
SQL_RESULTS_AT = (
    "SELECT message_id, revision, source, key, body FROM idv_workflow_results WHERE source = ? "
    "ORDER BY message_id, revision"
)
SQL_RESULTS_OF = (
    "SELECT message_id, revision, source, key, body FROM idv_workflow_results WHERE message_id = ? "
    "ORDER BY revision"
)
SQL_DUE = (
    f"SELECT {_COLS} FROM idv_workflows WHERE state = 'waiting' AND due_at <= ? "  # noqa: S608
    "ORDER BY due_at LIMIT ?"
)
# Decided (or screened) but not finished, untouched for a while: the message that was advancing it was
# set aside (a step kept failing) or the daemon died with it; the poller resumes it.
SQL_STALLED = (
    f"SELECT {_COLS} FROM idv_workflows WHERE state IN ('decided', 'aml_done') AND updated_at <= ? "  # noqa: S608
    "ORDER BY updated_at LIMIT ?"
)
# Retention: finished workflows (and their events and outbox rows) last changed before the cut-off, and
# pending events nobody claimed (sessions that are not ours). Run in this order, in one transaction.
_FINAL = "state IN ('finished', 'abandoned', 'expired', 'failed')"
_FINAL_OLD = f"SELECT message_id FROM idv_workflows WHERE {_FINAL} AND updated_at < ?"  # noqa: S608
SQL_PURGE_RESULTS = f"DELETE FROM idv_workflow_results WHERE message_id IN ({_FINAL_OLD})"  # noqa: S608
SQL_PURGE_EVENTS = (
    f"DELETE FROM idv_workflow_events WHERE message_id IN ({_FINAL_OLD}) "  # noqa: S608
    "OR (message_id IS NULL AND received_at < ?)"
)
SQL_PURGE_WORKFLOWS = f"DELETE FROM idv_workflows WHERE {_FINAL} AND updated_at < ?"  # noqa: S608
SQL_COUNTS = "SELECT state, COUNT(*) FROM idv_workflows GROUP BY state"


class WriteStatus(enum.Enum):
    OK = "ok"
    STALE = "stale"  # the row's version moved: re-read and decide again
    DUPLICATE = "duplicate"  # the event was applied before: nothing written


def row_to_workflow(row: Sequence[Any]) -> Workflow:
    values = list(row[: len(COLUMNS)])
    values[_STATE_AT] = WState(values[_STATE_AT])
    return Workflow(*values)


def workflow_values(wf: Workflow) -> list[Any]:
    return [wf.state.value if c == "state" else getattr(wf, c) for c in COLUMNS]


def cas_args(old: Workflow, new: Workflow) -> list[Any]:
    return [*(workflow_values(new)[1:]), old.message_id, old.version]


def event_args(ev: Event, source: str, now: float) -> list[Any]:
    return [ev.session_id, ev.event_id, ev.webhook_type, ev.status, ev.provider_ts, source, now]


def result_args(r: Result, now: float) -> list[Any]:
    return [r.message_id, r.revision, r.source, r.key, r.body, now]


class WorkflowStore(Durable):
    """Abstract workflow store; every method is atomic and durable when it returns."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    @abc.abstractmethod
    async def create(self, wf: Workflow) -> Workflow:
        """Insert ``wf`` unless a row for its message ID exists; returns the stored row."""

    @abc.abstractmethod
    async def get(self, message_id: str) -> Workflow | None: ...

    @abc.abstractmethod
    async def by_session(self, session_id: str) -> Workflow | None: ...

    async def write(
        self, old: Workflow, change: Change | None, event: Event | None = None, source: str = ""
    ) -> WriteStatus:
        """One transition (see the module docstring). ``change`` None records ``event`` as applied with
        no effect, still conditioned on ``old.version``."""
        if change is not None:
            check_transition(old, change.new)
        return await self._write(old, change, event, source)

    @abc.abstractmethod
    async def _write(
        self, old: Workflow, change: Change | None, event: Event | None, source: str
    ) -> WriteStatus: ...

    @abc.abstractmethod
    async def add_pending(self, event: Event, source: str) -> bool:
        """Remember an event whose session is not recorded yet; False if it was seen before."""

    @abc.abstractmethod
    async def pending(self, session_id: str) -> list[Event]: ...

    @abc.abstractmethod
    async def results_at(self, source: str) -> list[Result]:
        """The result events written while handling the message at ``source`` (its redelivery re-sends
        exactly these)."""

    @abc.abstractmethod
    async def results_of(self, message_id: str) -> list[Result]: ...

    @abc.abstractmethod
    async def events(self, message_id: str, session_id: str | None) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def due(self, now: float, limit: int) -> list[Workflow]:
        """Waiting workflows whose next poll is due, oldest first."""

    @abc.abstractmethod
    async def stalled(self, before: float, limit: int) -> list[Workflow]:
        """Decided or screened workflows not changed since ``before`` (their advance stopped)."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]: ...

    @abc.abstractmethod
    async def purge(self, before: float) -> int:
        """Delete final workflows last changed before ``before`` with their events and outbox rows, and
        pending events received before it; returns the workflows deleted. Open workflows are never
        touched. Run with the dedupe store's retention: both must outlive topic retention + replay window."""


def open_workflow_store(url: str) -> WorkflowStore:
    """The workflow store beside the dedupe store at ``url`` (same scheme rules as
    :func:`consumer.store.open_store`)."""
    from urllib.parse import urlsplit

    from consumer.store import POSTGRES_SCHEMES, sqlite_target

    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        from consumer.workflows.sqlite import SqliteWorkflowStore

        path, sync = sqlite_target(parts)
        return SqliteWorkflowStore(path, synchronous=sync)
    if parts.scheme in POSTGRES_SCHEMES:
        from consumer.workflows.postgres import PostgresWorkflowStore

        return PostgresWorkflowStore(url)
    raise ConfigurationError(f"unsupported store URL scheme {parts.scheme!r} for workflows")
