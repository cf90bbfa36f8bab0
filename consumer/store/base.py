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
* The record holds a fingerprint and the provider's reference, never the request itself. A claim passes
  the request's fingerprint in the current scheme and, as ``legacy_fingerprints``, in older schemes
  (consumer/keys.py); a stored fingerprint equal to any of them is the same request.
* A claim is idempotent for its owner: if an earlier claim of this owner inserted (or took over) the
  record but its answer never arrived (connection lost after the commit, a cancelled caller), the retry is
  ACQUIRED with the same record instead of waiting out its own lease. Two handlers of one process are
  still never ACQUIRED together: the store tracks which of its keys a caller holds (got ACQUIRED, not yet
  completed or released) or is claiming right now, and a re-claim while one does is BUSY.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

import orjson

from consumer.errors import LeaseLost
from consumer.model import Claim, ClaimStatus, Outcome, Record, State

__all__ = [
    "COLUMNS",
    "COLUMN_LIST",
    "CONFLICT_COLUMNS",
    "CONFLICT_LIST",
    "Claim",
    "ClaimRequest",
    "ClaimStatus",
    "DedupeStore",
    "Decision",
    "Durable",
    "Outcome",
    "Record",
    "State",
    "decide_claim",
    "dump_outcome",
    "empty_counts",
    "load_outcome",
    "record_from_row",
]


# -- one column list, one row mapping ----------------------------------------------------------------------

#: The record's columns, in :class:`Record` field order: every backend selects them in this order.
COLUMNS: tuple[str, ...] = (
    "key", "message_id", "operation", "fingerprint", "state", "owner", "lease_until", "attempts", "outcome",
    "last_error", "created_at", "updated_at", "expires_at",
)  # fmt: skip
COLUMN_LIST = ", ".join(COLUMNS)
_STATE_INDEX, _OUTCOME_INDEX = COLUMNS.index("state"), COLUMNS.index("outcome")
#: The conflict log's columns, as :meth:`DedupeStore.conflicts` returns them (and both backends select them).
CONFLICT_COLUMNS: tuple[str, ...] = (
    "key", "message_id", "fingerprint", "stored_fingerprint", "source", "seen_at",
)  # fmt: skip
CONFLICT_LIST = ", ".join(CONFLICT_COLUMNS)


def dump_outcome(outcome: Outcome) -> str:
    """The outcome as stored: JSON text (SQLite keeps it as TEXT, PostgreSQL casts it to jsonb)."""
    return orjson.dumps(outcome.to_json()).decode()


def load_outcome(raw: str | bytes | None) -> Outcome | None:
    """The stored JSON text (or bytes) back to an :class:`Outcome`; NULL or empty is no outcome."""
    return Outcome.from_json(orjson.loads(raw)) if raw else None


def record_from_row(row: Sequence[Any], *, outcome: Callable[[Any], Outcome | None] = load_outcome) -> Record:
    """A row whose first values are :data:`COLUMNS`, in order, as a :class:`Record`. ``outcome`` converts
    the backend's stored outcome value (JSON text by default)."""
    values = [row[i] for i in range(len(COLUMNS))]
    values[_STATE_INDEX] = State(values[_STATE_INDEX])
    values[_OUTCOME_INDEX] = outcome(values[_OUTCOME_INDEX])
    return Record(*values)


# -- one claim rule ----------------------------------------------------------------------------------------


class Decision(enum.Enum):
    """What a claim does with the record it found (see :func:`decide_claim`)."""

    ACQUIRE_NEW = "acquire_new"  # no record: insert one, ACQUIRED
    TAKE_OVER = "take_over"  # RELEASED, or an expired lease: compare-and-set it to ours, ACQUIRED
    REENTER = "reenter"  # our own live lease whose claim's answer was lost: renew it, ACQUIRED
    DONE = "done"  # COMPLETED or FAILED: never call again
    BUSY = "busy"  # someone's live lease (or ours, held by another caller of this process)
    CONFLICT = "conflict"  # the stored fingerprint is another request's

    @property
    def status(self) -> ClaimStatus:
        """The claim's answer: ACQUIRED for the three that write, else the decision itself."""
        return _DECISION_STATUS[self]


_DECISION_STATUS = {
    Decision.ACQUIRE_NEW: ClaimStatus.ACQUIRED,
    Decision.TAKE_OVER: ClaimStatus.ACQUIRED,
    Decision.REENTER: ClaimStatus.ACQUIRED,
    Decision.DONE: ClaimStatus.DONE,
    Decision.BUSY: ClaimStatus.BUSY,
    Decision.CONFLICT: ClaimStatus.CONFLICT,
}


def decide_claim(
    existing: Record | None, *, fingerprints: Collection[str], owner: str, now: float, reentrant: bool
) -> Decision:
    """The claim rule, for every backend (and the replay tool's dry run): what a claim by ``owner`` at
    ``now`` does with the stored record ``existing``.

    The fingerprint is checked first, on every path that could return a stored outcome (PITFALLS:
    powertools #3781). A live lease is taken over never; an expired one or a RELEASED record always (the
    backend's write repeats those conditions as its compare-and-set). With ``reentrant`` (no caller of
    this process holds or is claiming the key), ``owner``'s own live lease is re-entered: an earlier
    claim's answer was lost.
    """
    if existing is None:
        return Decision.ACQUIRE_NEW
    if existing.fingerprint not in fingerprints:
        return Decision.CONFLICT
    if existing.state in (State.COMPLETED, State.FAILED):
        return Decision.DONE
    if existing.state is State.IN_PROGRESS and (existing.lease_until or 0.0) > now:
        return Decision.REENTER if reentrant and existing.owner == owner else Decision.BUSY
    return Decision.TAKE_OVER


Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One claim as a backend receives it (:meth:`DedupeStore._claim`). ``fingerprints[0]`` is stored in a
    new record; a stored fingerprint equal to any of them is the same request. ``reentrant``: no caller
    of this process holds or is claiming the key (see :func:`decide_claim`)."""

    key: str
    message_id: str
    operation: str
    fingerprints: tuple[str, ...]
    owner: str
    lease_s: float
    retention_s: float
    reentrant: bool

    def decide(self, existing: Record | None, now: float) -> Decision:
        """:func:`decide_claim` for this claim."""
        return decide_claim(
            existing, fingerprints=self.fingerprints, owner=self.owner, now=now, reentrant=self.reentrant
        )


def empty_counts() -> dict[str, int]:
    """Records per state with every state present (what :meth:`DedupeStore.counts` starts from)."""
    return {state.value: 0 for state in State}


class Durable(abc.ABC):
    """A store opened before use and closed after (``async with store:``): the dedupe store and the
    workflow store share this lifecycle."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class DedupeStore(Durable):
    """Abstract dedupe store. Backends: :mod:`consumer.store.sqlite`, chosen by URL in :func:`open_store`.

    Every method is a single atomic transition; a method returning normally means its effect is durable.
    Methods raising :class:`~consumer.errors.LeaseLost` changed nothing.
    """

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        # This store object's view of its own callers (event-loop side only), which makes a claim whose
        # answer was lost re-entrant without letting two handlers hold one key (see the module docstring):
        # claims of a key running right now, and the owner that holds a key (got ACQUIRED, has not yet
        # completed or released it, nor lost it).
        self._claiming: dict[str, int] = {}
        self._held: dict[str, str] = {}

    def _claim_started(self, key: str) -> bool:
        """Count a claim of ``key`` in progress; True when no other claim or holder of ``key`` exists in
        this process, i.e. a live lease of our own owner found by this claim is one whose answer was lost."""
        n = self._claiming.get(key, 0)
        self._claiming[key] = n + 1
        return n == 0 and key not in self._held

    def _claim_finished(self, key: str, owner: str, claim: Claim | None) -> None:
        n = self._claiming.get(key, 0) - 1
        if n > 0:
            self._claiming[key] = n
        else:
            self._claiming.pop(key, None)
        if claim is not None and claim.status is ClaimStatus.ACQUIRED:
            self._held[key] = owner

    def _hold_ended(self, key: str, owner: str) -> None:
        if self._held.get(key) == owner:
            del self._held[key]

    @contextlib.contextmanager
    def _ending_hold(self, key: str, owner: str, *, on_success: bool = True) -> Iterator[None]:
        """The hold of ``key`` by ``owner`` ends when the transition inside raises LeaseLost, and (with
        ``on_success``) when it succeeds."""
        try:
            yield
        except LeaseLost:
            self._hold_ended(key, owner)
            raise
        if on_success:
            self._hold_ended(key, owner)

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
        legacy_fingerprints: Sequence[str] = (),
    ) -> Claim:
        """Insert an IN_PROGRESS record owned by ``owner``, or report why not.

        CONFLICT when the stored fingerprint is neither ``fingerprint`` nor one of ``legacy_fingerprints``
        (the same request in older schemes), checked on every path. ACQUIRED for a new key, a released one,
        an expired lease, or a live lease of ``owner`` itself that no caller in this process holds (its
        claim's answer was lost). DONE for completed or failed, BUSY for a live lease of someone else.
        """
        reentrant = self._claim_started(key)
        result: Claim | None = None
        try:
            request = ClaimRequest(
                key, message_id, operation, (fingerprint, *legacy_fingerprints), owner, lease_s, retention_s,
                reentrant,
            )  # fmt: skip
            result = await self._claim(request=request)
            return result
        finally:
            self._claim_finished(key, owner, result)

    @abc.abstractmethod
    async def _claim(self, *, request: ClaimRequest) -> Claim:
        """The backend's claim, as :meth:`ClaimRequest.decide` rules. With ``request.reentrant``, a live
        IN_PROGRESS lease of the owner with a matching fingerprint is renewed and ACQUIRED (attempts
        unchanged) instead of BUSY."""

    async def complete(self, key: str, owner: str, outcome: Outcome, *, failed: bool = False) -> Record:
        """IN_PROGRESS(owner) → COMPLETED (or FAILED when ``failed``); returns the stored record.

        Raises LeaseLost otherwise."""
        with self._ending_hold(key, owner):
            return await self._complete(key, owner, outcome, failed=failed)

    async def release(self, key: str, owner: str, error: str) -> None:
        """IN_PROGRESS(owner) → RELEASED, keeping attempts and the error code; raises LeaseLost otherwise."""
        with self._ending_hold(key, owner):
            await self._release(key, owner, error)

    async def renew(self, key: str, owner: str, lease_s: float) -> None:
        """Extend our lease; raises LeaseLost if the record is no longer ours."""
        with self._ending_hold(key, owner, on_success=False):
            await self._renew(key, owner, lease_s)

    @abc.abstractmethod
    async def _complete(self, key: str, owner: str, outcome: Outcome, *, failed: bool) -> Record: ...

    @abc.abstractmethod
    async def _release(self, key: str, owner: str, error: str) -> None: ...

    @abc.abstractmethod
    async def _renew(self, key: str, owner: str, lease_s: float) -> None: ...

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
        """Delete records past their retention; returns how many. Never touches IN_PROGRESS records.

        Conflict log entries (``idempotency_conflicts``) go with their record: those whose key no longer
        has a record are deleted in the same run."""
