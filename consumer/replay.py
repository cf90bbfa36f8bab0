"""The replay tool: re-read a topic (or the dead-letter topic) through the daemon's own pipeline.

Four things an operator does with it (CLI: ``idv-consumer replay`` and ``idv-consumer dlq``, guide:
docs/replay.md and docs/dead-letters.md):

* **replay** a range of the request topic — by partition and offsets, or by time — through
  :class:`consumer.pipeline.Processor` with the same dedupe store and provider client as the daemon.
  Completed keys are answered from the store and never sent again; ``emit_results`` re-publishes their
  result events.
* **redrive** dead letters: strip the ``idv-dlq-*`` headers and run the original message through the
  pipeline (``direct``) or write it back to its original topic (``republish``).
* **dry run**: classify every message against the store (new, completed, in progress, conflict, invalid…)
  with read-only calls (``store.get``) and without a provider client at all.
* **reverify**: run completed requests again on purpose, under a new key generation
  (``idempotency_key(..., generation=N)``), with an audit line written *before* each provider call.

Safety rules that hold in every mode:

* The live consumer group is never touched: partitions are ``assign()``-ed by hand, with no group or
  with the tool's own ``group`` (refused when it equals ``IDV_GROUP_ID``), so the daemon's committed
  offsets cannot move.
* Messages older than the dedupe retention are refused unless ``force``: their records may have been
  purged, and then only the provider's own key retention would stop a second side effect. The check is
  exact per partition: ``offsets_for_times(now - retention)`` returns the first offset whose timestamp is
  within retention, so every offset before it is older.
* Messages with the same Kafka key in the same partition are handled one after another in offset order
  (the daemon's lane rule); different keys run concurrently up to ``concurrency``.
"""

from __future__ import annotations

import enum
import heapq
import logging
import os
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import anyio
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from consumer.errors import ConsumerError, ProviderAuthError
from consumer.keys import Fingerprinter, idempotency_key
from consumer.pipeline import Disposition, Handled, Processor
from consumer.provider import ProviderClient
from consumer.security import check_kafka_connection
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
    Sinks,
)
from consumer.store import DedupeStore, Record, State, open_store
from producer.envelope import decode
from producer.errors import EnvelopeError

log = logging.getLogger(__name__)

__all__ = [
    "EXIT_INCOMPLETE",
    "EXIT_OK",
    "EXIT_PROVIDER_AUTH",
    "EXIT_REFUSED",
    "DeadLetterEntry",
    "Progress",
    "RedriveMode",
    "Report",
    "ReplayRefused",
    "ReplayRequest",
    "classify",
    "dlq_list",
    "dlq_table",
    "entry_of",
    "operator_name",
    "parse_time",
    "progress_factory",
    "redrive",
    "replay",
    "strip_dead_letter",
]

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_REFUSED = 2
EXIT_PROVIDER_AUTH = 3

DLQ_PREFIX = "idv-dlq-"
DEFAULT_GROUP_LABEL = "idv-replay"


class ReplayRefused(ConsumerError):
    """The tool will not do what was asked (exit 2); the message says why and what to do instead."""


# -- time arguments --------------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> datetime:
    """An ISO 8601 time (a time without an offset is taken as UTC), ``now``, or an age such as ``90m``,
    ``2h``, ``7d`` (that long before now)."""
    raw = text.strip()
    now = time.time() if now is None else now
    if raw.lower() == "now":
        return datetime.fromtimestamp(now, UTC)
    rel = _RELATIVE.fullmatch(raw.lower())
    if rel:
        return datetime.fromtimestamp(now - float(rel.group(1)) * _UNIT_S[rel.group(2)], UTC)
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise ReplayRefused(
            f"cannot read the time {text!r}: use ISO 8601 (2026-11-28T22:00:00Z) or an age like 2h or 7d"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _duration(seconds: float) -> str:
    if seconds >= 86400 and seconds % 86400 == 0:
        return f"{int(seconds // 86400)} days"
    return str(timedelta(seconds=round(seconds)))


# -- the report --------------------------------------------------------------------------------------


@dataclass
class Report:
    """Counts per outcome, notes, and the exit code. ``bad`` lists the outcomes that make the run
    incomplete (exit 1)."""

    mode: str
    counts: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    planned: int = 0
    bad: frozenset[str] = frozenset()
    interrupted: bool = False
    fatal: str | None = None

    @property
    def handled(self) -> int:
        return sum(self.counts.values())

    @property
    def exit_code(self) -> int:
        if self.fatal is not None:
            return EXIT_PROVIDER_AUTH
        if self.interrupted or any(self.counts[name] for name in self.bad):
            return EXIT_INCOMPLETE
        return EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "planned": self.planned,
            "handled": self.handled,
            "counts": dict(sorted(self.counts.items())),
            "invalid_reasons": dict(sorted(self.reasons.items())),
            "notes": self.notes,
            "interrupted": self.interrupted,
            "fatal": self.fatal,
            "exit_code": self.exit_code,
        }

    def table(self) -> str:
        rows = [
            (name, str(n), "  <- not handled" if name in self.bad and n else "")
            for name, n in sorted(self.counts.items())
        ]
        rows += [(f"  invalid: {reason}", str(n), "") for reason, n in sorted(self.reasons.items())]
        width = max([len("outcome")] + [len(r[0]) for r in rows])
        verb = "classified" if "dry run" in self.mode else "handled"
        lines = [f"{self.mode}: {self.handled} of {self.planned} message(s) {verb}", ""]
        lines.append(f"{'outcome':<{width}}  {'messages':>8}")
        lines.append(f"{'-' * width}  {'-' * 8}")
        lines += [f"{name:<{width}}  {n:>8}{flag}" for name, n, flag in rows]
        lines.append(f"{'-' * width}  {'-' * 8}")
        lines.append(f"{'total':<{width}}  {self.handled:>8}")
        lines += [f"note: {note}" for note in self.notes]
        if self.fatal:
            lines.append(f"stopped: {self.fatal}")
        if self.interrupted:
            lines.append("interrupted before every message was handled")
        verdict = {
            EXIT_OK: "every message handled",
            EXIT_INCOMPLETE: "NOT every message was handled (see the marked rows)",
            EXIT_PROVIDER_AUTH: "the provider rejected the API key",
        }[self.exit_code]
        lines.append(f"exit code {self.exit_code}: {verdict}")
        return "\n".join(lines)


# -- progress ------------------------------------------------------------------------------------------


class Progress:
    """tqdm on a terminal (counts and ETA on stderr); plain lines every few seconds otherwise."""

    def __init__(self, total: int, *, label: str, stream: TextIO | None = None, every_s: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.label = label
        self.done = 0
        self.every_s = every_s
        self._last = 0.0
        self._started = time.monotonic()
        self._bar: Any = None
        if self.stream.isatty():
            from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type information

            self._bar = tqdm(total=total, desc=label, unit="msg", file=self.stream, dynamic_ncols=True)

    def update(self, n: int, counts: Counter[str]) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.set_postfix(dict(counts.most_common(4)), refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._line(counts)

    def _line(self, counts: Counter[str]) -> None:
        elapsed = time.monotonic() - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (
            f", eta {_duration((self.total - self.done) / rate)}"
            if rate > 0 and self.total > self.done
            else ""
        )
        summary = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        self.stream.write(f"{self.label}: {self.done}/{self.total} ({summary}){eta}\n")
        self.stream.flush()

    def close(self, counts: Counter[str]) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._line(counts)


# -- reading partitions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    """Offsets ``start`` (inclusive) to ``end`` (exclusive) of one partition."""

    tp: TopicPartition
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


def _consumer(settings: Settings, group: str | None) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group,
        client_id=f"{settings.client_id}-replay",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=500,
        **settings.kafka_security(),
    )


async def _start(consumer: AIOKafkaConsumer, settings: Settings) -> None:
    # One clear line (wrong password, untrusted certificate, refused connection) instead of aiokafka's
    # "Unable to bootstrap"; raises ConfigurationError.
    await check_kafka_connection(settings.kafka_bootstrap, settings.kafka_security())
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise ReplayRefused(
            f"cannot reach Kafka at {settings.kafka_bootstrap}: {type(exc).__name__}"
        ) from None


async def _stop(consumer: AIOKafkaConsumer) -> None:
    # aiokafka 0.14: stop() right after start() can meet a background task cancelled before it ran.
    await anyio.lowlevel.checkpoint()
    with anyio.CancelScope(shield=True):
        await consumer.stop()


async def _partitions(settings: Settings, topic: str, wanted: Sequence[int] | None) -> list[int]:
    # The consumer only knows metadata of topics it subscribed to; ask the cluster instead.
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **settings.kafka_security())
    try:
        await admin.start()
        try:
            (desc,) = await admin.describe_topics([topic])
        finally:
            await admin.close()
    except KafkaError as exc:
        raise ReplayRefused(f"cannot describe topic {topic}: {type(exc).__name__}") from None
    parts = sorted(p["partition"] for p in desc.get("partitions") or ())
    if desc.get("error_code") or not parts:
        raise ReplayRefused(f"topic {topic} does not exist on the broker")
    if not wanted:
        return parts
    unknown = sorted(set(wanted) - set(parts))
    if unknown:
        raise ReplayRefused(f"topic {topic} has no partition(s) {unknown} (it has {parts})")
    return sorted(set(wanted))


def _pair(name: str, values: Sequence[int], parts: Sequence[int]) -> dict[int, int | None]:
    if not values:
        return dict.fromkeys(parts)
    if len(values) == 1:
        return dict.fromkeys(parts, values[0])
    if len(values) != len(parts):
        raise ReplayRefused(
            f"{name} is given {len(values)} times for {len(parts)} partition(s): give it once (for every "
            "partition) or once per --partition, in the same order"
        )
    return dict(zip(parts, values, strict=True))


async def _bounds(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition]
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    return await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)


async def plan_offsets(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    topic: str,
    partitions: Sequence[int] | None,
    from_offsets: Sequence[int],
    to_offsets: Sequence[int],
    notes: list[str],
) -> list[Span]:
    """Spans for ``--partition/--from-offset/--to-offset`` (``to`` inclusive; defaults: whole partition)."""
    parts = await _partitions(settings, topic, partitions)
    if partitions and len(set(partitions)) != len(partitions):
        raise ReplayRefused("a --partition is given twice")
    order = list(partitions) if partitions else parts
    starts = _pair("--from-offset", from_offsets, order)
    stops = _pair("--to-offset", to_offsets, order)
    tps = [TopicPartition(topic, p) for p in order]
    begin, end = await _bounds(consumer, tps)
    spans = []
    for tp in tps:
        start = starts[tp.partition]
        stop = stops[tp.partition]
        first = begin[tp]
        lo = first if start is None else start
        hi = end[tp] if stop is None else min(stop + 1, end[tp])
        if start is not None and start < first:
            notes.append(
                f"{tp.topic}/{tp.partition}: offsets {start}..{first - 1} are no longer on the broker "
                f"(log start is {first}); starting at {first}"
            )
            lo = first
        if stop is not None and stop + 1 > end[tp]:
            notes.append(
                f"{tp.topic}/{tp.partition}: --to-offset {stop} is past the end; stopping at {end[tp] - 1}"
            )
        spans.append(Span(tp, lo, max(lo, hi)))
    return spans


async def plan_times(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    topic: str,
    partitions: Sequence[int] | None,
    since: datetime | None,
    until: datetime | None,
) -> list[Span]:
    """Spans covering messages with ``since <= timestamp < until`` (``offsets_for_times``)."""
    parts = await _partitions(settings, topic, partitions)
    tps = [TopicPartition(topic, p) for p in parts]
    begin, end = await _bounds(consumer, tps)
    starts = dict(begin)
    stops = dict(end)
    if since is not None:
        found = await consumer.offsets_for_times(dict.fromkeys(tps, max(0, _ms(since))))
        starts = {tp: (found[tp].offset if found.get(tp) is not None else end[tp]) for tp in tps}
    if until is not None:
        found = await consumer.offsets_for_times(dict.fromkeys(tps, max(0, _ms(until))))
        stops = {tp: (found[tp].offset if found.get(tp) is not None else end[tp]) for tp in tps}
    return [Span(tp, starts[tp], max(starts[tp], stops[tp])) for tp in tps]


async def too_old(
    consumer: AIOKafkaConsumer, spans: Sequence[Span], retention_s: float, now: float
) -> dict[Span, int]:
    """How many messages of each span are older than the dedupe retention.

    ``offsets_for_times(cutoff)`` is the earliest offset whose timestamp is at or after the cutoff, so every
    offset before it is older than the cutoff, whatever order the producers' timestamps came in.
    """
    spans = [s for s in spans if s.size]
    if not spans:
        return {}
    cutoff_ms = max(0, int((now - retention_s) * 1000))
    found = await consumer.offsets_for_times({s.tp: cutoff_ms for s in spans})
    out = {}
    for span in spans:
        hit = found.get(span.tp)
        boundary = span.end if hit is None else min(hit.offset, span.end)
        if span.start < boundary:
            out[span] = boundary - span.start
    return out


def _refuse_old(old: dict[Span, int], retention_s: float, what: str) -> None:
    where = ", ".join(
        f"{s.tp.topic}/{s.tp.partition} offsets {s.start}..{s.start + n - 1}" for s, n in old.items()
    )
    raise ReplayRefused(
        f"refusing to {what} {sum(old.values())} message(s) older than the dedupe retention "
        f"(IDV_RETENTION_S = {_duration(retention_s)}): {where}. Their dedupe records may have been purged, "
        "so only the provider's own idempotency-key retention would stop a second side effect. Narrow the "
        "range, or pass --force if you have checked that this is acceptable."
    )


async def read_spans(
    consumer: AIOKafkaConsumer, spans: Sequence[Span], max_records: int = 500
) -> AsyncIterator[list[ConsumerRecord]]:
    """Batches of the spans' messages, each partition in offset order, until every span is read.

    A partition is finished when the consumer's position reaches the span's end (transaction markers and
    compacted-away offsets are skipped by the position, not counted as messages).
    """
    active = {s.tp: s for s in spans if s.size}
    if not active:
        return
    consumer.assign(list(active))
    for span in active.values():
        consumer.seek(span.tp, span.start)
    while active:
        batch = await consumer.getmany(*active, timeout_ms=1000, max_records=max_records)
        out: list[ConsumerRecord] = []
        for tp, messages in batch.items():
            current = active.get(tp)
            if current is not None:
                lo, hi = current.start, current.end
                out.extend(m for m in messages if lo <= m.offset < hi)
        for tp in list(active):
            if await consumer.position(tp) >= active[tp].end:
                consumer.pause(tp)
                del active[tp]
        if out:
            yield out


def _lane(msg: ConsumerRecord) -> tuple[Any, ...]:
    # The daemon's rule: same key, same partition → one after another; no key → no ordering promise.
    if msg.key is None:
        return (msg.topic, msg.partition, None, msg.offset)
    return (msg.topic, msg.partition, msg.key)


async def run_lanes(
    batch: Iterable[ConsumerRecord], handle: Callable[[ConsumerRecord], Awaitable[None]], concurrency: int
) -> None:
    lanes: dict[tuple[Any, ...], list[ConsumerRecord]] = {}
    for msg in batch:
        lanes.setdefault(_lane(msg), []).append(msg)
    limiter = anyio.CapacityLimiter(concurrency)

    async def run(messages: list[ConsumerRecord]) -> None:
        for msg in messages:
            async with limiter:
                await handle(msg)

    async with anyio.create_task_group() as tg:
        for messages in lanes.values():
            tg.start_soon(run, messages)


# -- shared machinery ---------------------------------------------------------------------------------


def _owner(settings: Settings) -> str:
    return f"replay:{settings.instance_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _provider(settings: Settings) -> ProviderClient:
    return ProviderClient.from_settings(settings)  # built exactly like the daemon's


def _processor(
    settings: Settings,
    store: DedupeStore,
    provider: ProviderClient,
    *,
    want_records: bool,
    ignore_key_retention: bool = False,
) -> Processor:
    return Processor(
        provider_key_retention_s=settings.provider_key_retention_s,
        ignore_key_retention=ignore_key_retention,
        store=store,
        provider=provider,
        owner=_owner(settings),
        namespace=settings.namespace,
        lease_s=settings.lease_s,
        retention_s=settings.retention_s,
        max_message_bytes=settings.max_message_bytes,
        want_records=want_records,
        fingerprint_key=settings.fingerprint_key,
    )


def _sinks(settings: Settings, dlq_topic: str | None, group: str | None) -> Sinks:
    """The dead-letter/results producer of a replay or redrive run, labelled with the tool's group."""
    return Sinks(
        bootstrap=settings.kafka_bootstrap,
        dlq_topic=dlq_topic,
        results_topic=settings.result_topic,
        group_id=group or DEFAULT_GROUP_LABEL,
        producer_kwargs=settings.kafka_security(),
    )


async def _with_lookup(
    settings: Settings, run: _Run, go: Callable[[Callable[[str], Awaitable[Record | None]]], Awaitable[None]]
) -> None:
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


class _Run:
    """State shared by the handlers of one run: the report, progress, cancellation on fatal errors."""

    def __init__(self, report: Report, progress: Progress | None) -> None:
        self.report = report
        self.progress = progress
        self.scope = anyio.CancelScope()

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


async def _watch_signals(run: _Run) -> None:
    import signal

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            run.report.interrupted = True
            run.scope.cancel()
            return


async def _guarded(run: _Run, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` under the run's cancel scope, with SIGINT/SIGTERM stopping it cleanly.

    Only the read-and-handle loop runs inside the scope. The store, provider client and producers are
    opened *outside* it: a handler cancelled mid-call releases its lease through the store (shielded), and
    the store's own writer task must not be cancelled along with it.
    """
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, run)
        with run.scope:
            await body()
        tg.cancel_scope.cancel()
    if run.scope.cancelled_caught and run.report.fatal is None:
        run.report.interrupted = True
    done = run.report.handled
    if run.report.planned > done and (run.report.interrupted or run.report.fatal):
        run.report.counts["not reached"] += run.report.planned - done


# -- dry run -------------------------------------------------------------------------------------------


async def classify(
    get: Callable[[str], Awaitable[Record | None]], settings: Settings, msg: ConsumerRecord, now: float
) -> tuple[str, str | None]:
    """What the pipeline would do with ``msg``, from read-only store lookups: (category, invalid reason)."""
    try:
        envelope = decode(msg.value, msg.headers, max_bytes=settings.max_message_bytes)
    except EnvelopeError as exc:
        return "invalid", exc.reason
    record = await get(idempotency_key(settings.namespace, envelope.operation, envelope.message_id))
    if record is None:
        return "new", None
    if not Fingerprinter(settings.fingerprint_key).matches(record.fingerprint, envelope):
        return "conflict", None
    if record.state is State.IN_PROGRESS:
        expired = record.lease_until is not None and record.lease_until <= now
        return ("in progress (lease expired)" if expired else "in progress"), None
    if record.state is State.RELEASED:
        return "released (will be retried)", None
    return record.state.value, None  # completed | failed


async def _no_record(_key: str) -> Record | None:
    return None


# -- replay --------------------------------------------------------------------------------------------


@dataclass
class ReplayRequest:
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


def _check_group(settings: Settings, group: str | None) -> None:
    if group is not None and group == settings.group_id:
        raise ReplayRefused(
            f"--group {group} is the live consumer group (IDV_GROUP_ID); the replay tool never moves its "
            "offsets. Use another name, or none."
        )


async def replay(
    settings: Settings,
    req: ReplayRequest,
    *,
    confirm: Callable[[str], bool] | None = None,
    progress: Callable[[int, str], Progress | None] | None = None,
) -> Report:
    """Replay (or classify, or re-verify) a range of ``req.topic``. Raises :class:`ReplayRefused`."""
    _check_group(settings, req.group)
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
    consumer = _consumer(settings, req.group)
    await _start(consumer, settings)
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
                f"({_duration(settings.retention_s)}); a replay of them is refused without --force"
            )
        elif old and not req.force:
            _refuse_old(old, settings.retention_s, "replay")
        elif old:
            report.notes.append(
                f"--force: {sum(old.values())} message(s) older than the dedupe retention replayed"
            )
        if req.retry_failed and report.planned and confirm is not None:
            where = ", ".join(f"{s.tp.partition}:{s.start}..{s.end - 1}" for s in spans if s.size)
            question = (
                f"Retry up to {report.planned} message(s) of {req.topic} (partition:offsets {where}) whose "
                "recorded outcome is FAILED, under NEW idempotency keys? Each is sent to the provider again "
                "(billable); one the provider had in fact performed would be performed a second time."
            )
            if not await anyio.to_thread.run_sync(confirm, question):
                raise ReplayRefused("not confirmed; nothing was sent")
        if req.reverify and report.planned and confirm is not None:
            where = ", ".join(f"{s.tp.partition}:{s.start}..{s.end - 1}" for s in spans if s.size)
            question = (
                f"Re-verify up to {report.planned} message(s) of {req.topic} (partition:offsets {where}) "
                "under NEW idempotency keys? Every completed request among them is sent to the provider "
                "again: a second, billable side effect each."
            )
            if not await anyio.to_thread.run_sync(confirm, question):
                raise ReplayRefused("not confirmed; nothing was sent")
        bar = progress(report.planned, mode) if progress is not None else None
        run = _Run(report, bar)

        if req.dry_run:
            await _dry_run(settings, consumer, spans, run, req.concurrency)
        else:
            await _replay(settings, consumer, spans, run, req)
        if bar is not None:
            bar.close(report.counts)
    finally:
        await _stop(consumer)
    return report


async def _dry_run(
    settings: Settings, consumer: AIOKafkaConsumer, spans: Sequence[Span], run: _Run, concurrency: int
) -> None:
    async def go(get: Callable[[str], Awaitable[Record | None]]) -> None:
        now = time.time()

        async def handle(msg: ConsumerRecord) -> None:
            category, reason = await classify(get, settings, msg, now)
            run.count(category, reason)

        async def loop() -> None:
            async for batch in read_spans(consumer, spans):
                await run_lanes(batch, handle, concurrency)

        await _guarded(run, loop)

    await _with_lookup(settings, run, go)


async def _replay(
    settings: Settings, consumer: AIOKafkaConsumer, spans: Sequence[Span], run: _Run, req: ReplayRequest
) -> None:
    async with open_store(settings.store_url) as store, _provider(settings) as provider:
        sinks = _sinks(settings, settings.dead_letter_topic if req.dead_letters else None, req.group)
        processor = _processor(settings, store, provider, want_records=settings.result_topic is not None)
        await sinks.start()
        try:
            if req.reverify or req.retry_failed:
                reverifier = _Reverifier(settings, store, processor, req)
                handle = reverifier.handler(run, sinks)
            else:
                handle = _replay_handler(processor, sinks, run, req)

            async def loop() -> None:
                async for batch in read_spans(consumer, spans):
                    await run_lanes(batch, handle, req.concurrency)
                    if req.group is not None:
                        await _commit_progress(consumer, batch)

            await _guarded(run, loop)
        finally:
            with anyio.CancelScope(shield=True):
                await sinks.stop()


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


_DISPOSITION_LABEL = {
    Disposition.COMPLETED: "completed",
    Disposition.FAILED: "failed (provider 4xx)",
    Disposition.DUPLICATE: "duplicate (not sent)",
    Disposition.CONFLICT: "conflict",
    Disposition.INVALID: "invalid",
    Disposition.SET_ASIDE: "set aside (retries exhausted)",
    Disposition.IN_DOUBT: "in doubt (dead-lettered)",
    Disposition.ERROR: "internal error",
}


def _replay_handler(
    processor: Processor, sinks: Sinks, run: _Run, req: ReplayRequest
) -> Callable[[ConsumerRecord], Awaitable[None]]:
    async def handle(msg: ConsumerRecord) -> None:
        try:
            handled = await processor.handle_safely(msg)
        except ProviderAuthError as exc:
            run.fatal(exc)
            return
        await _sink(sinks, msg, handled, emit_duplicates=req.emit_results)
        letter = handled.dead_letter
        reason = letter.reason if letter is not None and handled.disposition is Disposition.INVALID else None
        run.count(_DISPOSITION_LABEL[handled.disposition], reason)

    return handle


def _publishes_result(handled: Handled, emit_duplicates: bool, sinks: Sinks) -> bool:
    if sinks.results_topic is None or handled.record is None:
        return False
    if handled.disposition in (Disposition.COMPLETED, Disposition.FAILED):
        return True
    return handled.disposition is Disposition.DUPLICATE and emit_duplicates


async def _sink(
    sinks: Sinks,
    msg: ConsumerRecord,
    handled: Handled,
    *,
    emit_duplicates: bool,
    letter: DeadLetter | None = None,
) -> None:
    """Dead letter or result, as the daemon writes them (results of duplicates only when asked)."""
    letter = letter or handled.dead_letter
    if letter is not None:
        await sinks.dead_letter(msg, letter, time.time())
    elif handled.record is not None and _publishes_result(handled, emit_duplicates, sinks):
        await sinks.result(handled.record, msg.key, handled.subject_id or "")


# -- reverify ------------------------------------------------------------------------------------------


class _Reverifier:
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

    def handler(self, run: _Run, sinks: Sinks) -> Callable[[ConsumerRecord], Awaitable[None]]:
        async def handle(msg: ConsumerRecord) -> None:
            try:
                outcome, reason = await self.one(msg, sinks)
            except ProviderAuthError as exc:
                run.fatal(exc)
                return
            except Exception as exc:  # noqa: BLE001 - one message hitting a bug must not stop the run
                log.error(
                    "unexpected %s while re-verifying a message",
                    type(exc).__name__,
                    extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
                )
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


# -- dead letters ----------------------------------------------------------------------------------


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
    consumer = _consumer(settings, None)
    await _start(consumer, settings)
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
        await _stop(consumer)
    return [item[3] for item in sorted(kept, key=lambda item: item[:3])], matched


def dlq_table(entries: Sequence[DeadLetterEntry]) -> str:
    """Reason, detail, original position and times; never payloads."""
    header = ("dead-lettered", "reason", "original", "attempts", "first failure", "detail")
    rows = [
        (
            _iso_ms(e.dlq_timestamp),
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
    _check_group(settings, group)
    dlq_topic = settings.dead_letter_topic
    if dlq_topic is None:
        raise ReplayRefused("dead letters are disabled (IDV_DLQ_TOPIC is 'none')")
    if emit_results and settings.result_topic is None:
        raise ReplayRefused("--emit-results needs a results topic (IDV_RESULTS_TOPIC is 'none')")
    label = f"dlq redrive ({'dry run' if dry_run else mode.value})"
    bad = frozenset({"not reached", "unreadable dead letter"})
    if not dry_run and mode is RedriveMode.DIRECT:
        bad |= {"dead-lettered again", "set aside (retries exhausted)"}
    report = Report(label, bad=bad)
    consumer = _consumer(settings, group)
    await _start(consumer, settings)
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
                f"dedupe retention (IDV_RETENTION_S = {_duration(settings.retention_s)}), e.g. "
                f"{old[0].topic}/{old[0].partition}@{old[0].offset} "
                f"from {_iso_ms(old[0].original_timestamp or 0)}. "
                "Their dedupe records may have been purged, so only the provider's own idempotency-key "
                "retention would stop a second side effect. Pass --force if you have checked that this is "
                "acceptable."
            )
        if old:
            report.notes.append(f"{len(old)} dead letter(s) older than the dedupe retention")
        wanted = {(e.dlq_partition, e.dlq_offset): e for e in chosen.values()}
        # Pass 2: the selected dead letters, read again (values are not kept in memory between passes).
        bar = progress(report.planned, label) if progress is not None else None
        run = _Run(report, bar)

        if dry_run:
            await _redrive_dry_run(settings, consumer, spans, wanted, run, concurrency)
        else:
            if force and mode is RedriveMode.DIRECT and "in_doubt" in reasons:
                report.notes.append(
                    "--force: unfinished records older than the provider's key retention "
                    f"({_duration(settings.provider_key_retention_s)}) are sent again; if the provider has "
                    "forgotten the key and had acted, that is a second side effect"
                )
            await _redrive(
                settings, consumer, spans, wanted, run, mode, group, emit_results, concurrency, force=force
            )
        if bar is not None:
            bar.close(report.counts)
    finally:
        await _stop(consumer)
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
    run: _Run,
    concurrency: int,
) -> None:
    async def go(get: Callable[[str], Awaitable[Record | None]]) -> None:
        now = time.time()

        async def handle(msg: ConsumerRecord) -> None:
            category, reason = await classify(get, settings, msg, now)
            run.count(category, reason)

        async def loop() -> None:
            async for pairs in _selected(consumer, spans, wanted):
                originals = []
                for msg, entry in pairs:
                    if entry.original is None:
                        run.count("unreadable dead letter")
                    else:
                        originals.append(strip_dead_letter(msg, entry))
                await run_lanes(originals, handle, concurrency)

        await _guarded(run, loop)

    await _with_lookup(settings, run, go)


async def _redrive(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    spans: Sequence[Span],
    wanted: dict[tuple[int, int], DeadLetterEntry],
    run: _Run,
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
    async with open_store(settings.store_url) as store, _provider(settings) as provider:
        sinks = _sinks(settings, settings.dead_letter_topic, group)
        # --force also overrides the in-doubt hold on records older than the provider's key retention.
        processor = _processor(
            settings,
            store,
            provider,
            want_records=settings.result_topic is not None,
            ignore_key_retention=force,
        )
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
            await _sink(sinks, original, handled, emit_duplicates=emit_results, letter=letter)
            if letter is not None:
                outcome = (
                    "set aside (retries exhausted)"
                    if handled.disposition is Disposition.SET_ASIDE
                    else "dead-lettered again"
                )
                run.count(outcome, letter.reason)
            else:
                run.count(_DISPOSITION_LABEL[handled.disposition])

        async def loop() -> None:
            async for pairs in _selected(consumer, spans, wanted):
                originals = []
                for msg, entry in pairs:
                    if entry.original is None:
                        run.count("unreadable dead letter")
                        continue
                    entries[entry.original] = entry
                    originals.append(strip_dead_letter(msg, entry))
                await run_lanes(originals, handle, concurrency)

        try:
            await _guarded(run, loop)
        finally:
            with anyio.CancelScope(shield=True):
                await sinks.stop()


async def _republish(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    spans: Sequence[Span],
    wanted: dict[tuple[int, int], DeadLetterEntry],
    run: _Run,
) -> None:
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
            for msg, entry in pairs:
                if entry.original is None:
                    run.count("unreadable dead letter")
                    continue
                original = strip_dead_letter(msg, entry)
                # Keyed like the original, so it lands in the partition the key maps to today, in order.
                fut = await producer.send(
                    original.topic, original.value, key=original.key, headers=list(original.headers)
                )
                futures.append(fut)
            for fut in futures:
                await fut
                run.count("republished")

    try:
        await _guarded(run, loop)
    finally:
        with anyio.CancelScope(shield=True):
            await producer.stop()


def operator_name() -> str:
    user = os.environ.get("USER") or os.environ.get("LOGNAME")
    if user:
        return user
    try:
        import getpass

        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def progress_factory(enabled: bool) -> Callable[[int, str], Progress | None]:
    def make(total: int, label: str) -> Progress | None:
        return Progress(total, label=label) if enabled else None

    return make
