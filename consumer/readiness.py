"""Readiness: whether this instance makes progress, per partition, not only whether it is up.

A consumer whose partition stopped moving while everything else looks fine is the failure that hides
longest (PITFALLS: quix-streams #1124), so :func:`readiness_report` also fails when any partition holds
pending work that has not progressed for ``stall_after_s``. :class:`PartitionProgress` keeps the
timestamps it needs. The health endpoint (:mod:`consumer.health`) serves the report at ``/readyz``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["PartitionProgress", "Readiness", "readiness_report"]

Readiness = Callable[[], tuple[bool, dict[str, Any]]]


def readiness_report(
    assigned: int,
    broker_ok: bool,
    store_ok: bool,
    partition_progress: dict[str, tuple[float, int]],
    now: float,
    stall_after_s: float,
    *,
    require_assignment: bool = True,
) -> tuple[bool, dict[str, Any]]:
    """Decide readiness from the daemon's state; pure, so every case is a unit test.

    ``assigned`` is the number of partitions this instance owns; with ``require_assignment=False`` zero is
    fine (more instances than partitions: a standby is healthy). ``partition_progress`` maps
    ``"topic/partition"`` to ``(last_progress, pending)``: the ``time.monotonic()`` of the partition's last
    progress and the number of its messages dispatched but not done. A partition with ``pending > 0``
    whose last progress is ``stall_after_s`` or more before ``now`` is *stalled*. Idle partitions
    (``pending == 0``) never are, however old their timestamp.

    Ready iff partitions are assigned (or none are required), the broker and the store are reachable and
    no partition is stalled. The details dictionary is the JSON body of ``/readyz``.
    """
    reasons: list[str] = []
    if assigned <= 0 and require_assignment:
        reasons.append("no partitions assigned")
    if not broker_ok:
        reasons.append("Kafka broker unreachable")
    if not store_ok:
        reasons.append("dedupe store unreachable")
    stalled: dict[str, dict[str, float | int]] = {}
    for name, (last_progress, pending) in partition_progress.items():
        idle = now - last_progress
        if pending > 0 and idle >= stall_after_s:
            stalled[name] = {"pending": pending, "stalled_s": round(idle, 1)}
    reasons.extend(
        f"partition {name} stalled: {stalled[name]['pending']} pending, "
        f"no progress for {stalled[name]['stalled_s']}s"
        for name in sorted(stalled)
    )
    ready = not reasons
    details: dict[str, Any] = {
        "ready": ready,
        "assigned_partitions": assigned,
        "broker": "ok" if broker_ok else "unreachable",
        "store": "ok" if store_ok else "unreachable",
        "stalled_partitions": stalled,
        "reasons": reasons,
    }
    return ready, details


@dataclass(slots=True)
class _Progress:
    last: float
    pending: int = 0


class PartitionProgress:
    """Per-partition "last progress" timestamps for :func:`readiness_report`.

    Call :meth:`started` when a message of the partition is dispatched, :meth:`finished` when it is done
    (whatever its disposition), :meth:`remove` when the partition is revoked. Progress is a finished
    message, or work arriving at a partition that had none pending: without the second rule a partition
    idle for an hour would look stalled the moment its next message arrived.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._parts: dict[str, _Progress] = {}

    @staticmethod
    def name(topic: str, partition: int) -> str:
        return f"{topic}/{partition}"

    def started(self, topic: str, partition: int) -> None:
        key = f"{topic}/{partition}"
        entry = self._parts.get(key)
        if entry is None:
            entry = self._parts[key] = _Progress(self._clock())
        elif entry.pending == 0:
            entry.last = self._clock()
        entry.pending += 1

    def finished(self, topic: str, partition: int) -> None:
        entry = self._parts.get(f"{topic}/{partition}")
        if entry is not None:
            entry.pending = max(0, entry.pending - 1)
            entry.last = self._clock()

    def remove(self, topic: str, partition: int) -> None:
        self._parts.pop(f"{topic}/{partition}", None)

    def snapshot(self) -> dict[str, tuple[float, int]]:
        return {key: (entry.last, entry.pending) for key, entry in self._parts.items()}


# -- HTTP server ---------------------------------------------------------------------------------------
