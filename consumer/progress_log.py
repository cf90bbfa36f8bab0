"""Progress lines for a person watching the daemon: "caught up" once per idle period, and the run summary.

The daemon's fetch loop feeds :meth:`CaughtUp.observe` after every ``getmany`` with the number of records
fetched and its :class:`~consumer.pipeline.Stats`. When fetches have come back empty for ``idle_s``
(default 1 s: two empty polls, so a partition whose first fetch is merely late does not count) and every
message received so far is finished, it logs ``caught up: N processed, waiting for new requests`` once;
the next non-empty fetch starts a new busy period (and so allows the next "caught up" line). Nothing here
decides anything: it only reads counters.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from consumer.pipeline import Stats

__all__ = ["CaughtUp", "processed", "run_summary"]

log = logging.getLogger("consumer.daemon")

# Dispositions that end as a dead letter (consumer/pipeline.py Disposition values).
_DEAD_LETTERED = ("invalid", "conflict", "set_aside", "in_doubt", "error")


def processed(stats: Stats) -> int:
    """Messages finished (any disposition) since start."""
    return sum(stats.by_disposition.values())


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def run_summary(stats: Stats) -> str:
    """``10 received → 8 verified, 2 duplicates skipped, 0 dead letters`` (one line, for people)."""
    d = stats.by_disposition
    parts = [f"{d.get('completed', 0)} verified"]
    if d.get("failed", 0):
        parts.append(f"{d['failed']} refused by the provider")
    parts.append(_n(d.get("duplicate", 0), "duplicate skipped", "duplicates skipped"))
    parts.append(_n(sum(d.get(k, 0) for k in _DEAD_LETTERED), "dead letter", "dead letters"))
    unfinished = stats.consumed - processed(stats)
    if unfinished > 0:
        parts.append(f"{unfinished} left for the next run")
    return f"{stats.consumed} received → " + ", ".join(parts)


class CaughtUp:
    """Logs ``caught up`` once per idle period (see the module docstring)."""

    __slots__ = ("_busy_at", "_said", "idle_s")

    def __init__(self, idle_s: float = 1.0) -> None:
        self.idle_s = idle_s
        self._said = False
        self._busy_at = time.monotonic()  # the last non-empty fetch (or the start)

    def observe(self, fetched: int, stats: Stats, now: float | None = None) -> bool:
        """Feed one fetch; returns whether the line was logged now."""
        now = time.monotonic() if now is None else now
        if fetched:
            self._said = False
            self._busy_at = now
            return False
        done = processed(stats)
        if self._said or done < stats.consumed or now - self._busy_at < self.idle_s:
            return False
        self._said = True
        log.info("caught up: %d processed, waiting for new requests", done)
        return True
