"""Re-verification: run completed (``--reverify``) or failed (``--retry-failed``) requests again on purpose,
under a new key generation (``idempotency_key(..., generation=N)``), with an audit line written and
fsync'd *before* each provider call (the audit file, JSON Lines; docs/replay.md)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from aiokafka.structs import ConsumerRecord

from consumer.delivery import deliver
from consumer.errors import ProviderAuthError
from consumer.keys import Fingerprinter, idempotency_key
from consumer.logs import log_unexpected
from consumer.pipeline import Disposition, Processor
from consumer.settings import Settings
from consumer.sinks import Sinks
from consumer.store import DedupeStore, Record, State
from consumer.tools.runner import Run
from consumer.unreadable import decode_record
from consumer.workflows.model import FINAL_STATES, WORKFLOW_OPERATION, Step, WState, generation_id, step_key
from producer.envelope import Envelope
from producer.errors import EnvelopeError

if TYPE_CHECKING:
    from consumer.tools.replay import ReplayRequest

log = logging.getLogger(__name__)

__all__ = ["Reverifier", "operator_name"]


class Reverifier:
    """Run completed requests again under generation N ≥ 1 of their key.

    N is one more than the highest generation already *finished* for the message. If the highest one is
    unfinished (RELEASED after failures, or IN_PROGRESS after a crash) it is reused, not skipped: the
    provider may already have acted on that key, and a new key on retry would defeat its idempotency.

    The audit line is written and fsync'd before the provider is called, so every billable call has one.
    """

    def __init__(
        self, settings: Settings, store: DedupeStore, processor: Processor, req: ReplayRequest
    ) -> None:
        self.settings = settings
        self.store = store
        self.processor = processor
        self.req = req
        self.seen: set[str] = set()
        self._audit_lock = anyio.Lock()

    async def generation(self, operation: str, message_id: str) -> tuple[int, str]:
        ns = self.settings.namespace
        gen = 0
        while True:
            record = await self.store.get(idempotency_key(ns, operation, message_id, generation=gen + 1))
            if record is None:
                break
            gen += 1
            if record.state in (State.IN_PROGRESS, State.RELEASED):
                return gen, idempotency_key(ns, operation, message_id, generation=gen)
        return gen + 1, idempotency_key(ns, operation, message_id, generation=gen + 1)

    async def latest(self, operation: str, message_id: str, base: Record | None) -> Record | None:
        """The record of the highest key generation of the message (``base`` is generation 0)."""
        if base is None:
            return None
        ns, gen, latest = self.settings.namespace, 0, base
        while True:
            gen += 1
            record = await self.store.get(idempotency_key(ns, operation, message_id, generation=gen))
            if record is None:
                return latest
            latest = record

    async def audit(self, entry: dict[str, Any]) -> None:
        line = orjson.dumps(entry) + b"\n"
        path = self.req.audit_file

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())

        async with self._audit_lock:
            await anyio.to_thread.run_sync(write)

    def handler(self, run: Run, sinks: Sinks) -> Callable[[ConsumerRecord], Awaitable[None]]:
        async def handle(msg: ConsumerRecord) -> None:
            try:
                outcome, reason = await self.one(msg, sinks)
            except ProviderAuthError as exc:
                run.fatal(exc)
                return
            except Exception as exc:  # noqa: BLE001 - one message hitting a bug must not stop the run
                log_unexpected(log, exc, msg, "re-verifying a message")
                outcome, reason = "internal error", None
            run.count(outcome, reason)

        return handle

    async def one(self, msg: ConsumerRecord, sinks: Sinks) -> tuple[str, str | None]:
        settings = self.settings
        try:
            envelope = decode_record(msg, max_bytes=settings.max_message_bytes)
        except EnvelopeError as exc:
            return "invalid (skipped)", exc.reason
        base_key = idempotency_key(settings.namespace, envelope.operation, envelope.message_id)
        if base_key in self.seen:
            return "duplicate in range (skipped)", None
        self.seen.add(base_key)  # before any await: two copies of one request never both run
        if envelope.operation == WORKFLOW_OPERATION and self.processor.workflows is not None:
            return await self.one_workflow(msg, envelope, sinks)
        base = await self.store.get(base_key)
        matches = Fingerprinter(settings.fingerprint_key).matches
        if self.req.retry_failed:
            latest = await self.latest(envelope.operation, envelope.message_id, base)
            if latest is None or not matches(latest.fingerprint, envelope):
                return ("not failed (skipped)" if latest is None else "conflict (skipped)"), None
            # FAILED: a new generation. An unfinished generation >= 1 (an earlier retry interrupted) is
            # resumed under its own key by generation(); anything else was not a failure.
            resumable = latest is not base and latest.state in (State.IN_PROGRESS, State.RELEASED)
            if latest.state is not State.FAILED and not resumable:
                return "not failed (skipped)", None
        else:
            if base is None or base.state is not State.COMPLETED:
                return "not completed (skipped)", None
            if not matches(base.fingerprint, envelope):
                return "conflict (skipped)", None
        gen, key = await self.generation(envelope.operation, envelope.message_id)
        await self.audit(self._entry(msg, envelope, gen, key))
        # Claim → call → record by the same pipeline as the daemon, under the generation-N key.
        handled = await self.processor.handle_safely(msg, generation=gen)
        if handled.disposition is Disposition.DUPLICATE:
            return "already reverified (same generation)", None
        if handled.disposition is Disposition.CONFLICT:
            return "conflict (skipped)", None
        if handled.disposition is Disposition.SET_ASIDE:
            return "set aside (retries exhausted)", None
        if handled.disposition is Disposition.IN_DOUBT:
            if handled.dead_letter is not None and self.req.dead_letters:
                await sinks.dead_letter(msg, handled.dead_letter, time.time())
            return "in doubt (dead-lettered)", None
        if handled.disposition is Disposition.ERROR:
            return "internal error", None
        if handled.record is not None and sinks.results_topic is not None:
            await sinks.result(handled.record, msg.key, envelope.subject_id)
        done = "retried" if self.req.retry_failed else "reverified"
        if handled.disposition is Disposition.FAILED:
            return f"{done}: failed (provider 4xx)", None
        return done, None

    def _entry(self, msg: ConsumerRecord, envelope: Envelope, gen: int, key: str) -> dict[str, Any]:
        return {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "mode": "retry_failed" if self.req.retry_failed else "reverify",
            "operator": self.req.operator,
            "reason": self.req.reason,
            "message_id": envelope.message_id,
            "operation": envelope.operation,
            "generation": gen,
            "key": key,
            "source": f"{msg.topic}/{msg.partition}@{msg.offset}",
        }

    # -- workflows -------------------------------------------------------------------------------------

    async def one_workflow(
        self, msg: ConsumerRecord, envelope: Envelope, sinks: Sinks
    ) -> tuple[str, str | None]:
        """A ``kyc_workflow`` again: a new row ``<message ID>#gen<N>`` with a new key for every step.

        N follows the single-operation rule on the generations' rows: one more than the highest, unless
        that one is unfinished (no final decision yet, e.g. still waiting for the applicant): then it is
        resumed from its recovery point, never a second new one. One audit line per mutating step (its
        key) is fsync'd before the generation's first provider call; the later steps (AML on approval)
        run in the daemon when the decision arrives, under a key already in the audit file.
        """
        engine = self.processor.workflows
        assert engine is not None
        mid = envelope.message_id
        base = await engine.store.get(mid)
        latest, gen = base, 0
        while True:
            row = await engine.store.get(generation_id(mid, gen + 1))
            if row is None:
                break
            latest, gen = row, gen + 1
            if row.state not in FINAL_STATES:
                break  # unfinished: resumed under its own keys
        matches = Fingerprinter(self.settings.fingerprint_key).matches
        if base is None or latest is None:
            return ("not failed (skipped)" if self.req.retry_failed else "not completed (skipped)"), None
        if not matches(base.fingerprint, envelope):
            return "conflict (skipped)", None
        resumable = latest is not base and latest.state not in FINAL_STATES
        if self.req.retry_failed:
            if latest.state is not WState.FAILED and not resumable:
                return "not failed (skipped)", None
        elif base.state not in FINAL_STATES or base.state is WState.FAILED:
            return "not completed (skipped)", None
        if not resumable:
            gen += 1
        ns = self.settings.namespace
        for step in (Step.SESSION, *((Step.AML,) if base.wants_aml else ())):
            entry = self._entry(msg, envelope, gen, step_key(ns, mid, step, gen))
            await self.audit({**entry, "step": step.value, "workflow": generation_id(mid, gen)})
        handled = await engine.reverify(envelope, msg, gen)
        if handled.dead_letter is None or self.req.dead_letters:
            await deliver(handled, msg, sinks, emit_duplicates=True)  # the generation's result events
        if handled.disposition is Disposition.CONFLICT:
            return "conflict (skipped)", None
        if handled.disposition is Disposition.SET_ASIDE:
            return "set aside (retries exhausted)", None
        if handled.disposition is Disposition.INVALID:
            return "invalid (skipped)", handled.dead_letter.reason if handled.dead_letter else None
        if handled.disposition is Disposition.ERROR:
            return "internal error", None
        done = "retried" if self.req.retry_failed else "reverified"
        return (f"{done} (generation resumed)" if resumable else done), None


def operator_name() -> str:
    """Who runs the tool (``$USER``), for the audit file."""
    user = os.environ.get("USER") or os.environ.get("LOGNAME")
    if user:
        return user
    try:
        import getpass

        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"
