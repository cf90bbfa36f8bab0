"""The ledger: what the sandbox did, for tests to assert exactly-once against.

Every request on a business endpoint is an *attempt*. Attempts carrying a usable ``Idempotency-Key``
are filed under that key (the key string as the client meant it, across API keys; each attempt
names its API key by a non-secret ``api_key_id``), together with the number of side effects
performed for the key. Requests without a usable key only count in the totals.

In the ``didit`` profile there is no ``Idempotency-Key``: attempts are filed under our reference carried
in the request's ``metadata.idv_key`` instead (the same value the consumer would send as the key).

Separately, every side effect is an :class:`Effect` in one list, with the profile, the operation, the
``vendor_data`` and ``metadata.idv_key`` it was performed for: tests assert "exactly one session per
idv_key" on it whatever the profile.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from .views import pick

__all__ = ["Attempt", "Effect", "KeyRecord", "Ledger", "Outcome"]


class Outcome(enum.Enum):
    """Where in the pipeline a request ended."""

    UNAUTHORIZED = "unauthorized_401"
    OUT_OF_CREDIT = "out_of_credit_403"
    RATE_LIMITED = "rate_limited_429"
    GATEWAY_FAULT = "gateway_fault"
    DROPPED_BEFORE = "dropped_before"
    MISSING_KEY = "missing_key_400"
    INVALID_KEY = "invalid_key_400"
    IN_FLIGHT = "conflicts_409"
    KEY_REUSED = "reuse_422"
    REPLAYED = "replays"
    PROCESSED = "processed"
    INTERNAL_ERROR = "internal_errors_500"


# Faults are counted by kind instead, and a processed request by what it did (side effect or 422).
_COUNTED = [o for o in Outcome if o not in (Outcome.GATEWAY_FAULT, Outcome.DROPPED_BEFORE, Outcome.PROCESSED)]


@dataclass(slots=True)
class Attempt:
    at: float
    path: str
    status: int | None
    """Status produced; ``None`` when the connection was dropped before anything was produced."""
    replayed: bool
    fault: str | None
    idempotency_key: str | None
    """The ``Idempotency-Key`` header value exactly as received."""
    api_key_id: str | None
    side_effect: bool
    delivered: bool
    """``False`` when the connection was closed instead of sending the response."""
    ended_at: float | None = None
    """When the server was done with the attempt: the last byte of the answer written, or the connection
    closed (dropped, or gone while a trickled answer was still being sent). ``None`` while running."""
    operation: str | None = None
    """``didit`` profile only: the operation asked for (``create_session``, ``list_sessions``, …)."""
    reference: str | None = None
    """``didit`` profile only: the session or request id answered, when there was one."""

    def to_dict(self) -> dict[str, object]:
        data = pick(self)
        if self.operation is None:  # the ``ietf`` profile's attempts show neither
            del data["operation"], data["reference"]
        return data


@dataclass(frozen=True, slots=True)
class Effect:
    """One side effect the provider performed (a session created, a check run)."""

    at: float
    profile: str
    operation: str
    vendor_data: str | None
    idv_key: str | None
    """``metadata.idv_key`` of the request, when it carried one."""
    reference: str
    """The session id or request id the provider answered with."""
    api_key_id: str | None
    files: tuple[dict[str, object], ...] = ()
    """Uploaded files of a multipart check: field, filename, content_type, size, sha256 (never content)."""

    def to_dict(self) -> dict[str, object]:
        return {**pick(self), "files": [dict(f) for f in self.files]}


@dataclass(slots=True)
class KeyRecord:
    first_seen: float
    last_seen: float
    side_effects: int = 0
    side_effects_by_api_key: dict[str, int] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "side_effects": self.side_effects,
            "side_effects_by_api_key": dict(self.side_effects_by_api_key),
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "attempts": [a.to_dict() for a in self.attempts],
        }


class Ledger:
    def __init__(self) -> None:
        self._keys: dict[str, KeyRecord] = {}
        self._outcomes: Counter[Outcome] = Counter()
        self._faults: Counter[str] = Counter()
        self._requests = 0
        self._side_effects = 0
        self._validation_422 = 0
        self._dropped = 0
        self._effects: list[Effect] = []

    def record_effect(self, effect: Effect) -> None:
        self._effects.append(effect)

    def effects(
        self,
        *,
        idv_key: str | None = None,
        operation: str | None = None,
        vendor_data: str | None = None,
    ) -> list[Effect]:
        """The side effects in the order performed, optionally only those matching every filter given."""
        return [
            e
            for e in self._effects
            if (idv_key is None or e.idv_key == idv_key)
            and (operation is None or e.operation == operation)
            and (vendor_data is None or e.vendor_data == vendor_data)
        ]

    def record(self, key: str | None, attempt: Attempt, outcome: Outcome) -> None:
        self._requests += 1
        self._outcomes[outcome] += 1
        if attempt.fault is not None:
            self._faults[attempt.fault] += 1
        if not attempt.delivered:
            self._dropped += 1
        if outcome is Outcome.PROCESSED and attempt.status == 422:
            self._validation_422 += 1
        if attempt.side_effect:
            self._side_effects += 1
        if key is None:
            return
        record = self._keys.get(key)
        if record is None:
            record = self._keys[key] = KeyRecord(first_seen=attempt.at, last_seen=attempt.at)
        record.last_seen = attempt.at
        record.attempts.append(attempt)
        if attempt.side_effect:
            record.side_effects += 1
            scope = attempt.api_key_id or ""
            record.side_effects_by_api_key[scope] = record.side_effects_by_api_key.get(scope, 0) + 1

    def get(self, key: str) -> KeyRecord | None:
        return self._keys.get(key)

    def totals(self) -> dict[str, object]:
        totals: dict[str, object] = {
            "requests": self._requests,
            "side_effects": self._side_effects,
            "validation_422": self._validation_422,
            "dropped_connections": self._dropped,
        }
        for outcome in _COUNTED:
            totals[outcome.value] = self._outcomes[outcome]
        totals["faults"] = dict(self._faults)
        totals["keys"] = len(self._keys)
        return totals

    def snapshot(self) -> dict[str, object]:
        return {
            "keys": {key: record.to_dict() for key, record in self._keys.items()},
            "totals": self.totals(),
        }

    def clear(self) -> None:
        self._effects.clear()
        self._keys.clear()
        self._outcomes.clear()
        self._faults.clear()
        self._requests = self._side_effects = self._validation_422 = self._dropped = 0
