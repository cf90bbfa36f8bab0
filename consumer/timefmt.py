"""Time formatting: epoch seconds as ISO 8601 UTC text to the millisecond (``2026-12-02T06:11:55.123Z``).

The one form the result events (workflow revisions), ``idv-consumer show`` and its workflow part print a
moment in: UTC, milliseconds (truncated, not rounded), a ``Z`` instead of ``+00:00``.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["iso", "iso_or_none"]


def iso(ts: float) -> str:
    """``ts`` (seconds since the epoch) as ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_or_none(ts: float | None) -> str | None:
    """:func:`iso`, with ``None`` (a moment not known) kept as ``None``."""
    return None if ts is None else iso(ts)
