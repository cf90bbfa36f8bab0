"""How many workers may hold a message at once: a multiple of the provider concurrency limit.

The worker pool is as large as the concurrency ceiling (``IDV_MAX_IN_FLIGHT``, 4,096 by default), so a
slow provider can have thousands of calls in flight. When the adaptive limit is far below the ceiling
(a fast or rate-limited provider), every idle worker would still take a message, decode and claim it,
and park at the provider gate: thousands of claimed messages waiting (their leases running, their
memory held), and each fetch batch waking hundreds of workers in one event-loop turn. Admission lets
``factor`` × the limit + ``extra`` workers past the point where a worker takes its next message, enough
to keep the gate full while the others do their store and result work, and no more.
"""

from __future__ import annotations

from collections.abc import Callable

from consumer.concurrency import ConcurrencyGate

__all__ = ["Admission"]


class Admission:
    """A FIFO gate of ``factor`` × ``limit()`` + ``extra`` permits (the size is read on every acquire
    and release, so it follows the controller)."""

    def __init__(self, limit: Callable[[], int], factor: float = 2.0, extra: int = 16) -> None:
        self._read = limit
        self.factor = factor
        self.extra = extra
        self._gate = ConcurrencyGate(self)

    @property
    def limit(self) -> int:
        return int(self._read() * self.factor) + self.extra

    @property
    def admitted(self) -> int:
        return self._gate.in_flight

    @property
    def waiting(self) -> int:
        return self._gate.waiting

    async def acquire(self) -> None:
        await self._gate.acquire()

    def release(self) -> None:
        self._gate.release()
