"""How a tool run runs: its Kafka consumer and pipeline, lanes, the signal guard, and writing its outcomes.

Shared by replay, re-verification and dead-letter redrive. Everything is wired like the daemon
(:mod:`consumer.wiring`); what differs is that a tool run never joins the live consumer group, labels its
dead letters with its own group, and stops on SIGINT/SIGTERM with a report instead of draining.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from consumer.delivery import deliver
from consumer.errors import ReplayRefused
from consumer.pipeline import Disposition, Handled, Processor
from consumer.provider import ProviderClient
from consumer.settings import Settings
from consumer.sinks import DeadLetter, Sinks
from consumer.store import DedupeStore, Record, open_store
from consumer.tools.report import Progress, Report
from consumer.wiring import (
    build_processor,
    build_provider,
    build_sinks,
    check_broker,
    kafka_consumer,
    lane_of,
    owner_id,
    start_consumer,
    watch_signals,
)
from consumer.workflows.wiring import build_engine

__all__ = [
    "DEFAULT_GROUP_LABEL",
    "DISPOSITION_LABEL",
    "Lookup",
    "Run",
    "check_group",
    "guarded",
    "open_consumer",
    "run_lanes",
    "sink",
    "tool_pipeline",
    "tool_processor",
    "tool_provider",
    "tool_sinks",
    "with_lookup",
]

DEFAULT_GROUP_LABEL = "idv-replay"

Lookup = Callable[[str], Awaitable[Record | None]]
"""A read-only record lookup by idempotency key (``store.get``)."""


# -- wiring ------------------------------------------------------------------------------------------


def check_group(settings: Settings, group: str | None) -> None:
    if group is not None and group == settings.group_id:
        raise ReplayRefused(
            f"--group {group} is the live consumer group (IDV_GROUP_ID); the replay tool never moves its "
            "offsets. Use another name, or none."
        )


async def open_consumer(settings: Settings, group: str | None) -> AIOKafkaConsumer:
    """A started consumer for ``assign()``-ed reading, in no group or the tool's own ``group``."""
    consumer = kafka_consumer(
        settings,
        group_id=group,
        client_id=f"{settings.client_id}-replay",
        auto_offset_reset="earliest",
        max_poll_records=500,
    )
    await check_broker(settings)
    await start_consumer(consumer, settings, ReplayRefused)
    return consumer


def tool_provider(settings: Settings) -> ProviderClient:
    return build_provider(settings)  # built exactly like the daemon's


def tool_processor(
    settings: Settings,
    store: DedupeStore,
    provider: ProviderClient,
    *,
    want_records: bool,
    ignore_key_retention: bool = False,
) -> Processor:
    owner = owner_id(settings, "replay")
    processor = build_processor(
        settings,
        store,
        provider,
        owner=owner,
        want_records=want_records,
        ignore_key_retention=ignore_key_retention,
    )
    # kyc_workflow requests (and provider events) resume from their recovery point, as in the daemon.
    processor.workflows = build_engine(settings, store, provider, owner=owner)
    return processor


@contextlib.asynccontextmanager
async def workflows_open(processor: Processor) -> AsyncIterator[None]:
    """Keep the tool processor's workflow store open for the run."""
    if processor.workflows is None:
        yield
        return
    async with processor.workflows.store:
        yield


def tool_sinks(settings: Settings, dlq_topic: str | None, group: str | None) -> Sinks:
    """The dead-letter/results producer of a replay or redrive run, labelled with the tool's group."""
    return build_sinks(settings, dlq_topic=dlq_topic, group_id=group or DEFAULT_GROUP_LABEL)


@contextlib.asynccontextmanager
async def tool_pipeline(
    settings: Settings, dlq_topic: str | None, group: str | None, *, ignore_key_retention: bool = False
) -> AsyncIterator[tuple[DedupeStore, Processor, Sinks]]:
    """The store, processor and started sinks of a replay or redrive run; the sinks stop (shielded) when
    it ends, after every outcome written."""
    async with open_store(settings.store_url) as store, tool_provider(settings) as provider:
        sinks = tool_sinks(settings, dlq_topic, group)
        processor = tool_processor(
            settings,
            store,
            provider,
            want_records=settings.result_topic is not None,
            ignore_key_retention=ignore_key_retention,
        )
        await sinks.start()
        try:
            async with workflows_open(processor):
                yield store, processor, sinks
        finally:
            with anyio.CancelScope(shield=True):
                await sinks.stop()


# -- lanes -----------------------------------------------------------------------------------------------


async def run_lanes(
    batch: Iterable[ConsumerRecord], handle: Callable[[ConsumerRecord], Awaitable[None]], concurrency: int
) -> None:
    """Handle ``batch`` with the daemon's lane rule (:func:`consumer.wiring.lane_of`): one lane's messages
    one after another in offset order, different lanes concurrently up to ``concurrency``."""
    lanes: dict[Hashable, list[ConsumerRecord]] = {}
    for msg in batch:
        lanes.setdefault(lane_of(TopicPartition(msg.topic, msg.partition), msg), []).append(msg)
    limiter = anyio.CapacityLimiter(concurrency)

    async def run(messages: list[ConsumerRecord]) -> None:
        for msg in messages:
            async with limiter:
                await handle(msg)

    async with anyio.create_task_group() as tg:
        for messages in lanes.values():
            tg.start_soon(run, messages)


# -- the store, read-only ------------------------------------------------------------------------------


async def with_lookup(settings: Settings, run: Run, go: Callable[[Lookup], Awaitable[None]]) -> None:
    """Run ``go`` with the dedupe store's record lookup. A SQLite file that does not exist yet is not
    opened (that would create it): there is nothing in it, so every valid message is new."""
    if _sqlite_file_missing(settings.store_url):
        run.report.notes.append("the dedupe store does not exist yet: every valid message is new")
        await go(_no_record)
        return
    async with open_store(settings.store_url) as store:
        await go(store.get)


def _sqlite_file_missing(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        return False
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return path != ":memory:" and not Path(path).exists()


async def _no_record(_key: str) -> Record | None:
    return None


# -- one run -----------------------------------------------------------------------------------------------


class Run:
    """State shared by the handlers of one run: the report, progress, cancellation on fatal errors."""

    def __init__(self, report: Report, progress: Progress | None) -> None:
        self.report = report
        self.progress = progress
        self.scope = anyio.CancelScope()

    @classmethod
    def started(
        cls, report: Report, progress: Callable[[int, str], Progress | None] | None, label: str
    ) -> Run:
        """A run of ``report.planned`` messages, with the progress display ``progress`` makes (if any)."""
        return cls(report, progress(report.planned, label) if progress is not None else None)

    def finished(self) -> None:
        """The progress display's last line, once the run ended without raising."""
        if self.progress is not None:
            self.progress.close(self.report.counts)

    def count(self, outcome: str, reason: str | None = None) -> None:
        self.report.counts[outcome] += 1
        if reason is not None:
            self.report.reasons[reason] += 1
        if self.progress is not None:
            self.progress.update(1, self.report.counts)

    def fatal(self, exc: BaseException) -> None:
        if self.report.fatal is None:
            self.report.fatal = str(exc)
        self.scope.cancel()

    def interrupt(self, _signum: signal.Signals | None = None) -> None:
        self.report.interrupted = True
        self.scope.cancel()


async def guarded(run: Run, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` under the run's cancel scope, with SIGINT/SIGTERM stopping it cleanly.

    Only the read-and-handle loop runs inside the scope. The store, provider client and producers are
    opened *outside* it: a handler cancelled mid-call releases its lease through the store (shielded), and
    the store's own writer task must not be cancelled along with it.
    """
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_signals, run.interrupt)
        with run.scope:
            await body()
        tg.cancel_scope.cancel()
    if run.scope.cancelled_caught and run.report.fatal is None:
        run.report.interrupted = True
    done = run.report.handled
    if run.report.planned > done and (run.report.interrupted or run.report.fatal):
        run.report.counts["not reached"] += run.report.planned - done


# -- outcomes --------------------------------------------------------------------------------------------

DISPOSITION_LABEL = {
    Disposition.COMPLETED: "completed",
    Disposition.FAILED: "failed (provider 4xx)",
    Disposition.DUPLICATE: "duplicate (not sent)",
    Disposition.CONFLICT: "conflict",
    Disposition.INVALID: "invalid",
    Disposition.SET_ASIDE: "set aside (retries exhausted)",
    Disposition.IN_DOUBT: "in doubt (dead-lettered)",
    Disposition.ERROR: "internal error",
}


async def sink(
    sinks: Sinks,
    msg: ConsumerRecord,
    handled: Handled,
    *,
    emit_duplicates: bool,
    letter: DeadLetter | None = None,
) -> Handled:
    """Dead letter or result, exactly as the daemon writes them (:func:`consumer.delivery.deliver`);
    ``letter`` overrides the pipeline's dead letter (redrive keeps the original reason's context)."""
    if letter is not None:
        handled = dataclasses.replace(handled, dead_letter=letter)
    return await deliver(handled, msg, sinks, emit_duplicates=emit_duplicates)
