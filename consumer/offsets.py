"""Which offset may be committed: the per-partition watermark.

Messages of one partition finish out of order (different keys run concurrently). The committed offset
must never pass a message whose outcome is not durably recorded, or a crash would lose it (faust #312,
faststream #2618). So each partition keeps its dispatched offsets in order and the commit point is the
first offset still pending — everything below it is recorded — or one past the last offset seen when
nothing is pending. Kafka's committed offset is "the next offset to read", which is exactly that.
"""

from __future__ import annotations

from collections import deque

__all__ = ["PartitionOffsets"]


class PartitionOffsets:
    __slots__ = ("_done", "_order", "committed", "last_seen")

    def __init__(self, committed: int | None = None) -> None:
        self._order: deque[int] = deque()
        self._done: dict[int, bool] = {}
        self.last_seen: int | None = None
        self.committed = committed  # the last offset we committed (next to read), if any

    def add(self, offset: int) -> None:
        if self.last_seen is not None and offset <= self.last_seen:
            raise ValueError(f"offset {offset} dispatched after {self.last_seen}")
        self.last_seen = offset
        self._order.append(offset)
        self._done[offset] = False

    def done(self, offset: int) -> None:
        if offset not in self._done:
            raise KeyError(offset)
        self._done[offset] = True
        order, done = self._order, self._done
        while order and done[order[0]]:
            del done[order.popleft()]

    @property
    def pending(self) -> int:
        return len(self._order)

    def committable(self) -> int | None:
        """The offset to commit now, or ``None`` when nothing has been dispatched."""
        if self._order:
            return self._order[0]
        if self.last_seen is None:
            return None
        return self.last_seen + 1

    def needs_commit(self) -> int | None:
        """The committable offset if it is ahead of what was committed, else ``None``."""
        offset = self.committable()
        if offset is None or (self.committed is not None and offset <= self.committed):
            return None
        return offset
