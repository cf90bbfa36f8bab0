"""One message's journey: decode → key → fingerprint → claim → provider → record.

The order is what makes exactly-once hold (see docs/guarantees.md):

* **Claim before call.** The provider is called only by the holder of the key's lease. A redelivered
  message whose key is COMPLETED or FAILED is answered from the store and never sent again; one whose
  fingerprint differs is a conflict and never sent at all.
* **Record before commit.** :meth:`Processor.handle` returns only after the outcome is durably in the
  store; the daemon marks the offset done only then, and commits only up to the lowest offset not yet
  done (:mod:`consumer.offsets`).
* **Same key on every attempt.** If the process dies after the provider performed the side effect but
  before the record, the lease runs out, the message is redelivered (its offset was never committed),
  and the next claimant calls again with the same key. Where the provider dedupes by
  ``Idempotency-Key`` it replays its stored response instead of acting twice.
* **Reconcile before resending where the provider does not dedupe** (``didit``). A record claimed before
  (attempts > 1) may already have acted at the provider: before sending, the adapter looks the earlier
  attempt up by our reference (carried in the request) and that answer is recorded, with no call. The
  same happens before a retry after an attempt that may have reached the provider. Without a lookup, or
  when it keeps failing, the message is dead-lettered ``in_doubt`` instead (consumer/providers/reconcile.py).
* **Never delete on error.** A failed attempt releases the lease and keeps the record and its attempt
  count (PITFALLS: powertools #801).
* **One live owner per key.** Every attempt has a hard total deadline below the lease; before an attempt
  the lease is made sure to cover that deadline plus slack, and while the call waits between attempts
  (an open circuit breaker, backoff, ``Retry-After``) it is renewed every third of the lease. A lease
  lost anyway (the store stalled, the process paused) ends the call before its next attempt; the loser
  then waits for the other owner's outcome, or for its lease to run out, and never takes the key
  straight back.
* **A request that may be at the provider keeps its key.** Once a request may have left without a
  complete answer (timeout, dropped connection, cancellation by a rebalance or shutdown), the key is not
  released: it becomes claimable only when the lease runs out, so no second owner calls while the
  provider may still be working on the first request. Before the first byte was sent, release is fine.
* **In doubt is not failed.** An answer meaning "this key was used for a different request" (422
  ``idempotency_key_reused``), or an unfinished record older than the provider's key retention, is
  dead-lettered ``in_doubt`` and left RELEASED with ``last_error = "in_doubt"``; never recorded FAILED.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from aiokafka.structs import ConsumerRecord

from consumer import tracing
from consumer.claims import KeyClaims
from consumer.documents import DocumentError, document_dead_letter
from consumer.errors import (
    LeaseLost,
    ProviderAuthError,
    ProviderConfigError,
    ProviderInDoubt,
    RetriesExhausted,
)
from consumer.faults import FaultPoints
from consumer.keys import Fingerprinter, idempotency_key, key_hash
from consumer.logs import message_context
from consumer.model import DeadLetter, Disposition, Handled, Stats
from consumer.provider import CallProgress, CallResult, ProviderClient
from consumer.settings import LEASE_SLACK_S
from consumer.store.base import DedupeStore, Record
from consumer.unreadable import UnreadableRecord, decode_record
from consumer.workflows.model import WORKFLOW_OPERATION
from producer.envelope import Envelope, Operation, get_operation
from producer.errors import EnvelopeError

if TYPE_CHECKING:
    from consumer.documents import DocumentSource
    from consumer.workflows.engine import WorkflowEngine

log = logging.getLogger(__name__)

# Disposition, Handled and Stats are re-exported for older callers (consumer/replay.py).
__all__ = ["Disposition", "Handled", "Processor", "Stats"]


class Processor:
    def __init__(
        self,
        *,
        store: DedupeStore,
        provider: ProviderClient,
        owner: str,
        namespace: str,
        lease_s: float,
        retention_s: float,
        max_message_bytes: int,
        faults: FaultPoints | None = None,
        stats: Stats | None = None,
        want_records: bool = False,
        on_store_op: Callable[[str, float], None] | None = None,
        fingerprint_key: str | bytes | None = None,
        provider_key_retention_s: float = 24 * 3600.0,
        ignore_key_retention: bool = False,
        documents: DocumentSource | None = None,
    ) -> None:
        # Where document references in requests are fetched from (consumer/documents.py); None: none.
        self.documents = documents
        # Keyed (HMAC) fingerprints with the key; None keeps legacy unkeyed ones (benchmarks, old tools).
        self.fingerprints = Fingerprinter(fingerprint_key)
        # An unfinished, already-sent record older than this is not sent again (the provider may have
        # forgotten its key); ignore_key_retention is redrive --force's deliberate override.
        self.provider_key_retention_s = provider_key_retention_s
        self.ignore_key_retention = ignore_key_retention
        self.want_records = want_records
        # Claims, renewals and releases of keys, each store call retried until it succeeds (claims.py).
        self.claims = KeyClaims(
            store=store, owner=owner, lease_s=lease_s, retention_s=retention_s, on_store_op=on_store_op
        )
        self.store = store
        self.provider = provider
        self.owner = owner
        self.namespace = namespace
        self.lease_s = lease_s
        self.max_message_bytes = max_message_bytes
        self.faults = faults or FaultPoints()
        self.stats = stats or Stats()
        # The workflow engine (consumer/workflows/), attached by the daemon: kyc_workflow requests and the
        # provider events topic go there instead of the one-call path below.
        self.workflows: WorkflowEngine | None = None

    async def aclose(self) -> None:
        """Close the document sources (an HTTP document store's connection pool)."""
        close = getattr(self.documents, "aclose", None)
        if close is not None:
            await close()

    @property
    def store_failing(self) -> bool:
        """The last store operation failed (readiness)."""
        return self.claims.store_failing

    async def handle_safely(self, msg: ConsumerRecord, *, generation: int = 0) -> Handled:
        """:meth:`handle`, except that an unexpected exception (a bug meeting this message) dead-letters
        the message as ``internal_error`` instead of propagating; a rejected API key still propagates."""
        try:
            return await self.handle(msg, generation=generation)
        except ProviderAuthError:
            raise
        except DocumentError as exc:
            # Safety net: a referenced document that could not be used (consumer/documents.py) is set aside
            # under its own reason (document_missing, ...), not as internal_error; handle() let the key go.
            log.error("document unusable; message set aside: %s", exc, extra={"reason": exc.reason})
            self.stats.consumed += 1
            self.stats.count(Disposition.SET_ASIDE)
            return Handled(Disposition.SET_ASIDE, document_dead_letter(exc))
        except Exception as exc:  # noqa: BLE001 - one message hitting a bug must not stop the consumer
            # Any lease was released by handle(); the message is set aside with its original bytes.
            log.error(
                "unexpected %s while handling a message; dead-lettering it",
                type(exc).__name__,
                extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
            )
            self.stats.consumed += 1
            self.stats.count(Disposition.ERROR)
            letter = DeadLetter("internal_error", f"{type(exc).__name__} in the consumer (see its logs)")
            return Handled(Disposition.ERROR, letter)

    async def handle(self, msg: ConsumerRecord, *, generation: int = 0) -> Handled:
        """Process one record; ``generation`` > 0 re-verifies under a new, derived key (replay tool)."""
        token = message_context.set({"topic": msg.topic, "partition": msg.partition, "offset": msg.offset})
        try:
            handled = await self._handle(msg, generation)
        finally:
            message_context.reset(token)
        self.stats.consumed += 1
        self.stats.count(handled.disposition)
        return handled

    async def _handle(self, msg: ConsumerRecord, generation: int) -> Handled:
        if self.workflows is not None and msg.topic == self.workflows.events_topic:
            if not isinstance(msg, UnreadableRecord):  # a stub is set aside below, like a request's
                return await self.workflows.handle_event(msg)
        try:
            envelope = decode_record(msg, max_bytes=self.max_message_bytes)
        except EnvelopeError as exc:
            self.stats.invalid_by_reason[exc.reason] = self.stats.invalid_by_reason.get(exc.reason, 0) + 1
            log.warning(
                "invalid message set aside: %s: %s", exc.reason, exc.detail, extra={"reason": exc.reason}
            )
            return Handled(Disposition.INVALID, DeadLetter(exc.reason, exc.detail))

        if envelope.operation == WORKFLOW_OPERATION:
            ctx = message_context.get() or {}
            message_context.set({**ctx, "message_id": envelope.message_id})
            if self.workflows is None:
                letter = DeadLetter("internal_error", "kyc_workflow needs the workflow engine (the daemon's)")
                return Handled(Disposition.ERROR, letter)
            return await self.workflows.handle_request(envelope, msg)
        operation = get_operation(envelope.operation)
        key = idempotency_key(self.namespace, envelope.operation, envelope.message_id, generation)
        fp, legacy_fps = self.fingerprints.with_legacy(envelope)
        ctx = message_context.get() or {}
        message_context.set({**ctx, "message_id": envelope.message_id, "key_hash": key_hash(key)})
        tracing.annotate(envelope.operation, key)

        self.faults.hit("before_claim")
        source = f"{msg.topic}/{msg.partition}@{msg.offset}"
        claimed = await self.claims.claim(envelope, key, fp, legacy_fps, source)
        if isinstance(claimed, Handled):
            return claimed

        self.faults.hit("after_claim")
        if (
            claimed.attempts > 1
            and self.provider.adapter.capability(envelope.operation).by_key
            and not self.ignore_key_retention
            and self.store.clock() - claimed.created_at > self.provider_key_retention_s
        ):
            # Taken over after earlier attempts, and older than the provider keeps keys: a new attempt could
            # act a second time if the provider forgot the key. An operator decides (redrive --force).
            await self.claims.release(key, "in_doubt")
            log.error("unfinished record older than the provider's key retention; not sent again (in doubt)")
            letter = DeadLetter(
                "in_doubt",
                f"unfinished after {claimed.attempts - 1} earlier claim(s) and older than the provider's key "
                f"retention ({self.provider_key_retention_s:g}s): a new attempt may act twice; not sent",
                attempts=claimed.attempts - 1,
                first_failure_at=claimed.created_at,
            )
            return Handled(Disposition.IN_DOUBT, letter)
        progress = CallProgress()
        try:
            result = await self._call(operation, envelope, key, claimed, progress)
        except (RetriesExhausted, ProviderInDoubt) as exc:
            # Retries exhausted: set aside, the key released for a redrive. In doubt is not FAILED: the
            # provider may have acted under this key for the earlier body (422 key reused), or an earlier
            # attempt may have acted and could not be looked up (UnreconciledAttempt). The record stays
            # unfinished (RELEASED, last_error in_doubt) and the message goes to an operator.
            doubt = isinstance(exc, ProviderInDoubt)
            reason = "in_doubt" if doubt else "retries_exhausted"
            await self.claims.let_go(key, reason, progress)
            what = "outcome in doubt, not sent again" if doubt else "provider kept failing; message set aside"
            log.error("%s: %s", what, exc)
            letter = DeadLetter(reason, str(exc), attempts=exc.attempts, first_failure_at=claimed.created_at)
            return Handled(Disposition.IN_DOUBT if doubt else Disposition.SET_ASIDE, letter)
        except DocumentError as exc:
            # A referenced document cannot be used (consumer/documents.py): nothing reached the provider
            # (opened before sending, or the upload cut short), so the key is released; an operator
            # restores the document and redrives under the same key.
            await self.claims.let_go(key, exc.reason, progress)
            log.error("document unusable; message set aside: %s", exc, extra={"reason": exc.reason})
            letter = document_dead_letter(exc, attempts=progress.sent, first_failure_at=claimed.created_at)
            return Handled(Disposition.SET_ASIDE, letter)
        except ProviderConfigError:
            await self.claims.let_go(key, "provider_config", progress)
            raise
        except ProviderAuthError:
            await self.claims.let_go(key, "provider_auth", progress)
            raise
        except LeaseLost:
            log.warning("lease lost; waiting for the other owner's outcome instead of taking the key back")
            await self.claims.await_other_owner(key)
            return await self._handle(msg, generation)
        except BaseException:
            # Cancelled (rebalance bound or shutdown) or a bug. Before anything was sent the key is handed
            # back at once; once a request may be at the provider it is kept until its lease runs out.
            with anyio.CancelScope(shield=True):
                await self.claims.let_go(key, "abandoned", progress)
            raise
        self.faults.hit("after_provider_call")
        try:
            stored = await self.claims.call(
                "complete",
                self.store.complete,
                key,
                self.owner,
                result.outcome,
                failed=result.terminal_failure,
            )
        except LeaseLost:
            # Our lease ran out during the call and someone took the key over. They call with the same key
            # and record the outcome; wait for it, then start again, which ends as DUPLICATE.
            log.warning("lease lost while calling the provider; waiting for the other owner's outcome")
            await self.claims.await_other_owner(key)
            return await self._handle(msg, generation)
        self.faults.hit("after_record")
        log.info(
            "outcome recorded: %s %s",
            envelope.operation,
            result.outcome.status,
            extra={"status": result.outcome.status, "attempts": result.attempts},
        )
        disposition = Disposition.FAILED if result.terminal_failure else Disposition.COMPLETED
        return Handled(
            disposition, record=stored if self.want_records else None, subject_id=envelope.subject_id
        )

    async def _call(
        self, operation: Operation, envelope: Envelope, key: str, claimed: Record, progress: CallProgress
    ) -> CallResult:
        """The provider call under a lease that never runs out while we are calling or waiting to call.

        An attempt is bounded by the provider's hard deadline, and starts only with at least that deadline
        plus :data:`LEASE_SLACK_S` left on the lease (renewed before every retry, and before the first
        when the claim's lease no longer covers it). Between attempts — an open circuit breaker, backoff,
        ``Retry-After`` — the lease is renewed every third of it. Each renewal is a compare-and-set:
        :class:`LeaseLost` if another owner has the key, and then no further attempt is made. No renewer
        task runs beside the call: nothing can outlast the lease while the process is alive. Lookups of a
        reconciliation (before a resend to a provider without idempotency keys) make sure of it the same way.
        """
        held = claimed.lease_until if claimed.lease_until is not None else self.store.clock() + self.lease_s
        cover = self.provider.timeout_s + LEASE_SLACK_S

        async def renew() -> None:
            nonlocal held
            now = self.store.clock()
            await self.claims.call("renew", self.store.renew, key, self.owner, self.lease_s)
            held = now + self.lease_s

        async def ensure_lease() -> None:
            if held - self.store.clock() < cover:
                await renew()

        async def before_attempt(attempt: int) -> None:
            # Every retry renews (which also finds out if the key was lost meanwhile). The first attempt
            # renews only if the claim's lease no longer covers it (a long wait in the circuit breaker):
            # right after the claim it is fresh, and the hot path saves a store write.
            if attempt > 1:
                await renew()
            else:
                await ensure_lease()

        with tracing.span("idv.provider"):
            return await self.provider.call_envelope(
                operation,
                envelope,
                key,
                documents=self.documents,
                earlier_claims=claimed.attempts > 1,
                since=claimed.created_at,
                force=self.ignore_key_retention,
                before_attempt=before_attempt,
                ensure_lease=ensure_lease,
                progress=progress,
                keep_alive=renew,
                keep_alive_every_s=self.lease_s / 3,
            )
