"""Replay a range of the request topic through the daemon's pipeline, or classify it (dry run).

Completed keys are answered from the store and never sent again; ``emit_results`` re-publishes their
result events. A dry run classifies every message against the store (new, completed, in progress,
conflict, invalid…) with read-only calls and without a provider client at all. ``--reverify`` and
``--retry-failed`` plan the range here and hand each message to :mod:`consumer.tools.reverify`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from consumer.errors import ProviderAuthError, ReplayRefused
from consumer.keys import Fingerprinter, idempotency_key
from consumer.pipeline import Disposition, Processor
from consumer.settings import Settings
from consumer.sinks import Sinks
from consumer.store import State
from consumer.store.base import Decision, decide_claim
from consumer.tools.report import Progress, Report, duration
from consumer.tools.reverify import Reverifier
from consumer.tools.runner import (
    DISPOSITION_LABEL,
    Lookup,
    Run,
    check_group,
    guarded,
    open_consumer,
    run_lanes,
    sink,
    tool_pipeline,
    with_lookup,
)
from consumer.tools.spans import Span, plan_offsets, plan_times, read_spans, refuse_old, too_old
from consumer.unreadable import decode_record
from consumer.wiring import stop_consumer
from producer.errors import EnvelopeError

log = logging.getLogger(__name__)

__all__ = ["ReplayRequest", "classify", "replay"]


@dataclass
class ReplayRequest:
    """What to replay and how: the options of ``idv-consumer replay``."""

    topic: str
    partitions: Sequence[int] = ()
    from_offsets: Sequence[int] = ()
    to_offsets: Sequence[int] = ()
    since: datetime | None = None
    until: datetime | None = None
    group: str | None = None
    dry_run: bool = False
    emit_results: bool = False
    dead_letters: bool = True
    reverify: bool = False
    # Re-run FAILED requests deliberately: like reverify (new key generation, audit line first), but for
    # records whose latest generation is FAILED. Not the same key: the provider stored the failed answer
    # under it and would only replay it.
    retry_failed: bool = False
    reason: str | None = None
    audit_file: Path = Path(".run/reverify-audit.jsonl")
    operator: str = ""
    force: bool = False
    concurrency: int = 16


async def replay(
    settings: Settings,
    req: ReplayRequest,
    *,
    confirm: Callable[[str], bool] | None = None,
    progress: Callable[[int, str], Progress | None] | None = None,
) -> Report:
    """Replay (or classify, or re-verify) a range of ``req.topic``. Raises :class:`ReplayRefused`."""
    check_group(settings, req.group)
    if req.reverify and req.retry_failed:
        raise ReplayRefused("--reverify and --retry-failed cannot be combined")
    flag = "--retry-failed" if req.retry_failed else "--reverify"
    if (req.reverify or req.retry_failed) and not (req.reason and req.reason.strip()):
        raise ReplayRefused(f"{flag} needs --reason: say why these requests are run again")
    if (req.reverify or req.retry_failed) and req.dry_run:
        raise ReplayRefused(f"{flag} and --dry-run cannot be combined")
    if req.emit_results and settings.result_topic is None:
        raise ReplayRefused("--emit-results needs a results topic (IDV_RESULTS_TOPIC is 'none')")
    mode = (
        "dry run"
        if req.dry_run
        else "reverify"
        if req.reverify
        else "retry failed"
        if req.retry_failed
        else "replay"
    )
    bad = frozenset(
        {"not reached", "set aside (retries exhausted)", "in doubt (dead-lettered)", "internal error"}
    )
    if req.dry_run:
        bad = frozenset({"not reached"})
    report = Report(mode, bad=bad)
    consumer = await open_consumer(settings, req.group)
    try:
        if req.since is not None or req.until is not None:
            spans = await plan_times(settings, consumer, req.topic, req.partitions, req.since, req.until)
        else:
            spans = await plan_offsets(
                settings, consumer, req.topic, req.partitions, req.from_offsets, req.to_offsets, report.notes
            )
        report.planned = sum(s.size for s in spans)
        old = await too_old(consumer, spans, settings.retention_s, time.time())
        if old and req.dry_run:
            report.notes.append(
                f"{sum(old.values())} message(s) are older than the dedupe retention "
                f"({duration(settings.retention_s)}); a replay of them is refused without --force"
            )
        elif old and not req.force:
            refuse_old(old, settings.retention_s, "replay")
        elif old:
            report.notes.append(
                f"--force: {sum(old.values())} message(s) older than the dedupe retention replayed"
            )
        if (req.retry_failed or req.reverify) and report.planned and confirm is not None:
            where = ", ".join(f"{s.tp.partition}:{s.start}..{s.end - 1}" for s in spans if s.size)
            if req.retry_failed:
                question = (
                    f"Retry up to {report.planned} message(s) of {req.topic} (partition:offsets {where}) "
                    "whose recorded outcome is FAILED, under NEW idempotency keys? Each is sent to the "
                    "provider again (billable); one the provider had in fact performed would be performed "
                    "a second time."
                )
            else:
                question = (
                    f"Re-verify up to {report.planned} message(s) of {req.topic} (partition:offsets {where}) "
                    "under NEW idempotency keys? Every completed request among them is sent to the provider "
                    "again: a second, billable side effect each."
                )
            if not await anyio.to_thread.run_sync(confirm, question):
                raise ReplayRefused("not confirmed; nothing was sent")
        run = Run.started(report, progress, mode)

        if req.dry_run:
            await dry_run(settings, read_spans(consumer, spans), run, req.concurrency)
        else:
            await _replay(settings, consumer, spans, run, req)
        run.finished()
    finally:
        await stop_consumer(consumer)
    return report


async def dry_run(
    settings: Settings, batches: AsyncIterable[Sequence[ConsumerRecord]], run: Run, concurrency: int
) -> None:
    """Classify every message of ``batches`` against the store, read-only (replay's and redrive's
    ``--dry-run``): nothing is called, written or committed."""

    async def go(get: Lookup) -> None:
        now = time.time()

        async def handle(msg: ConsumerRecord) -> None:
            category, reason = await classify(get, settings, msg, now)
            run.count(category, reason)

        async def loop() -> None:
            async for batch in batches:
                await run_lanes(batch, handle, concurrency)

        await guarded(run, loop)

    await with_lookup(settings, run, go)


async def _replay(
    settings: Settings, consumer: AIOKafkaConsumer, spans: Sequence[Span], run: Run, req: ReplayRequest
) -> None:
    dlq_topic = settings.dead_letter_topic if req.dead_letters else None
    async with tool_pipeline(settings, dlq_topic, req.group) as (store, processor, sinks):
        if req.reverify or req.retry_failed:
            reverifier = Reverifier(settings, store, processor, req)
            handle = reverifier.handler(run, sinks)
        else:
            handle = _replay_handler(processor, sinks, run, req)

        async def loop() -> None:
            async for batch in read_spans(consumer, spans):
                await run_lanes(batch, handle, req.concurrency)
                if req.group is not None:
                    await _commit_progress(consumer, batch)

        await guarded(run, loop)


async def _commit_progress(consumer: AIOKafkaConsumer, batch: Sequence[ConsumerRecord]) -> None:
    """Record how far the replay got in its own group (never the live one), for operators and resumes."""
    reached: dict[TopicPartition, int] = {}
    for msg in batch:
        tp = TopicPartition(msg.topic, msg.partition)
        reached[tp] = max(reached.get(tp, 0), msg.offset + 1)
    try:
        await consumer.commit(reached)
    except KafkaError as exc:
        log.warning("could not record the replay's progress in its group: %s", type(exc).__name__)


def _replay_handler(
    processor: Processor, sinks: Sinks, run: Run, req: ReplayRequest
) -> Callable[[ConsumerRecord], Awaitable[None]]:
    async def handle(msg: ConsumerRecord) -> None:
        try:
            handled = await processor.handle_safely(msg)
        except ProviderAuthError as exc:
            run.fatal(exc)
            return
        await sink(sinks, msg, handled, emit_duplicates=req.emit_results)
        letter = handled.dead_letter
        reason = letter.reason if letter is not None and handled.disposition is Disposition.INVALID else None
        run.count(DISPOSITION_LABEL[handled.disposition], reason)

    return handle


# -- dry run ----------------------------------------------------------------------------------------


async def classify(
    get: Lookup, settings: Settings, msg: ConsumerRecord, now: float
) -> tuple[str, str | None]:
    """What the pipeline would do with ``msg``, from read-only store lookups: (category, invalid reason)."""
    try:
        envelope = decode_record(msg, max_bytes=settings.max_message_bytes)
    except EnvelopeError as exc:
        return "invalid", exc.reason
    record = await get(idempotency_key(settings.namespace, envelope.operation, envelope.message_id))
    # The store's own claim rule, read-only: what a claim would decide, without claiming.
    fp, legacy = Fingerprinter(settings.fingerprint_key).with_legacy(envelope)
    decision = decide_claim(record, fingerprints=(fp, *legacy), owner="", now=now, reentrant=False)
    if record is None or decision is Decision.CONFLICT:
        return ("new" if record is None else "conflict"), None
    if decision is Decision.BUSY:
        return "in progress", None
    if decision is Decision.TAKE_OVER:
        expired = record.state is State.IN_PROGRESS
        return ("in progress (lease expired)" if expired else "released (will be retried)"), None
    return record.state.value, None  # DONE: completed | failed
