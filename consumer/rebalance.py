"""The daemon's rebalance listener: on assign, open the partitions; on revoke, drain first, fence second.

aiokafka awaits :meth:`RebalanceListener.on_partitions_revoked` before it lets the partitions go, so the
order below is what keeps a revoked partition's work from running twice (PITFALLS: parallel-consumer
#777): stop starting its queued messages, wait up to ``rebalance_drain_s`` for the running ones, cancel
what is left (their leases are released, their offsets stay uncommitted), commit the watermark, and only
then forget the partition.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiokafka import ConsumerRebalanceListener, TopicPartition

if TYPE_CHECKING:
    from consumer.daemon import Daemon

log = logging.getLogger(__name__)

__all__ = ["RebalanceListener"]


def _names(tps: list[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}/{tp.partition}" for tp in tps)


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        assigned = list(assigned)
        self.daemon.flow.assign(assigned)
        log.info("partitions assigned: %s", _names(assigned))

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        revoked, daemon = list(revoked), self.daemon
        flow, drain_s = daemon.flow, daemon.settings.rebalance_drain_s
        parts = flow.revoke(revoked)  # queued messages of these partitions are no longer started
        await flow.wait_running(parts, drain_s, 0.02)
        abandoned = flow.cancel_inflight(parts)
        if abandoned:
            log.warning("rebalance: abandoned %d in-flight message(s) after %.1fs", abandoned, drain_s)
            await flow.wait_running(parts, 5.0, 0.01)
        await daemon._commit_now("revoke", parts)
        for part in parts:
            daemon.sinks.drop_pending(part.tp)
            daemon.progress.remove(part.tp.topic, part.tp.partition)
            daemon.metrics.forget_partition(part.tp.topic, part.tp.partition)
            flow.forget(part)
        if revoked:
            log.info("partitions revoked: %s", _names(revoked))
