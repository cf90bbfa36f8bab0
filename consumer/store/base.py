"""The dedupe store: one record per idempotency key, every transition a compare-and-set.

State machine of a record::

                 claim (no record)                    complete(owner)
      (none) ──────────────────────▶ IN_PROGRESS ─────────────────────▶ COMPLETED
                                      │   ▲   │                          (outcome; duplicates
                         release(owner)│   │   │ fail(owner)               are skipped)
                                      ▼   │   ▼
                                  RELEASED │  FAILED (terminal outcome, e.g. provider 422)
                                      │   │
                                      └───┘ claim (released, or lease expired → take-over)

* Only the lease owner may complete, fail, renew or release (``WHERE owner = ?``).
* An IN_PROGRESS record is taken over only after ``lease_until`` has passed, so two consumers never run
  the same key at once while the first is alive (a dead one's lease runs out).
* Nothing is ever deleted on error: attempts are counted, the lease is released (PITFALLS: deleting the
  record on failure repeated side effects). Records leave only through retention expiry.
* The record holds a fingerprint and the provider's reference, never the request itself.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

__all__ = ["Claim", "ClaimStatus", "DedupeStore", "Outcome", "Record", "State"]


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
        return {
            "status": self.status,
            "http_status": self.http_status,
            "provider_reference": self.provider_reference,
            "detail": self.detail,
        }

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


Clock = Callable[[], float]


class DedupeStore(abc.ABC):
    """Abstract dedupe store. Backends: :mod:`consumer.store.sqlite`, chosen by URL in :func:`open_store`.

    Every method is a single atomic transition; a method returning normally means its effect is durable.
    Methods raising :class:`~consumer.errors.LeaseLost` changed nothing.
    """

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def claim(
        self,
        *,
        key: str,
        message_id: str,
        operation: str,
        fingerprint: str,
        owner: str,
        lease_s: float,
        retention_s: float,
    ) -> Claim:
        """Insert an IN_PROGRESS record owned by ``owner``, or report why not."""

    @abc.abstractmethod
    async def complete(self, key: str, owner: str, outcome: Outcome, *, failed: bool = False) -> Record:
        """IN_PROGRESS(owner) → COMPLETED (or FAILED when ``failed``); returns the stored record.

        Raises LeaseLost otherwise."""

    @abc.abstractmethod
    async def release(self, key: str, owner: str, error: str) -> None:
        """IN_PROGRESS(owner) → RELEASED, keeping attempts and the error code; raises LeaseLost otherwise."""

    @abc.abstractmethod
    async def renew(self, key: str, owner: str, lease_s: float) -> None:
        """Extend our lease; raises LeaseLost if the record is no longer ours."""

    @abc.abstractmethod
    async def record_conflict(
        self, *, key: str, message_id: str, fingerprint: str, stored_fingerprint: str, source: str
    ) -> None:
        """Remember that ``message_id`` arrived with a different payload.

        ``source`` is ``topic/partition@offset``.
        """

    @abc.abstractmethod
    async def get(self, key: str) -> Record | None: ...

    @abc.abstractmethod
    async def conflicts(self, message_id: str | None = None) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """Records per state (for tests, metrics and the operator)."""

    @abc.abstractmethod
    async def purge_expired(self) -> int:
        """Delete records past their retention; returns how many. Never touches IN_PROGRESS records."""
