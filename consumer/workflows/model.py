"""The workflow state machine: states, the one transition rule, event ordering, per-step keys.

A ``kyc_workflow`` request becomes one :class:`Workflow` row per message ID. Its ``state`` is the
recovery point::

    started ──session step──▶ session_created ──▶ waiting ──decision──▶ decided ──AML step──▶ aml_done
                                                   │   ▲                   │                     │
                                                   │   └─ review/progress  └── declined / no AML ─┤
                                                   ├──▶ abandoned (never finished in time)          ▼
                                                   └──▶ expired  (Expired / Kyc Expired)          finished
    started ──session refused (terminal 4xx)──▶ failed

Every change is :func:`check_transition` (the allowed edges, here only) followed by the backend's
compare-and-set ``UPDATE … WHERE message_id = ? AND version = ?``; a lost race re-reads and decides again.
A terminal decision (``decision_status``) is written once and never overwritten; later provider changes
only move ``latest_status`` and add a result revision (version 2, 3 …).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from dataclasses import dataclass
from typing import Any

from consumer.errors import ConsumerError
from consumer.keys import idempotency_key

__all__ = [
    "FINAL_STATES",
    "TRANSITIONS",
    "WORKFLOW_OPERATION",
    "Event",
    "IllegalTransition",
    "Step",
    "WState",
    "Workflow",
    "check_transition",
    "event_from_webhook",
    "generation_id",
    "map_status",
    "precedence",
    "split_generation",
    "step_key",
]

WORKFLOW_OPERATION = "kyc_workflow"


class WState(enum.StrEnum):
    STARTED = "started"
    SESSION_CREATED = "session_created"
    WAITING = "waiting"
    DECIDED = "decided"
    AML_DONE = "aml_done"
    FINISHED = "finished"
    ABANDONED = "abandoned"
    EXPIRED = "expired"
    FAILED = "failed"  # the session could not be created (a terminal 4xx)


#: States whose final decision event exists (revision 1 written): later changes are new revisions.
FINAL_STATES = frozenset({WState.FINISHED, WState.ABANDONED, WState.EXPIRED, WState.FAILED})
#: States in which the applicant may still act (events may decide the workflow).
OPEN_STATES = frozenset({WState.STARTED, WState.SESSION_CREATED, WState.WAITING})

_EDGES: dict[WState, frozenset[WState]] = {
    WState.STARTED: frozenset({WState.SESSION_CREATED, WState.FAILED}),
    WState.SESSION_CREATED: frozenset({WState.WAITING, WState.DECIDED, WState.ABANDONED, WState.EXPIRED}),
    WState.WAITING: frozenset({WState.WAITING, WState.DECIDED, WState.ABANDONED, WState.EXPIRED}),
    WState.DECIDED: frozenset({WState.DECIDED, WState.AML_DONE, WState.FINISHED}),
    WState.AML_DONE: frozenset({WState.AML_DONE, WState.FINISHED}),
    WState.FINISHED: frozenset({WState.FINISHED}),
    WState.ABANDONED: frozenset({WState.ABANDONED}),
    WState.EXPIRED: frozenset({WState.EXPIRED}),
    WState.FAILED: frozenset({WState.FAILED}),
}
#: Every change of state the transition rule allows (staying in a state is not a change).
TRANSITIONS: tuple[tuple[WState, WState], ...] = tuple(
    (a, b) for a, nexts in _EDGES.items() for b in sorted(nexts) if a is not b
)


class Step(enum.StrEnum):
    """The provider steps with side effects; each has its own idempotency key."""

    SESSION = "session"
    AML = "aml"


def step_key(namespace: str, message_id: str, step: Step | str, generation: int = 0) -> str:
    """The idempotency key of one step: :func:`consumer.keys.idempotency_key` of (namespace, the
    workflow operation and step, message ID[, generation]). Stable across replays and restarts."""
    return idempotency_key(namespace, f"{WORKFLOW_OPERATION}/{step}", message_id, generation)


#: Separates a message ID from its key generation in a re-verification's row id. ``#`` is outside the
#: characters a message ID may have (producer.envelope), so a row id names one (message, generation).
GENERATION_SEP = "#gen"


def generation_id(message_id: str, generation: int) -> str:
    """The row id of ``message_id``'s workflow at key generation ``generation`` (0: the message ID)."""
    return f"{message_id}{GENERATION_SEP}{generation}" if generation else message_id


def split_generation(row_id: str) -> tuple[str, int]:
    """(message ID, generation) of a workflow row id (:func:`generation_id` reversed)."""
    base, sep, gen = row_id.rpartition(GENERATION_SEP)
    if sep and base and gen.isdigit():
        return base, int(gen)
    return row_id, 0


class IllegalTransition(ConsumerError):
    """A transition the state machine does not allow (a bug: callers decide from the stored row)."""


@dataclass(frozen=True, slots=True)
class Workflow:
    """One workflow row. No personal data: ``subject_id`` is the caller's stable entity id (vendor_data)."""

    message_id: str  # the row id: the message ID, or ``<message ID>#gen<N>`` (a re-verification)
    subject_id: str
    provider_workflow_id: str
    steps: str  # comma-separated: "session,decision,aml"
    fingerprint: str
    state: WState
    version: int
    session_id: str | None
    session_key: str
    aml_key: str
    decision_status: str | None  # approved | declined (terminal, written once)
    decision_source: str | None  # webhook | poll
    latest_status: str | None  # the provider's latest known status (mapped)
    latest_ts: float | None  # provider timestamp of latest_status (None: from a poll)
    aml_status: str | None
    aml_ref: str | None
    revision: int  # result events written (1 = the final decision)
    polls: int
    due_at: float | None  # next poll of the decision endpoint (waiting only)
    deadline: float  # abandoned after this (IDV_WORKFLOW_ABANDON_AFTER_S from creation)
    created_at: float
    updated_at: float

    @property
    def request_id(self) -> str:
        """The request's message ID (a re-verification's row is ``<message ID>#gen<N>``)."""
        return split_generation(self.message_id)[0]

    @property
    def generation(self) -> int:
        """The key generation of the row: 0 for the request itself, N ≥ 1 for ``--reverify``."""
        return split_generation(self.message_id)[1]

    @property
    def wants_aml(self) -> bool:
        return "aml" in self.steps.split(",")

    def evolve(self, **changes: Any) -> Workflow:
        return dataclasses.replace(self, **changes)


COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Workflow))


def check_transition(old: Workflow, new: Workflow) -> None:
    """The one rule every write obeys (both backends call it before their compare-and-set)."""
    if new.state not in _EDGES[old.state]:
        raise IllegalTransition(f"{old.state.value} → {new.state.value}")
    if new.version != old.version + 1:
        raise IllegalTransition("a transition bumps the version by exactly one")
    if old.decision_status is not None and new.decision_status != old.decision_status:
        raise IllegalTransition("a terminal decision is never overwritten")
    if old.session_id is not None and new.session_id != old.session_id:
        raise IllegalTransition("the session id never changes once recorded")
    if old.aml_status is not None and new.aml_status != old.aml_status:
        raise IllegalTransition("the AML outcome is written once")
    if new.revision < old.revision or new.revision > old.revision + 2:
        raise IllegalTransition("result revisions only grow")
    for name in ("message_id", "fingerprint", "session_key", "aml_key", "subject_id", "created_at"):
        if getattr(old, name) != getattr(new, name):
            raise IllegalTransition(f"{name} is immutable")


# -- provider statuses and events --------------------------------------------------------------------------

_STATUS = {
    "approved": "approved",
    "declined": "declined",
    "in review": "review",
    "not started": "created",
    "in progress": "created",
    "awaiting user": "created",
    "resubmitted": "created",
    "abandoned": "abandoned",
    "expired": "expired",
    "kyc expired": "expired",
}


def map_status(raw: object) -> str:
    """Didit's session status (exact strings in the docs) → our outcome status; anything else ``unknown``."""
    return _STATUS.get(str(raw).strip().lower(), "unknown") if isinstance(raw, str) else "unknown"


def precedence(status: str | None) -> int:
    """Ordering of statuses when timestamps cannot decide: progress < review < any final status."""
    if status in ("approved", "declined", "abandoned", "expired"):
        return 2
    if status == "review":
        return 1
    return 0


@dataclass(frozen=True, slots=True)
class Event:
    """One provider event reduced to what the workflow needs (no personal data)."""

    session_id: str
    event_id: str  # identity for dedupe: type + status + the event's created_at (or a hash of the body)
    webhook_type: str  # status.updated | data.updated | idv.poll | idv.timeout
    status: str  # mapped (map_status)
    provider_ts: float | None


def event_from_webhook(body: dict[str, Any], raw: bytes) -> Event | None:
    """The event of a webhook body (or of the poller's synthetic body); None without a session id."""
    session_id = body.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        return None
    webhook_type = str(body.get("webhook_type") or "status.updated")[:40]
    status = map_status(body.get("status"))
    # created_at is the event's own time; timestamp is the delivery's (a retry is signed afresh with a new
    # one), so it identifies and orders events only when created_at is missing.
    ts_raw = body.get("created_at", body.get("timestamp"))
    ts = float(ts_raw) if isinstance(ts_raw, int | float) and not isinstance(ts_raw, bool) else None
    if ts is not None:
        event_id = f"{webhook_type}:{status}:{ts:.3f}"
    elif webhook_type in ("idv.poll", "idv.timeout", "idv.resume"):
        event_id = f"{webhook_type}:{status}"
    else:
        event_id = "sha256:" + hashlib.sha256(raw).hexdigest()[:32]
    return Event(session_id[:128], event_id, webhook_type, status, ts)
