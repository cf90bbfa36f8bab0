"""Which messages a tool reads: time arguments, :class:`Span` planning (offsets, times), the retention check,
and reading the spans in offset order.

The live consumer group is never touched: partitions are ``assign()``-ed by hand. The retention check is
exact per partition: ``offsets_for_times(now - retention)`` returns the first offset whose timestamp is
within retention, so every offset before it is older.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from consumer.errors import ReplayRefused
from consumer.settings import Settings
from consumer.tools.report import duration, ms
from consumer.unreadable import getmany_past_unreadable

__all__ = ["Span", "parse_time", "plan_offsets", "plan_times", "read_spans", "refuse_old", "too_old"]

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


@dataclass(frozen=True, slots=True)
class Span:
    """Offsets ``start`` (inclusive) to ``end`` (exclusive) of one partition."""

    tp: TopicPartition
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


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
        found = await consumer.offsets_for_times(dict.fromkeys(tps, max(0, ms(since))))
        starts = {tp: (found[tp].offset if found.get(tp) is not None else end[tp]) for tp in tps}
    if until is not None:
        found = await consumer.offsets_for_times(dict.fromkeys(tps, max(0, ms(until))))
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


def refuse_old(old: dict[Span, int], retention_s: float, what: str) -> None:
    where = ", ".join(
        f"{s.tp.topic}/{s.tp.partition} offsets {s.start}..{s.start + n - 1}" for s, n in old.items()
    )
    raise ReplayRefused(
        f"refusing to {what} {sum(old.values())} message(s) older than the dedupe retention "
        f"(IDV_RETENTION_S = {duration(retention_s)}): {where}. Their dedupe records may have been purged, "
        "so only the provider's own idempotency-key retention would stop a second side effect. Narrow the "
        "range, or pass --force if you have checked that this is acceptable."
    )


async def read_spans(
    consumer: AIOKafkaConsumer, spans: Sequence[Span], max_records: int = 500
) -> AsyncIterator[list[ConsumerRecord]]:
    """Batches of the spans' messages, each partition in offset order, until every span is read.

    A record the client cannot read comes as its :class:`~consumer.unreadable.UnreadableRecord`. A
    partition is finished when the consumer's position reaches the span's end (transaction markers and
    compacted-away offsets are skipped by the position, not counted as messages).
    """
    active = {s.tp: s for s in spans if s.size}
    if not active:
        return
    consumer.assign(list(active))
    for span in active.values():
        consumer.seek(span.tp, span.start)
    while active:
        batch = await getmany_past_unreadable(consumer, active, timeout_ms=1000, max_records=max_records)
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
