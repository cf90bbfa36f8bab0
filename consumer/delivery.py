"""Delivery: what a handled message writes to the sinks before its offset may be marked done.

One rule for the daemon and the tools: a dead letter if the pipeline set the message aside, otherwise the
result event of its stored record (buffered for the next transaction in transactional mode). A result the
results topic will never accept dead-letters the message instead (the outcome stays recorded; the gap is
visible). Anything unexpected while writing dead-letters the message ``internal_error``: no record stops
the caller.

Dead letter or result first, then the offset: both must be on the broker (or, transactional, in the
transaction that commits the offset) before the watermark may pass this message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from consumer import tracing
from consumer.errors import ProviderAuthError
from consumer.logs import log_unexpected, position
from consumer.model import DeadLetter, Disposition, Handled
from consumer.sinks import Sinks, Unwritable

log = logging.getLogger(__name__)

__all__ = ["deliver"]


async def deliver(
    handled: Handled,
    msg: ConsumerRecord,
    sinks: Sinks,
    *,
    emit_duplicates: bool = True,
    on_dead_letter: Callable[[str], None] | None = None,
) -> Handled:
    """Write ``handled``'s dead letter or result for ``msg``; returns what finally became of it (an
    ``ERROR`` disposition if writing failed unexpectedly). ``emit_duplicates=False`` publishes no result
    for a skipped duplicate. ``on_dead_letter(reason)`` is called for every dead letter on the broker
    (written or as a stub). Raises only :class:`ProviderAuthError` and cancellation."""
    try:
        await _write(handled, msg, sinks, emit_duplicates, on_dead_letter)
    except ProviderAuthError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug meeting one record must not stop the caller
        log_unexpected(log, exc, msg, "writing the outcome of a message; dead-lettering it")
        letter = DeadLetter("internal_error", f"{type(exc).__name__} in the consumer")
        handled = Handled(Disposition.ERROR, letter)
        await _dead_letter(sinks, msg, letter, on_dead_letter)
    return handled


async def _write(
    handled: Handled,
    msg: ConsumerRecord,
    sinks: Sinks,
    emit_duplicates: bool,
    on_dead_letter: Callable[[str], None] | None,
) -> None:
    if handled.dead_letter is not None:
        await _dead_letter(sinks, msg, handled.dead_letter, on_dead_letter)
        return
    if handled.raw_results:
        await _write_raw(handled, msg, sinks, on_dead_letter)
        return
    record = handled.record
    if record is None or (handled.disposition is Disposition.DUPLICATE and not emit_duplicates):
        return
    if sinks.transactional:
        sinks.buffer_result(TopicPartition(msg.topic, msg.partition), msg, record, handled.subject_id or "")
        return
    try:
        with tracing.producer_span("idv.result", sinks.results_topic):
            await sinks.result(record, msg.key, handled.subject_id or "")
    except Unwritable as exc:
        # The outcome is recorded; only its event can never be published. Set the message aside so the
        # gap is visible, instead of retrying forever and stalling the partition.
        log.error(
            "result event can never be written (%s); dead-lettering the message",
            exc.why,
            extra=position(msg),
        )
        why = f"result event could not be written: {exc.why}; outcome recorded"
        letter = DeadLetter("internal_error", why)
        await _dead_letter(sinks, msg, letter, on_dead_letter)


async def _write_raw(
    handled: Handled, msg: ConsumerRecord, sinks: Sinks, on_dead_letter: Callable[[str], None] | None
) -> None:
    """A workflow's stored result events, written while handling ``msg`` (republished as stored)."""
    tp = TopicPartition(msg.topic, msg.partition)
    for key, value, message_id in handled.raw_results:
        if sinks.transactional:
            sinks.buffer_raw(tp, msg, key, value, message_id)
            continue
        try:
            with tracing.producer_span("idv.result", sinks.results_topic):
                await sinks.raw_result(key, value, message_id)
        except Unwritable as exc:
            log.error("workflow result event can never be written (%s); dead-lettering the message", exc.why)
            why = f"result event could not be written: {exc.why}; state recorded"
            letter = DeadLetter("internal_error", why)
            await _dead_letter(sinks, msg, letter, on_dead_letter)
            return


async def _dead_letter(
    sinks: Sinks, msg: ConsumerRecord, letter: DeadLetter, on_dead_letter: Callable[[str], None] | None
) -> None:
    with tracing.producer_span("idv.dead_letter", sinks.dlq_topic, letter.reason):
        written = await sinks.dead_letter(msg, letter, time.time())
    if written in ("written", "stub") and on_dead_letter is not None:
        on_dead_letter(letter.reason)
