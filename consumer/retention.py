"""The retention loop: delete dedupe records past their retention (never IN_PROGRESS ones).

Every instance may run it: the deletes are idempotent, and a record still needed is by definition within
retention (``IDV_RETENTION_S`` ≥ topic retention + replay window; see docs/operations.md).
"""

from __future__ import annotations

import logging

import anyio

from consumer.errors import StoreError
from consumer.store import DedupeStore

log = logging.getLogger(__name__)

__all__ = ["purge_forever"]


async def purge_forever(store: DedupeStore, interval_s: float) -> None:
    """Every ``interval_s``, purge expired records; a failed purge is logged and tried again next time."""
    while True:
        await anyio.sleep(interval_s)
        try:
            purged = await store.purge_expired()
        except StoreError as exc:
            log.warning("retention purge failed (%s); will retry", exc)
            continue
        if purged:
            log.info("retention purge removed %d record(s)", purged, extra={"purged": purged})
