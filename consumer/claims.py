"""One message's side of the dedupe store: store calls retried until they succeed, the claim loop, letting go.

:class:`KeyClaims` is what :class:`consumer.pipeline.Processor` claims, renews, releases and waits through.
The claim loop turns the store's answer into the next step: a CONFLICT is recorded and dead-lettered, a
DONE key is a duplicate answered from the store, a BUSY key (another consumer holds a live lease) is
waited on, never called concurrently; only ACQUIRED goes on to the provider.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from consumer import tracing
from consumer.errors import LeaseLost, StoreError
from consumer.model import ClaimStatus, Disposition, Handled, Record, State, conflict
from consumer.providers.calls import CallProgress
from consumer.store.base import DedupeStore
from producer.envelope import Envelope
from producer.errors import VerificationError

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["KeyClaims"]

_STORE_RETRY_MAX_S = 5.0


@dataclass(slots=True, kw_only=True)
class KeyClaims:
    store: DedupeStore
    owner: str
    lease_s: float
    retention_s: float
    on_store_op: Callable[[str, float], None] | None = None
    store_failing: bool = field(default=False, init=False)  # the last store operation failed (readiness)

    async def call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Retry a store operation until it succeeds: the message waits, nothing is committed past it.

        What is retried is what says so (``retriable``, a :class:`StoreError`); anything else, such as
        :class:`~consumer.errors.LeaseLost`, is the caller's to handle."""
        delay = 0.05
        while True:
            started = time.perf_counter()
            try:
                with tracing.store_span(what):
                    result = await fn(*args, **kwargs)
            except VerificationError as exc:
                if not exc.retriable:
                    raise
                self.store_failing = True
                log.warning("dedupe store %s failed (%s); retrying in %.2fs", what, exc, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, _STORE_RETRY_MAX_S)
            else:
                self.store_failing = False
                if self.on_store_op is not None:
                    self.on_store_op(what, time.perf_counter() - started)
                return result

    async def claim(
        self, envelope: Envelope, key: str, fp: str, legacy_fps: tuple[str, ...], source: str
    ) -> Record | Handled:
        """The acquired record, or how the message ends without a call (conflict, duplicate)."""
        while True:
            claim = await self.call(
                "claim",
                self.store.claim,
                key=key,
                message_id=envelope.message_id,
                operation=envelope.operation,
                fingerprint=fp,
                owner=self.owner,
                lease_s=self.lease_s,
                retention_s=self.retention_s,
                legacy_fingerprints=legacy_fps,
            )
            status, record = claim.status, claim.record
            if status is ClaimStatus.CONFLICT:
                await self.call(
                    "record_conflict",
                    self.store.record_conflict,
                    key=key,
                    message_id=envelope.message_id,
                    fingerprint=fp,
                    stored_fingerprint=record.fingerprint,
                    source=source,
                )
                log.warning("idempotency conflict: message ID reused with a different payload; not sent")
                detail = "message ID already used with a different payload (fingerprint differs); not sent"
                return conflict(detail, record.created_at)
            if status is ClaimStatus.DONE:
                log.info("duplicate skipped: already %s", record.state.value)
                return Handled(Disposition.DUPLICATE, record=record, subject_id=envelope.subject_id)
            if status is ClaimStatus.ACQUIRED:
                return record
            # BUSY: another consumer holds a live lease (e.g. the partition moved while its call was in
            # flight). Wait for it to finish or for its lease to run out; never call concurrently.
            wait = max(0.05, min(1.0, (record.lease_until or 0.0) - self.store.clock()))
            log.debug("key busy under another owner; waiting %.2fs", wait)
            await anyio.sleep(wait)

    async def await_other_owner(self, key: str) -> None:
        """After LeaseLost: poll until the other owner finished (or released) the key or its lease ran out."""
        while True:
            record = await self.call("get", self.store.get, key)
            if record is None or record.state is not State.IN_PROGRESS or record.owner == self.owner:
                return
            left = (record.lease_until or 0.0) - self.store.clock()
            if left <= 0:
                return
            await anyio.sleep(max(0.05, min(1.0, left)))

    async def let_go(self, key: str, error: str, progress: CallProgress) -> None:
        """Release the key, unless a request may still be at the provider: then the lease runs out on its
        own (the record stays IN_PROGRESS until then) and only after that may another owner call."""
        if progress.live:
            log.warning(
                "a request may still be at the provider (%s); the key is kept until its lease expires", error
            )
            return
        await self.release(key, error)

    async def release(self, key: str, error: str) -> None:
        try:
            await self.store.release(key, self.owner, error)
        except (LeaseLost, StoreError) as exc:
            # Not fatal: the lease expires on its own; the record stays (never deleted on error).
            log.warning("could not release the lease (%s); it will expire", exc)
