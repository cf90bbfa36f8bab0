"""UUIDv7 message IDs: layout bits, time, strict monotonicity."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from producer import ids
from producer.ids import new_message_id, uuid7


def _ms(value: uuid.UUID) -> int:
    return value.int >> 80


def _isolate_generator_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # The generator's last timestamp is process-global; put it back so a faked clock cannot leak
    # future-dated IDs into later tests.
    monkeypatch.setattr(ids, "_last_ms", ids._last_ms)
    monkeypatch.setattr(ids, "_seq", ids._seq)


def test_version_and_variant_bits() -> None:
    for _ in range(1000):
        value = uuid7()
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert (value.int >> 76) & 0xF == 7
        assert (value.int >> 62) & 0b11 == 0b10


def test_timestamp_is_the_current_unix_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    # The counter may borrow a few milliseconds ahead after a burst in an earlier test.
    assert before <= _ms(value) <= after + 50


def test_strictly_increasing_as_ints_and_as_strings() -> None:
    values = [uuid7() for _ in range(20_000)]
    assert all(a.int < b.int for a, b in zip(values, values[1:], strict=False))
    texts = [str(v) for v in values]
    assert texts == sorted(texts)
    assert len(set(texts)) == len(texts)


def test_counter_overflow_within_one_millisecond_borrows_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_generator_state(monkeypatch)
    frozen = time.time_ns() + 10_000_000_000  # 10 s ahead of anything generated so far
    monkeypatch.setattr(time, "time_ns", lambda: frozen)
    values = [uuid7() for _ in range(10_000)]  # more than the 12-bit counter holds
    assert all(a.int < b.int for a, b in zip(values, values[1:], strict=False))
    frozen_ms = frozen // 1_000_000
    assert _ms(values[0]) == frozen_ms
    assert _ms(values[-1]) > frozen_ms  # borrowed
    assert _ms(values[-1]) - frozen_ms <= 10  # ...but only as far as needed


def test_clock_going_backwards_keeps_order(monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_generator_state(monkeypatch)
    first = uuid7()
    monkeypatch.setattr(time, "time_ns", lambda: (_ms(first) - 5_000) * 1_000_000)
    second = uuid7()
    assert second.int > first.int


def test_unique_and_increasing_per_thread_across_threads() -> None:
    per_thread: list[list[uuid.UUID]] = [[] for _ in range(8)]

    def work(out: list[uuid.UUID]) -> None:
        out.extend(uuid7() for _ in range(2_000))

    threads = [threading.Thread(target=work, args=(out,)) for out in per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [v for out in per_thread for v in out]
    assert len(set(everything)) == len(everything)
    for out in per_thread:
        assert all(a.int < b.int for a, b in zip(out, out[1:], strict=False))


def test_random_bits_differ() -> None:
    low_bits = {uuid7().int & ((1 << 62) - 1) for _ in range(1000)}
    assert len(low_bits) == 1000


def test_new_message_id_is_the_canonical_string_form() -> None:
    text = new_message_id()
    assert len(text) == 36
    assert text == text.lower()
    assert str(uuid.UUID(text)) == text
    assert uuid.UUID(text).version == 7
