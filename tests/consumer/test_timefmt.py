"""The one time format (consumer/timefmt.py): epoch seconds as ISO 8601 UTC to the millisecond, ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime

from consumer.timefmt import iso, iso_or_none


def test_epoch_seconds_become_utc_milliseconds_with_a_z() -> None:
    assert iso(0) == "1970-01-01T00:00:00.000Z"
    moment = datetime(2026, 12, 2, 6, 11, 55, 123_900, tzinfo=UTC).timestamp()
    assert iso(moment) == "2026-12-02T06:11:55.123Z"  # truncated to the millisecond, never rounded up
    assert iso(1_764_655_915) == "2025-12-02T06:11:55.000Z"


def test_an_unknown_moment_stays_unknown() -> None:
    assert iso_or_none(None) is None
    assert iso_or_none(0.0) == "1970-01-01T00:00:00.000Z"  # 0 is a moment, not "unknown"
    assert iso_or_none(1.5) == iso(1.5) == "1970-01-01T00:00:01.500Z"
