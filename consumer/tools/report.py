"""The tools' output: the end-of-run :class:`Report` (counts, notes, exit code), :class:`Progress`, times."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from consumer.exits import EXIT_INCOMPLETE, EXIT_OK, EXIT_PROVIDER_AUTH

__all__ = ["Progress", "Report", "duration", "iso_ms", "ms", "progress_factory"]


def ms(when: datetime) -> int:
    """``when`` as Kafka's epoch milliseconds."""
    return int(when.timestamp() * 1000)


def iso_ms(epoch_ms: int) -> str:
    """Epoch milliseconds as an ISO 8601 UTC time to the second (``2026-11-28T22:00:00Z``)."""
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def duration(seconds: float) -> str:
    """``30 days`` for whole days, else ``H:MM:SS``."""
    if seconds >= 86400 and seconds % 86400 == 0:
        return f"{int(seconds // 86400)} days"
    return str(timedelta(seconds=round(seconds)))


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
            f", eta {duration((self.total - self.done) / rate)}"
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


def progress_factory(enabled: bool) -> Callable[[int, str], Progress | None]:
    """What the tools call with (total, label) to get a progress display, or None when it is off."""

    def make(total: int, label: str) -> Progress | None:
        return Progress(total, label=label) if enabled else None

    return make
