"""How one workflow step runs exactly once: claim the step's key, call the provider, record the outcome.

:class:`StepRunner` runs a mutating step under the dedupe store's lease rules, exactly like the pipeline
runs a request: the step's own idempotency key (:func:`~consumer.workflows.model.step_key`) is claimed
first, the provider is called only by the lease holder (the lease renewed while it waits), the outcome
is completed in the store before the workflow row moves on. A step whose record is already COMPLETED or
FAILED is answered from the store and never sent again (a crash after the record but before the
workflow's transition). What a step sends is :mod:`consumer.workflows.steps`' business.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable

import anyio

from consumer.claims import KeyClaims
from consumer.errors import ConsumerError, LeaseLost, ProviderInDoubt, RetriesExhausted
from consumer.model import ClaimStatus, Outcome, Record, State
from consumer.provider import CallResult
from consumer.store.base import DedupeStore
from consumer.workflows.model import Workflow

log = logging.getLogger(__name__)

__all__ = ["KeepAlive", "StepFailed", "StepRunner"]

KeepAlive = Callable[[], Awaitable[None]]


class StepFailed(ConsumerError):
    """A step could not be completed now (retries exhausted, lease lost); its record keeps the key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class StepRunner:
    """One step under its own key and the dedupe store's lease (see the module docstring)."""

    def __init__(self, records: DedupeStore, *, owner: str, lease_s: float, retention_s: float) -> None:
        self.records = records
        self.owner = owner
        self.lease_s = lease_s
        self.retention_s = retention_s
        # dedupe-store calls retried as the pipeline's are (retriable errors wait, anything else is raised)
        self._store = KeyClaims(store=records, owner=owner, lease_s=lease_s, retention_s=retention_s).call

    async def run(
        self,
        key: str,
        wf: Workflow,
        step: str,
        call: Callable[[KeepAlive, Record], Awaitable[CallResult]],
    ) -> Outcome:
        operation = f"kyc_workflow/{step}"
        # The step's record fingerprints the workflow's request and the step (never personal data).
        fp = "wf1:" + hashlib.sha256(f"{wf.fingerprint}\x1f{step}".encode()).hexdigest()
        while True:
            claim = await self._store(
                "claim", self.records.claim,
                key=key, message_id=wf.request_id, operation=operation, fingerprint=fp,
                owner=self.owner, lease_s=self.lease_s, retention_s=self.retention_s,
            )  # fmt: skip
            record: Record = claim.record
            if claim.status is ClaimStatus.DONE and record.outcome is not None:
                return record.outcome
            if claim.status is ClaimStatus.CONFLICT:
                raise StepFailed("idempotency_conflict", "the step's key holds another request")
            if claim.status is ClaimStatus.ACQUIRED:
                break
            await anyio.sleep(max(0.05, min(1.0, (record.lease_until or 0.0) - self.records.clock())))

        async def renew() -> None:
            await self._store("renew", self.records.renew, key, self.owner, self.lease_s)

        try:
            result = await call(renew, record)
        except RetriesExhausted as exc:
            # Not released: an attempt may still be at the provider. The lease runs out on its own.
            raise StepFailed("retries_exhausted", str(exc)) from exc
        except LeaseLost as exc:
            raise StepFailed("retries_exhausted", "lease lost during the step") from exc
        except ProviderInDoubt as exc:
            # An earlier attempt may have acted and could not be found: an operator decides (dead letter
            # in_doubt); the key is kept, never sent again automatically.
            raise StepFailed("in_doubt", str(exc)) from exc
        # Anything else (cancelled, a rejected API key, a bug) propagates: the request may be at the
        # provider, so the key is kept until its lease runs out (the next claimant calls with the same key).
        try:
            stored = await self._store(
                "complete", self.records.complete, key, self.owner, result.outcome,
                failed=result.terminal_failure,
            )  # fmt: skip
        except LeaseLost as exc:
            raise StepFailed(
                "retries_exhausted", "lease lost before the step's outcome was recorded"
            ) from exc
        done: Record = stored
        assert done.state in (State.COMPLETED, State.FAILED) and done.outcome is not None
        return done.outcome
