"""deliver() without a broker: dead letter or result, once, and what a failed write becomes."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord

from consumer.delivery import deliver
from consumer.model import DeadLetter, Disposition, Handled
from consumer.sinks import Sinks, Unwritable
from consumer.store.base import Record

pytestmark = pytest.mark.anyio

MSG = ConsumerRecord("t", 2, 7, 0, 0, b"k", b"v", None, 1, 1, ())
RECORD = cast(Record, object())


class FakeSinks:
    def __init__(self, *, transactional: bool = False, result_error: Exception | None = None) -> None:
        self.transactional = transactional
        self.result_error = result_error
        self.dlq_topic = "t.dlq"
        self.results_topic = "t.results"
        self.letters: list[str] = []
        self.results: list[Any] = []
        self.buffered: list[Any] = []
        self.fail_letters = 0

    async def dead_letter(self, msg: ConsumerRecord, letter: DeadLetter, now: float) -> str:
        if self.fail_letters:
            self.fail_letters -= 1
            raise RuntimeError("bug in the dead-letter path")
        self.letters.append(letter.reason)
        return "written"

    async def result(self, record: Record, key: bytes | None, subject_id: str) -> None:
        if self.result_error is not None:
            raise self.result_error
        self.results.append((record, key, subject_id))

    def buffer_result(self, tp: Any, msg: ConsumerRecord, record: Record, subject_id: str) -> None:
        self.buffered.append((tp.topic, tp.partition, msg.offset))


async def run(handled: Handled, sinks: FakeSinks, **kwargs: Any) -> tuple[Handled, list[str]]:
    counted: list[str] = []
    out = await deliver(handled, MSG, cast(Sinks, sinks), on_dead_letter=counted.append, **kwargs)
    return out, counted


async def test_a_dead_letter_is_written_once_and_counted() -> None:
    sinks = FakeSinks()
    handled = Handled(Disposition.INVALID, DeadLetter("invalid_json", "not JSON"))
    out, counted = await run(handled, sinks)
    assert out is handled and sinks.letters == ["invalid_json"] == counted and sinks.results == []


async def test_a_result_is_published_or_buffered_for_the_transaction() -> None:
    sinks = FakeSinks()
    await run(Handled(Disposition.COMPLETED, record=RECORD, subject_id="s"), sinks)
    assert sinks.results == [(RECORD, b"k", "s")] and sinks.letters == []
    txn = FakeSinks(transactional=True)
    await run(Handled(Disposition.COMPLETED, record=RECORD, subject_id="s"), txn)
    assert txn.buffered == [("t", 2, 7)] and txn.results == []


async def test_duplicates_publish_their_result_unless_told_not_to() -> None:
    sinks = FakeSinks()
    await run(Handled(Disposition.DUPLICATE, record=RECORD), sinks)
    await run(Handled(Disposition.DUPLICATE, record=RECORD), sinks, emit_duplicates=False)
    assert len(sinks.results) == 1


async def test_a_result_that_can_never_be_written_dead_letters_the_message() -> None:
    sinks = FakeSinks(result_error=Unwritable("too large", MessageSizeTooLargeError()))
    out, counted = await run(Handled(Disposition.COMPLETED, record=RECORD), sinks)
    assert out.disposition is Disposition.COMPLETED  # the outcome is recorded; only the event is missing
    assert sinks.letters == ["internal_error"] == counted


async def test_an_unexpected_error_while_writing_becomes_an_internal_error_dead_letter() -> None:
    sinks = FakeSinks()
    sinks.fail_letters = 1
    out, counted = await run(Handled(Disposition.INVALID, DeadLetter("invalid_json", "x")), sinks)
    assert out.disposition is Disposition.ERROR and out.dead_letter is not None
    assert sinks.letters == ["internal_error"] == counted
