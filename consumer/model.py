"""Value types shared by the pipeline, the sinks and the daemon: what became of one message.

:class:`Disposition` names the end of a message's journey, :class:`Handled` carries it (with the dead
letter to write or the stored record whose result event to publish), :class:`DeadLetter` says why a
message is set aside (one of :data:`DLQ_REASONS`), :class:`Stats` counts dispositions.

The store's values live here too, so that the provider client, the sinks and the tools need not import
the store to speak of them: :class:`Outcome` (what the provider answered, no personal data), the record
:class:`State`, :class:`Record`, and a claim's result (:class:`Claim`, :class:`ClaimStatus`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DLQ_REASONS",
    "Claim",
    "ClaimStatus",
    "DeadLetter",
    "Disposition",
    "Handled",
    "Outcome",
    "Record",
    "State",
    "Stats",
    "conflict",
]


class State(enum.StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    RELEASED = "released"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the provider answered, reduced to what downstream needs; no personal data."""

    status: str  # approved | declined | review | created | failed
    http_status: int | None = None
    provider_reference: str | None = None
    detail: str | None = None  # a short code such as "validation_error" for failed outcomes

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy was most of the store's CPU time per record.
        return {"status": self.status, "http_status": self.http_status,
                "provider_reference": self.provider_reference, "detail": self.detail}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        return cls(
            status=str(data["status"]),
            http_status=data.get("http_status"),
            provider_reference=data.get("provider_reference"),
            detail=data.get("detail"),
        )


@dataclass(frozen=True, slots=True)
class Record:
    key: str
    message_id: str
    operation: str
    fingerprint: str
    state: State
    owner: str | None
    lease_until: float | None
    attempts: int
    outcome: Outcome | None
    last_error: str | None
    created_at: float
    updated_at: float
    expires_at: float


class ClaimStatus(enum.Enum):
    ACQUIRED = "acquired"  # we own the lease: call the provider
    DONE = "done"  # completed or failed before: do not call again
    BUSY = "busy"  # another owner holds a live lease: wait for it
    CONFLICT = "conflict"  # same key, different fingerprint: never call


@dataclass(frozen=True, slots=True)
class Claim:
    status: ClaimStatus
    record: Record


DLQ_REASONS = (
    "invalid_encoding",
    "invalid_json",
    "invalid_envelope",
    "missing_message_id",
    "unknown_operation",
    "too_large",
    "idempotency_conflict",
    "retries_exhausted",
    "internal_error",  # a bug in the consumer met this message; redrive after the fix
    "undecodable_record",  # the Kafka client could not read the record (e.g. a non-UTF-8 header key)
    "in_doubt",  # the provider may have acted; the outcome is unknown, an operator decides
    # A referenced document (consumer/documents.py) could not be used; nothing was sent to the provider.
    "document_missing",  # no such document at its source
    "document_unreadable",  # a bad reference, an unknown type, unreadable, or its store kept failing
    "document_too_large",  # over IDV_DOCUMENTS_MAX_BYTES
)


class DeadLetter:
    """Why a message is set aside; becomes the dead-letter headers."""

    __slots__ = ("attempts", "detail", "first_failure_at", "reason")

    def __init__(self, reason: str, detail: str, *, attempts: int = 0, first_failure_at: float | None = None):
        if reason not in DLQ_REASONS:
            raise ValueError(f"unknown dead-letter reason {reason!r}")
        self.reason = reason
        self.detail = detail[:500]
        self.attempts = attempts
        self.first_failure_at = first_failure_at


def conflict(detail: str, first_failure_at: float | None) -> Handled:
    """How a message ends whose ID was used before with a different payload: recorded, never sent."""
    return Handled(
        Disposition.CONFLICT,
        DeadLetter("idempotency_conflict", detail, first_failure_at=first_failure_at),
    )


class Disposition(enum.Enum):
    COMPLETED = "completed"  # provider answered 2xx; outcome recorded
    FAILED = "failed"  # provider answered a terminal 4xx; failed outcome recorded
    DUPLICATE = "duplicate"  # key already COMPLETED/FAILED: skipped, provider not called
    CONFLICT = "conflict"  # same message ID, different payload: recorded, provider not called
    INVALID = "invalid"  # not a valid envelope: logged (no payload), set aside
    SET_ASIDE = "set_aside"  # provider kept failing past the retry ceiling: lease released, set aside
    IN_DOUBT = "in_doubt"  # the provider may have acted, the outcome is unknown: set aside for an operator
    ERROR = "error"  # an unexpected exception in the consumer: dead-lettered (internal_error)


@dataclass(slots=True)
class Handled:
    """What became of one message. ``dead_letter`` is set for messages to set aside; ``record`` (the stored
    COMPLETED/FAILED record) for messages whose outcome event should be published."""

    disposition: Disposition
    dead_letter: DeadLetter | None = None
    record: Record | None = None
    subject_id: str | None = None
    # Workflow result events to publish for this message: (Kafka key, value, message ID) as stored.
    raw_results: list[tuple[bytes, bytes, str]] = field(default_factory=list)


@dataclass
class Stats:
    consumed: int = 0
    by_disposition: dict[str, int] = field(default_factory=lambda: {d.value: 0 for d in Disposition})
    invalid_by_reason: dict[str, int] = field(default_factory=dict)

    def count(self, disposition: Disposition) -> None:
        self.by_disposition[disposition.value] += 1
