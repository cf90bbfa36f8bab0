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

from consumer.errors import ProviderAuthError
from consumer.keys import Fingerprinter, idempotency_key
from consumer.logs import log_unexpected
from consumer.pipeline import Disposition, Processor
from consumer.settings import Settings
from consumer.sinks import Sinks
from consumer.store import DedupeStore, Record, State
from consumer.tools.runner import Run
from producer.envelope import decode
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
            envelope = decode(msg.value, msg.headers, max_bytes=settings.max_message_bytes)
        except EnvelopeError as exc:
            return "invalid (skipped)", exc.reason
        base_key = idempotency_key(settings.namespace, envelope.operation, envelope.message_id)
        if base_key in self.seen:
            return "duplicate in range (skipped)", None
        self.seen.add(base_key)  # before any await: two copies of one request never both run
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
        await self.audit(
            {
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
        )
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
