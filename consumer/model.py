"""Value types shared by the pipeline, the sinks and the daemon: what became of one message.

:class:`Disposition` names the end of a message's journey, :class:`Handled` carries it (with the dead
letter to write or the stored record whose result event to publish), :class:`DeadLetter` says why a
message is set aside (one of :data:`DLQ_REASONS`), :class:`Stats` counts dispositions.

(``Outcome``, ``Record``, ``Claim`` and ``ClaimStatus`` still live in :mod:`consumer.store.base`.)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from consumer.store.base import Record

__all__ = ["DLQ_REASONS", "DeadLetter", "Disposition", "Handled", "Stats"]

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


@dataclass
class Stats:
    consumed: int = 0
    by_disposition: dict[str, int] = field(default_factory=lambda: {d.value: 0 for d in Disposition})
    invalid_by_reason: dict[str, int] = field(default_factory=dict)

    def count(self, disposition: Disposition) -> None:
        self.by_disposition[disposition.value] += 1
