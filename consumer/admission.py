"""How many workers may hold a message at once: a multiple of the provider concurrency limit.

The worker pool is as large as the concurrency ceiling (``IDV_MAX_IN_FLIGHT``, 4,096 by default), so a
slow provider can have thousands of calls in flight. When the adaptive limit is far below the ceiling
(a fast or rate-limited provider), every idle worker would still take a message, decode and claim it,
and park at the provider gate: thousands of claimed messages waiting (their leases running, their
memory held), and each fetch batch waking hundreds of workers in one event-loop turn. Admission lets
``factor`` × the limit + ``extra`` workers past the point where a worker takes its next message, enough
to keep the gate full while the others do their store and result work, and no more; workers sleeping
between retries (:meth:`Admission.backing_off`: a 429's Retry-After, a back-off) do not count, or a
rate-limited provider's refusals would take the permits the gate needs and the limit, never tested,
would not grow again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from consumer.concurrency import ConcurrencyGate

__all__ = ["Admission"]


class Admission:
    """A FIFO gate of ``factor`` × ``limit()`` + ``extra`` permits, plus one per worker sleeping between
    retries (the size is read on every acquire and release, so it follows the controller)."""

    def __init__(self, limit: Callable[[], int], factor: float = 2.0, extra: int = 16) -> None:
        self._read = limit
        self.factor = factor
        self.extra = extra
        self.sleeping = 0  # admitted workers sleeping between retries (the provider client's back-offs)
        self.gate = ConcurrencyGate(self)  # its in_flight: workers admitted; waiting: those queued

    @property
    def limit(self) -> int:
        return int(self._read() * self.factor) + self.extra + self.sleeping

    @contextmanager
    def backing_off(self) -> Iterator[None]:
        """Around an admitted worker's sleep between retries: its permit does not count meanwhile, so
        one more waiter is admitted at once."""
        self.sleeping += 1
        self.gate.wake()
        try:
            yield
        finally:
            self.sleeping -= 1

    async def acquire(self) -> None:
        await self.gate.acquire()

    def release(self) -> None:
        self.gate.release()
