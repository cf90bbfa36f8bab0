"""Deterministic crash points for the crash-window tests.

``IDV_FAULT_KILL_AT=after_provider_call:5`` SIGKILLs the process the fifth time any message reaches that
point, so a test can stop the daemon between two named steps and check what a restart does. Points, in
the order a message passes them: ``before_claim``, ``after_claim``, ``after_provider_call``,
``after_record``, ``after_commit`` (and the workflow engine's ``workflow_after_step``,
``workflow_after_apply``, ``workflow_after_outbox``). Empty (the default) costs one branch per point.
"""

from __future__ import annotations

import logging
import os
import signal

from consumer.errors import ConfigurationError

log = logging.getLogger(__name__)

POINTS = (
    "before_claim",
    "after_claim",
    "after_provider_call",
    "after_record",
    "in_transaction",  # transactional results: events sent, offsets added, transaction not yet committed
    "after_commit",
    # kyc_workflow (consumer/workflows/engine.py): a step's outcome recorded, the workflow not yet moved on;
    # an event applied, the workflow not yet advanced; the final decision in the outbox, not yet published.
    "workflow_after_step",
    "workflow_after_apply",
    "workflow_after_outbox",
)

__all__ = ["POINTS", "FaultPoints"]


class FaultPoints:
    def __init__(self, spec: str = "") -> None:
        self.point: str | None = None
        self.at = 0
        self.hits = 0
        if spec:
            point, _, count = spec.partition(":")
            if point not in POINTS or not count.isdigit() or int(count) < 1:
                raise ConfigurationError(
                    f"IDV_FAULT_KILL_AT: expected <point>:<n> with point in {', '.join(POINTS)}"
                )
            self.point, self.at = point, int(count)

    def hit(self, point: str) -> None:
        if point != self.point:
            return
        self.hits += 1
        if self.hits == self.at:
            log.warning("fault point %s reached %d times: killing the process", point, self.hits)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
