"""The retention loop: delete dedupe records past their retention (never IN_PROGRESS ones).

Every instance may run it: the deletes are idempotent, and a record still needed is by definition within
retention (``IDV_RETENTION_S`` ≥ topic retention + replay window; see docs/operations.md).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from consumer.errors import StoreError
from consumer.store import DedupeStore

if TYPE_CHECKING:
    from consumer.workflows.store import WorkflowStore

log = logging.getLogger(__name__)

__all__ = ["purge_forever"]


async def purge_forever(
    store: DedupeStore,
    interval_s: float,
    workflows: WorkflowStore | None = None,
    retention_s: float | None = None,
) -> None:
    """Every ``interval_s``, purge expired records (and, with ``workflows``, final workflows older than
    ``retention_s``); a failed purge is logged and tried again next time."""
    while True:
        await anyio.sleep(interval_s)
        try:
            purged = await store.purge_expired()
            if workflows is not None and retention_s is not None:
                gone = await workflows.purge(store.clock() - retention_s)
                if gone:
                    log.info("retention purge removed %d finished workflow(s)", gone)
        except StoreError as exc:
            log.warning("retention purge failed (%s); will retry", exc)
            continue
        if purged:
            log.info("retention purge removed %d record(s)", purged, extra={"purged": purged})
