"""The ``didit`` profile's sessions: what Didit keeps per verification session or saved standalone check.

A *session* (``POST /v3/session/``) starts ``Not Started`` and moves through the documented lifecycle;
a standalone check saved with ``save_api_request`` is kept here too, already decided, so that the list
and decision endpoints serve it under its ``vendor_data`` (its ``request_id`` is its session id).

Answers carry ``vendor_data`` and ``metadata`` as the caller sent them (non-PII references by the
contract) and never names, images or document numbers.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .decisions import Decision, aml_details, id_warnings
from .views import pick

__all__ = [
    "DECIDED",
    "STATUSES",
    "UNFINISHED",
    "Session",
    "SessionStore",
    "check_result",
    "iso_time",
]

STATUSES = (
    "Not Started",
    "In Progress",
    "Awaiting User",
    "In Review",
    "Approved",
    "Declined",
    "Resubmitted",
    "Expired",
    "Kyc Expired",
    "Abandoned",
)
UNFINISHED = frozenset({"Not Started", "In Progress", "Resubmitted", "Awaiting User"})
"""A create for the same (workflow_id, vendor_data) returns a session in one of these."""
DECIDED = frozenset({"Approved", "Declined", "In Review"})
"""Statuses whose webhook and decision carry the feature results."""

# kind -> (feature name, decision list field)
_FEATURES = {
    "id_verification": ("ID_VERIFICATION", "id_verifications"),
    "passive_liveness": ("LIVENESS", "liveness_checks"),
    "face_match": ("FACE_MATCH", "face_matches"),
    "aml_screening": ("AML", "aml_screenings"),
}
_SESSION_KINDS = ("id_verification", "passive_liveness", "face_match")
_LIST_FIELDS = ("id_verifications", "liveness_checks", "face_matches", "aml_screenings")
_WIRE_NAMES = {"session_number": "number", "session_token": "token", "session_url": "url"}
_SCORES = {Decision.APPROVED: 96.0, Decision.IN_REVIEW: 61.5, Decision.DECLINED: 12.25}


def iso_time(at: float) -> str:
    """Didit's timestamp form: ISO 8601 in UTC with microseconds and ``Z``."""
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_result(kind: str, decision: Decision, document_type: str | None = None) -> dict[str, Any]:
    """The feature result of one check with this outcome (the standalone answer's inner object)."""
    status = decision.value
    if kind == "id_verification":
        return {
            "status": status,
            "document_type": document_type or "Identity Card",
            "warnings": id_warnings(decision),
        }
    if kind == "aml_screening":
        total_hits, score = aml_details(decision)
        hits = [{"id": f"hit-{n + 1}", "match_score": score, "datasets": ["PEP"]} for n in range(total_hits)]
        return {"status": status, "total_hits": total_hits, "score": score, "hits": hits}
    return {"status": status, "score": _SCORES[decision]}


@dataclass(slots=True)
class Session:
    session_id: str
    number: int
    token: str
    kind: str
    """``session`` for a verification session, else the standalone check's operation name."""
    workflow_id: str | None
    vendor_data: str | None
    callback: str | None
    metadata: dict[str, Any] | None
    status: str
    created_at: float
    planned: Decision
    """The decision the input asks for (``decisions.decide``); a session reaches it when completed."""
    url: str | None = None
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Decision list field -> results, filled when the session is decided (or at once for a check)."""
    history: list[tuple[float, str]] = field(default_factory=list)

    def _wire(self, *names: str) -> dict[str, Any]:
        """These fields under the names Didit's answers give them."""
        return pick(self, *names, attrs=_WIRE_NAMES)

    def created_body(self) -> dict[str, Any]:
        return {
            **self._wire("session_id", "session_number", "session_token", "url", "vendor_data", "metadata"),
            **self._wire("status", "workflow_id"),
            "workflow_version": 1,
            "callback": self.callback,
        }

    def row(self) -> dict[str, Any]:
        """One ``GET /v3/sessions/`` result: no metadata (the decision endpoint carries it)."""
        return {
            "session_id": self.session_id,
            "session_kind": "user",
            **self._wire("session_number", "status", "vendor_data", "workflow_id"),
            "created_at": iso_time(self.created_at),
        }

    def decision_body(self) -> dict[str, Any]:
        kinds = _SESSION_KINDS if self.kind == "session" else (self.kind,)
        return {
            **self._wire("session_id", "session_number", "session_url", "status", "workflow_id"),
            "features": [_FEATURES[k][0] for k in kinds],
            **self._wire("vendor_data", "metadata", "callback"),
            **{name: self.results.get(name) for name in _LIST_FIELDS},
            "created_at": iso_time(self.created_at),
        }

    def admin_view(self) -> dict[str, Any]:
        return {
            **self.row(),
            "kind": self.kind,
            "metadata": self.metadata,
            "planned_decision": self.planned.value,
            "history": [{"at": at, "status": status} for at, status in self.history],
        }

    def settle(self, status: str) -> None:
        """Fill the feature results for a decided status (a reviewer's change overrides every feature)."""
        if self.kind != "session" or status not in DECIDED:
            return
        decision = Decision(status)
        for kind in _SESSION_KINDS:
            self.results[_FEATURES[kind][1]] = [check_result(kind, decision)]


class SessionStore:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._sessions: dict[str, Session] = {}  # insertion order = creation order
        self._numbers = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def clear(self) -> None:
        self._sessions.clear()
        self._numbers = 0

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def delete(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def unfinished(self, workflow_id: str, vendor_data: str) -> Session | None:
        """The newest unfinished session of this workflow for this ``vendor_data``."""
        for session in reversed(self._sessions.values()):
            if (
                session.kind == "session"
                and session.workflow_id == workflow_id
                and session.vendor_data == vendor_data
                and session.status in UNFINISHED
            ):
                return session
        return None

    def add(
        self,
        kind: str,
        *,
        workflow_id: str | None,
        vendor_data: str | None,
        callback: str | None,
        metadata: dict[str, Any] | None,
        planned: Decision,
        base_url: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> Session:
        """A new session (``kind="session"``, ``Not Started``) or a saved check (decided, with ``result``)."""
        self._numbers += 1
        now = self._clock()
        session_id = str(uuid.uuid4())
        token = uuid.uuid4().hex[:12]
        status = "Not Started" if kind == "session" else planned.value
        session = Session(
            session_id=session_id,
            number=self._numbers,
            token=token,
            kind=kind,
            workflow_id=workflow_id,
            vendor_data=vendor_data,
            callback=callback,
            metadata=metadata,
            status=status,
            created_at=now,
            planned=planned,
            url=f"{base_url}/session/{token}" if base_url is not None else None,
            history=[(now, status)],
        )
        if result is not None:
            session.results[_FEATURES[kind][1]] = [result]
        self._sessions[session_id] = session
        return session

    def transition(self, session: Session, status: str) -> str:
        """Move ``session`` to ``status``; returns the previous status."""
        previous = session.status
        session.status = status
        session.history.append((self._clock(), status))
        session.settle(status)
        return previous

    def find(
        self, *, vendor_data: str | None = None, workflow_id: str | None = None, status: str | None = None
    ) -> list[Session]:
        """Matching sessions, newest first."""
        return [
            s
            for s in reversed(self._sessions.values())
            if (vendor_data is None or s.vendor_data == vendor_data)
            and (workflow_id is None or s.workflow_id == workflow_id)
            and (status is None or s.status == status)
        ]
