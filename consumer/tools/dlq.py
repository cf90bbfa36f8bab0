"""Dead letters: their metadata (:class:`DeadLetterEntry`, never payloads), ``dlq list`` and its table,
and ``dlq redrive``, ``direct`` (through the pipeline here) or ``republish`` (back to the original topic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import heapq
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from consumer.dlqcrypto import H_KEY_ID, DeadLetterCipher, DecryptError
from consumer.errors import ProviderAuthError, ReplayRefused
from consumer.pipeline import Disposition
from consumer.settings import Settings
from consumer.sinks import (
    H_ATTEMPTS,
    H_DETAIL,
    H_FIRST_FAILURE,
    H_OFFSET,
    H_PARTITION,
    H_REASON,
    H_TIMESTAMP,
    H_TOPIC,
    DeadLetter,
)
from consumer.store import open_store
from consumer.tools.replay import classify
from consumer.tools.report import Progress, Report, duration, iso_ms
from consumer.tools.runner import (
    DISPOSITION_LABEL,
    Lookup,
    Run,
    check_group,
    guarded,
    open_consumer,
    run_lanes,
    sink,
    tool_processor,
    tool_provider,
    tool_sinks,
    with_lookup,
    workflows_open,
)
from consumer.tools.spans import Span, plan_times, read_spans
from consumer.wiring import stop_consumer

__all__ = [
    "DLQ_PREFIX",
    "DeadLetterEntry",
    "RedriveMode",
    "dlq_list",
    "dlq_table",
    "entry_of",
    "open_dead_letter",
    "redrive",
    "strip_dead_letter",
]

DLQ_PREFIX = "idv-dlq-"


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One dead letter's metadata (never its value)."""

    dlq_partition: int
    dlq_offset: int
    dlq_timestamp: int
    reason: str
    detail: str
    topic: str | None
    partition: int | None
    offset: int | None
    original_timestamp: int | None
    first_failure_at: str | None
    attempts: int
    key_id: str | None = None  # the encryption key of the value (``idv-dlq-key-id``), None when in clear

    @property
    def original(self) -> tuple[str, int, int] | None:
        if self.topic is None or self.partition is None or self.offset is None:
            return None
        return (self.topic, self.partition, self.offset)


def _last_header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    found = None
    for key, value in headers or ():
        if key == name and value is not None:
            found = value
    return found.decode("utf-8", "replace") if found is not None else None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def entry_of(msg: ConsumerRecord) -> DeadLetterEntry:
    h = msg.headers
    return DeadLetterEntry(
        dlq_partition=msg.partition,
        dlq_offset=msg.offset,
        dlq_timestamp=msg.timestamp,
        reason=_last_header(h, H_REASON) or "?",
        detail=_last_header(h, H_DETAIL) or "",
        topic=_last_header(h, H_TOPIC),
        partition=_int(_last_header(h, H_PARTITION)),
        offset=_int(_last_header(h, H_OFFSET)),
        original_timestamp=_int(_last_header(h, H_TIMESTAMP)),
        first_failure_at=_last_header(h, H_FIRST_FAILURE),
        attempts=_int(_last_header(h, H_ATTEMPTS)) or 0,
        key_id=_last_header(h, H_KEY_ID),
    )


def strip_dead_letter(msg: ConsumerRecord, entry: DeadLetterEntry) -> ConsumerRecord:
    """The original message: its key, value and headers (minus ``idv-dlq-*``) at its original position."""
    assert entry.topic is not None and entry.partition is not None and entry.offset is not None
    headers = [(k, v) for k, v in (msg.headers or ()) if not k.startswith(DLQ_PREFIX)]
    return ConsumerRecord(
        topic=entry.topic,
        partition=entry.partition,
        offset=entry.offset,
        timestamp=entry.original_timestamp if entry.original_timestamp is not None else msg.timestamp,
        timestamp_type=0,
        key=msg.key,
        value=msg.value,
        checksum=None,
        serialized_key_size=msg.serialized_key_size,
        serialized_value_size=msg.serialized_value_size,
        headers=headers,
    )


def open_dead_letter(
    msg: ConsumerRecord, entry: DeadLetterEntry, cipher: DeadLetterCipher | None
) -> ConsumerRecord:
    """:func:`strip_dead_letter`, with the value decrypted when the dead letter is encrypted. Raises
    :class:`DecryptError` when it cannot be (no keys configured, unknown key id, tampered)."""
    original = strip_dead_letter(msg, entry)
    if entry.key_id is None or original.value is None:
        return original
    if cipher is None:
        raise DecryptError(f"dead letter encrypted with key id {entry.key_id!r}, no IDV_DLQ_ENCRYPTION_KEYS")
    where = {"topic": original.topic, "partition": original.partition, "offset": original.offset}
    plain = cipher.decrypt(original.value, kid=entry.key_id, **where)
    return dataclasses.replace(original, value=plain, serialized_value_size=len(plain))


def _originals(
    pairs: Sequence[tuple[ConsumerRecord, DeadLetterEntry]], cipher: DeadLetterCipher | None, run: Run
) -> list[tuple[ConsumerRecord, DeadLetterEntry]]:
    """The originals of readable, decryptable dead letters; the others are counted and skipped."""
    out = []
    for msg, entry in pairs:
        if entry.original is None:
            run.count("unreadable dead letter")
            continue
        try:
            out.append((open_dead_letter(msg, entry, cipher), entry))
        except DecryptError as exc:
            run.count("undecryptable dead letter", str(exc))
    return out


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


async def _dlq_spans(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    dlq_topic: str,
    since: datetime | None,
    until: datetime | None,
) -> list[Span]:
    return await plan_times(settings, consumer, dlq_topic, None, since, until)


async def dlq_list(
    settings: Settings,
    *,
    reasons: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
) -> tuple[list[DeadLetterEntry], int]:
    """The newest ``limit`` dead letters matching the filters (oldest first), and how many matched."""
    dlq_topic = settings.dead_letter_topic
    if dlq_topic is None:
        raise ReplayRefused("dead letters are disabled (IDV_DLQ_TOPIC is 'none')")
    consumer = await open_consumer(settings, None)
    # A bounded min-heap keyed by (time, partition, offset): the newest ``limit`` across all partitions.
    kept: list[tuple[int, int, int, DeadLetterEntry]] = []
    matched = 0
    try:
        spans = await _dlq_spans(settings, consumer, dlq_topic, since, until)
        async for batch in read_spans(consumer, spans):
            for msg in batch:
                entry = entry_of(msg)
                if reasons and entry.reason not in reasons:
                    continue
                matched += 1
                if limit > 0:
                    heapq.heappush(kept, (entry.dlq_timestamp, entry.dlq_partition, entry.dlq_offset, entry))
                    if len(kept) > limit:
                        heapq.heappop(kept)
    finally:
        await stop_consumer(consumer)
    return [item[3] for item in sorted(kept, key=lambda item: item[:3])], matched


def dlq_table(entries: Sequence[DeadLetterEntry]) -> str:
    """Reason, detail, original position and times; never payloads."""
    header = ("dead-lettered", "reason", "original", "attempts", "first failure", "detail")
    rows = [
        (
            iso_ms(e.dlq_timestamp),
            e.reason,
            f"{e.topic}/{e.partition}@{e.offset}" if e.original else "?",
            str(e.attempts),
            e.first_failure_at or "",
            e.detail if len(e.detail) <= 80 else e.detail[:77] + "...",
        )
        for e in entries
    ]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(6)]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(f"{cell:<{widths[i]}}" for i, cell in enumerate(row)).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


class RedriveMode(enum.Enum):
    DIRECT = "direct"
    REPUBLISH = "republish"


async def redrive(
    settings: Settings,
    *,
    reasons: Sequence[str],
    mode: RedriveMode,
    since: datetime | None = None,
    until: datetime | None = None,
    group: str | None = None,
    dry_run: bool = False,
    emit_results: bool = False,
    force: bool = False,
    concurrency: int = 16,
    progress: Callable[[int, str], Progress | None] | None = None,
) -> Report:
    """Redrive the dead letters with one of ``reasons`` (dead-lettered between ``since`` and ``until``).

    Only the newest dead letter of each original message is taken (a message that failed again after an
    earlier redrive has several). ``direct``: the original runs through the pipeline; if it fails again it
    goes back to the DLQ with the new failure's reason, the first-failure time of the first dead letter,
    and the attempt count increased. ``republish``: the original key, value and headers go back to the
    original topic, where the daemon picks them up.
    """
    check_group(settings, group)
    dlq_topic = settings.dead_letter_topic
    if dlq_topic is None:
        raise ReplayRefused("dead letters are disabled (IDV_DLQ_TOPIC is 'none')")
    if emit_results and settings.result_topic is None:
        raise ReplayRefused("--emit-results needs a results topic (IDV_RESULTS_TOPIC is 'none')")
    label = f"dlq redrive ({'dry run' if dry_run else mode.value})"
    bad = frozenset({"not reached", "unreadable dead letter", "undecryptable dead letter"})
    if not dry_run and mode is RedriveMode.DIRECT:
        bad |= {"dead-lettered again", "set aside (retries exhausted)"}
    report = Report(label, bad=bad)
    consumer = await open_consumer(settings, group)
    try:
        spans = await _dlq_spans(settings, consumer, dlq_topic, since, until)
        # Pass 1: metadata only. Pick the newest dead letter per original message; check retention.
        chosen: dict[tuple[str, int, int] | tuple[int, int], DeadLetterEntry] = {}
        async for batch in read_spans(consumer, spans):
            for msg in batch:
                entry = entry_of(msg)
                if entry.reason not in reasons:
                    continue
                ident = entry.original or (entry.dlq_partition, entry.dlq_offset)
                previous = chosen.get(ident)
                if previous is None or (entry.dlq_timestamp, entry.dlq_offset) >= (
                    previous.dlq_timestamp,
                    previous.dlq_offset,
                ):
                    chosen[ident] = entry
        report.planned = len(chosen)
        cutoff_ms = (time.time() - settings.retention_s) * 1000
        old = [
            e
            for e in chosen.values()
            if e.original_timestamp is not None and e.original_timestamp < cutoff_ms
        ]
        if old and not dry_run and not force:
            raise ReplayRefused(
                f"refusing to redrive {len(old)} dead letter(s) whose original message is older than the "
                f"dedupe retention (IDV_RETENTION_S = {duration(settings.retention_s)}), e.g. "
                f"{old[0].topic}/{old[0].partition}@{old[0].offset} "
                f"from {iso_ms(old[0].original_timestamp or 0)}. "
                "Their dedupe records may have been purged, so only the provider's own idempotency-key "
                "retention would stop a second side effect. Pass --force if you have checked that this is "
                "acceptable."
            )
        if old:
            report.notes.append(f"{len(old)} dead letter(s) older than the dedupe retention")
        wanted = {(e.dlq_partition, e.dlq_offset): e for e in chosen.values()}
        # Pass 2: the selected dead letters, read again (values are not kept in memory between passes).
        bar = progress(report.planned, label) if progress is not None else None
        run = Run(report, bar)

        if dry_run:
            await _redrive_dry_run(settings, consumer, spans, wanted, run, concurrency)
        else:
            if force and mode is RedriveMode.DIRECT and "in_doubt" in reasons:
                report.notes.append(
                    "--force: unfinished records older than the provider's key retention "
                    f"({duration(settings.provider_key_retention_s)}) are sent again; if the provider has "
                    "forgotten the key and had acted, that is a second side effect"
                )
            await _redrive(
                settings, consumer, spans, wanted, run, mode, group, emit_results, concurrency, force=force
            )
        if bar is not None:
            bar.close(report.counts)
    finally:
        await stop_consumer(consumer)
    return report


async def _selected(
    consumer: AIOKafkaConsumer, spans: Sequence[Span], wanted: dict[tuple[int, int], DeadLetterEntry]
) -> AsyncIterator[list[tuple[ConsumerRecord, DeadLetterEntry]]]:
    if not wanted:
        return
    async for batch in read_spans(consumer, spans):
        out = [(m, wanted[(m.partition, m.offset)]) for m in batch if (m.partition, m.offset) in wanted]
        if out:
            yield out


async def _redrive_dry_run(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    spans: Sequence[Span],
    wanted: dict[tuple[int, int], DeadLetterEntry],
    run: Run,
    concurrency: int,
) -> None:
    cipher = settings.dlq_cipher()

    async def go(get: Lookup) -> None:
        now = time.time()

        async def handle(msg: ConsumerRecord) -> None:
            category, reason = await classify(get, settings, msg, now)
            run.count(category, reason)

        async def loop() -> None:
            async for pairs in _selected(consumer, spans, wanted):
                originals = [original for original, _ in _originals(pairs, cipher, run)]
                await run_lanes(originals, handle, concurrency)

        await guarded(run, loop)

    await with_lookup(settings, run, go)


async def _redrive(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    spans: Sequence[Span],
    wanted: dict[tuple[int, int], DeadLetterEntry],
    run: Run,
    mode: RedriveMode,
    group: str | None,
    emit_results: bool,
    concurrency: int,
    *,
    force: bool = False,
) -> None:
    if mode is RedriveMode.REPUBLISH:
        await _republish(settings, consumer, spans, wanted, run)
        return
    cipher = settings.dlq_cipher()
    async with (
        open_store(settings.store_url) as store,
        tool_provider(settings) as provider,
        contextlib.AsyncExitStack() as stack,
    ):
        sinks = tool_sinks(settings, settings.dead_letter_topic, group)
        # --force also overrides the in-doubt hold on records older than the provider's key retention.
        processor = tool_processor(
            settings,
            store,
            provider,
            want_records=settings.result_topic is not None,
            ignore_key_retention=force,
        )
        await stack.enter_async_context(workflows_open(processor))
        await sinks.start()
        entries: dict[tuple[str, int, int], DeadLetterEntry] = {}

        async def handle(original: ConsumerRecord) -> None:
            entry = entries[(original.topic, original.partition, original.offset)]
            try:
                handled = await processor.handle_safely(original)
            except ProviderAuthError as exc:
                run.fatal(exc)
                return
            letter = None
            if handled.dead_letter is not None:
                new = handled.dead_letter
                # Same original position, first failure kept from the first dead letter, attempts counted
                # on: previous attempts plus this redrive's provider attempts (at least one).
                letter = DeadLetter(
                    new.reason,
                    new.detail,
                    attempts=entry.attempts + max(1, new.attempts),
                    first_failure_at=_epoch(entry.first_failure_at) or new.first_failure_at,
                )
            await sink(sinks, original, handled, emit_duplicates=emit_results, letter=letter)
            if letter is not None:
                outcome = (
                    "set aside (retries exhausted)"
                    if handled.disposition is Disposition.SET_ASIDE
                    else "dead-lettered again"
                )
                run.count(outcome, letter.reason)
            else:
                run.count(DISPOSITION_LABEL[handled.disposition])

        async def loop() -> None:
            async for pairs in _selected(consumer, spans, wanted):
                originals = []
                for original, entry in _originals(pairs, cipher, run):
                    assert entry.original is not None
                    entries[entry.original] = entry
                    originals.append(original)
                await run_lanes(originals, handle, concurrency)

        try:
            await guarded(run, loop)
        finally:
            with anyio.CancelScope(shield=True):
                await sinks.stop()


async def _republish(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    spans: Sequence[Span],
    wanted: dict[tuple[int, int], DeadLetterEntry],
    run: Run,
) -> None:
    cipher = settings.dlq_cipher()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_idempotence=True,
        acks="all",
        max_request_size=16 * 1024 * 1024,
        linger_ms=2,
        **settings.kafka_security(),
    )
    await producer.start()

    async def loop() -> None:
        async for pairs in _selected(consumer, spans, wanted):
            futures = []
            for original, _ in _originals(pairs, cipher, run):
                # Keyed like the original, so it lands in the partition the key maps to today, in order.
                fut = await producer.send(
                    original.topic, original.value, key=original.key, headers=list(original.headers)
                )
                futures.append(fut)
            for fut in futures:
                await fut
                run.count("republished")

    try:
        await guarded(run, loop)
    finally:
        with anyio.CancelScope(shield=True):
            await producer.stop()
