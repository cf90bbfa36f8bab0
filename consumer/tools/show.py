"""One request's story for an operator (``idv-consumer show <message-id>``): its dedupe records, conflicts,
dead letters and result events, each with where it is; never payloads.

* **Records**: the message's idempotency key is derived for ``operation`` (or every registered operation)
  and looked up, then its re-verification generations 1, 2 … until one is missing (the walk of
  :mod:`consumer.tools.reverify`). Keys are shown hashed (:func:`consumer.keys.key_hash`).
* **Conflicts**: the store's conflict log for the message ID (where it arrived with a different payload).
* **Dead letters**: the dead-letter topic, read from ``since``; a dead letter belongs to the message when
  its ``idv-message-id`` header or, failing that, its value's ``message_id`` is the ID. The value is
  parsed only to compare that one field: it is the original request (personal data) and never printed.
* **Results**: the results topic from ``since``, by the ``idv-message-id`` header.
* **Workflow** (``kyc_workflow``): its row, step records, events and outbox (:mod:`consumer.tools.showflow`).

Read-only throughout: no consumer group (partitions are ``assign()``-ed), a SQLite store file that does not
exist is not created.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from consumer.errors import ReplayRefused
from consumer.keys import idempotency_key, key_hash
from consumer.settings import Settings
from consumer.store import Record, open_store
from consumer.timefmt import iso, iso_or_none
from consumer.tools.dlq import entry_of
from consumer.tools.report import iso_ms
from consumer.tools.runner import _sqlite_file_missing, open_consumer
from consumer.tools.showflow import workflow_story, workflow_text
from consumer.tools.spans import plan_times, read_spans
from consumer.wiring import stop_consumer
from producer.envelope import HEADER_MESSAGE_ID, OPERATIONS

__all__ = ["Story", "show"]

_MAX_DECODE_BYTES = 4 * 1024 * 1024  # a dead letter bigger than this is matched by its header only


def _header(msg: ConsumerRecord, name: str) -> str | None:
    found = None
    for key, value in msg.headers or ():
        if key == name and value is not None:
            found = value
    return found.decode("utf-8", "replace") if found is not None else None


def _value_message_id(value: bytes | None) -> str | None:
    if not value or len(value) > _MAX_DECODE_BYTES:
        return None
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    mid = obj.get("message_id") if isinstance(obj, dict) else None
    return mid if isinstance(mid, str) else None


def _record_json(record: Record, generation: int) -> dict[str, Any]:
    outcome = record.outcome
    return {
        "operation": record.operation,
        "generation": generation,
        "key_hash": key_hash(record.key),
        "state": record.state.value,
        "attempts": record.attempts,
        "owner": record.owner,
        "lease_until": iso_or_none(record.lease_until),
        "last_error": record.last_error,
        "outcome_status": outcome.status if outcome else None,
        "http_status": outcome.http_status if outcome else None,
        "provider_reference": outcome.provider_reference if outcome else None,
        "outcome_detail": outcome.detail if outcome else None,
        "created_at": iso_or_none(record.created_at),
        "updated_at": iso_or_none(record.updated_at),
        "expires_at": iso_or_none(record.expires_at),
    }


@dataclass
class Story:
    """Everything found for one message ID (JSON-ready, no payloads)."""

    message_id: str
    since: str
    records: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    workflow: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.records or self.conflicts or self.dead_letters or self.results or self.workflow)

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {"message_id": fields.pop("message_id"), "found": self.found, **fields}

    def text(self) -> str:
        if not self.found:
            return "\n".join(
                [f"message {self.message_id}: not found (topics scanned since {self.since})"]
                + [f"note: {n}" for n in self.notes]
            )
        lines = [f"message {self.message_id}"]
        lines.append("records:" if self.records else "records: none")
        for r in self.records:
            outcome = ""
            if r["outcome_status"]:
                outcome = f"  outcome {r['outcome_status']} (HTTP {r['http_status']}"
                outcome += f", ref {r['provider_reference']})" if r["provider_reference"] else ")"
            lines.append(
                f"  {r['operation']} gen {r['generation']}  key #{r['key_hash']}  {r['state']}  "
                f"attempts {r['attempts']}{outcome}"
            )
            lines.append(f"    created {r['created_at']}  updated {r['updated_at']}")
            if r["owner"]:
                lines.append(f"    owner {r['owner']}  lease until {r['lease_until']}")
            if r["last_error"]:
                lines.append(f"    last error {r['last_error']}")
            if r["outcome_detail"]:
                lines.append(f"    detail {r['outcome_detail']}")
        lines.append("conflicts:" if self.conflicts else "conflicts: none")
        lines.extend(f"  {c['seen_at']}  key #{c['key_hash']}  at {c['source']}" for c in self.conflicts)
        lines.append("dead letters:" if self.dead_letters else "dead letters: none")
        for d in self.dead_letters:
            lines.append(
                f"  {d['topic']}/{d['partition']}@{d['offset']}  {d['dead_lettered_at']}  {d['reason']}  "
                f"original {d['original'] or '?'}  attempts {d['attempts']}"
            )
            if d["detail"]:
                lines.append(f"    {d['detail']}")
        lines.append("results:" if self.results else "results: none")
        lines.extend(
            f"  {r['topic']}/{r['partition']}@{r['offset']}  {r['written_at']}  {r['status']}"
            f"  {r['operation']}  key #{r['key_hash']}"
            for r in self.results
        )
        if self.workflow is not None:
            lines.extend(workflow_text(self.workflow))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


async def _records(settings: Settings, story: Story, operations: Sequence[str]) -> None:
    if _sqlite_file_missing(settings.store_url):
        story.notes.append("the dedupe store does not exist yet")
        return
    async with open_store(settings.store_url) as store:
        for operation in operations:
            generation = 0
            while True:
                key = idempotency_key(settings.namespace, operation, story.message_id, generation=generation)
                record = await store.get(key)
                if record is None:
                    break
                story.records.append(_record_json(record, generation))
                generation += 1
        story.workflow = await workflow_story(settings, store, story.message_id)
        for c in await store.conflicts(story.message_id):
            seen = c.get("seen_at")
            story.conflicts.append(
                {
                    "key_hash": key_hash(str(c["key"])),
                    "source": c.get("source"),
                    "seen_at": iso(seen)
                    if isinstance(seen, int | float)
                    else (seen.isoformat() if isinstance(seen, datetime) else seen),
                }
            )


async def _scan(
    settings: Settings, consumer: AIOKafkaConsumer, topic: str, since: datetime, story: Story
) -> list[ConsumerRecord]:
    """The records of ``topic`` from ``since`` that belong to the message (header, or value for DLQs)."""
    try:
        spans = await plan_times(settings, consumer, topic, None, since, None)
    except ReplayRefused as exc:
        story.notes.append(str(exc))
        return []
    dead_letters = topic == settings.dead_letter_topic
    out = []
    async for batch in read_spans(consumer, spans):
        for msg in batch:
            header = _header(msg, HEADER_MESSAGE_ID)
            if header == story.message_id or (
                dead_letters and header is None and _value_message_id(msg.value) == story.message_id
            ):
                out.append(msg)
    return out


async def show(
    settings: Settings, message_id: str, *, operation: str | None = None, since: datetime
) -> Story:
    """Collect ``message_id``'s story (see the module docstring)."""
    if operation is not None and operation not in OPERATIONS:
        raise ReplayRefused(f"unknown operation {operation!r}; known: {', '.join(sorted(OPERATIONS))}")
    story = Story(message_id, since.isoformat(timespec="seconds").replace("+00:00", "Z"))
    await _records(settings, story, [operation] if operation else sorted(OPERATIONS))
    topics = [t for t in (settings.dead_letter_topic, settings.result_topic) if t is not None]
    if not topics:
        return story
    consumer = await open_consumer(settings, None)
    try:
        if settings.dead_letter_topic is not None:
            for msg in await _scan(settings, consumer, settings.dead_letter_topic, since, story):
                e = entry_of(msg)
                story.dead_letters.append(
                    {
                        "topic": msg.topic,
                        "partition": e.dlq_partition,
                        "offset": e.dlq_offset,
                        "dead_lettered_at": iso_ms(e.dlq_timestamp),
                        "reason": e.reason,
                        "detail": e.detail,
                        "original": f"{e.topic}/{e.partition}@{e.offset}" if e.original else None,
                        "attempts": e.attempts,
                        "first_failure_at": e.first_failure_at,
                    }
                )
        if settings.result_topic is not None:
            for msg in await _scan(settings, consumer, settings.result_topic, since, story):
                try:
                    event = orjson.loads(msg.value or b"")
                except orjson.JSONDecodeError:
                    event = {}
                event = event if isinstance(event, dict) else {}
                story.results.append(
                    {
                        "topic": msg.topic,
                        "partition": msg.partition,
                        "offset": msg.offset,
                        "written_at": iso_ms(msg.timestamp),
                        "status": event.get("status"),
                        "operation": event.get("operation"),
                        "key_hash": key_hash(str(event.get("idempotency_key") or "")),
                        "http_status": event.get("http_status"),
                        "provider_reference": event.get("provider_reference"),
                        "revision": event.get("revision"),
                    }
                )
    finally:
        await stop_consumer(consumer)
    return story
