from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.offsets import PartitionOffsets


def test_watermark_stops_at_the_first_pending_offset() -> None:
    p = PartitionOffsets()
    assert p.committable() is None
    for off in (10, 11, 12, 13):
        p.add(off)
    p.done(12)
    p.done(13)
    assert p.committable() == 10  # 10 and 11 pending: never commit past them (faust #312)
    p.done(10)
    assert p.committable() == 11
    p.done(11)
    assert p.committable() == 14
    assert p.pending == 0


def test_gaps_in_offsets_are_fine() -> None:
    p = PartitionOffsets()
    p.add(5)
    p.add(9)  # compacted or transactional markers leave gaps
    p.done(9)
    assert p.committable() == 5
    p.done(5)
    assert p.committable() == 10


def test_needs_commit_only_when_ahead() -> None:
    p = PartitionOffsets(committed=3)
    p.add(3)
    assert p.needs_commit() is None  # committable 3 == committed
    p.done(3)
    assert p.needs_commit() == 4


def test_rejects_out_of_order_dispatch() -> None:
    p = PartitionOffsets()
    p.add(5)
    with pytest.raises(ValueError, match="dispatched after"):
        p.add(5)


@given(st.permutations(list(range(50))), st.integers(min_value=0, max_value=50))
def test_watermark_never_passes_an_unfinished_offset(order: list[int], finished: int) -> None:
    p = PartitionOffsets()
    for off in range(50):
        p.add(off)
    done = set(order[:finished])
    for off in order[:finished]:
        p.done(off)
    mark = p.committable()
    assert mark is not None
    assert all(o in done for o in range(mark))
    assert mark == 50 or mark not in done
